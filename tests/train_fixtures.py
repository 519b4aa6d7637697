"""Small deterministic pieces for the trainer tests, and a command line to run the trainer with them.

Imported by tests/test_train*.py and tests/test_mlperf_log.py; run as a script
(``python tests/train_fixtures.py --config C.json --run-dir D --source fixed|shards``) by the
tests that need separate processes (2 ranks, a real SIGTERM).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tarfile

import numpy as np
import torch

from sdcore.data import LatentBatch, stream_seed

LATENT_HW = 8
CONTEXT_DIM = 16
TINY_UNET = {
    "image_size": LATENT_HW, "in_channels": 4, "out_channels": 4, "model_channels": 16,
    "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
    "num_head_channels": 8, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": CONTEXT_DIM, "legacy": False, "use_checkpoint": False,
    "use_fp16": False,
}
PART = "part-00000-test-c000.snappy.parquet"


def tiny_config(root: str, **train_overrides) -> dict:
    """A complete trainer config with the real key names, tiny sizes, and paths under ``root``."""
    train = {
        "seed": 42, "batch_size": 4, "gradient_accumulation_steps": 1, "precision": "fp32",
        "optimizer": {"betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.01},
        "warmup_steps": 5, "warmup_start_factor": 1.0e-6, "shuffle_buffer": 16,
        "checkpoint_every_samples": 24, "max_samples": 48, "num_workers": 0,
        "fast_paths": {"attention": "math", "channels_last": False, "compile": False, "conv_gemm_max_pixels": 0,
                       "persistent_weight_casts": False},
    }
    train.update(train_overrides)
    return {
        "run_name": "test",
        "paths": {"data": os.path.join(root, "data"), "checkpoints": os.path.join(root, "checkpoints"),
                  "results": os.path.join(root, "results")},
        "laion": {"metadata": {"parts": [PART]}},
        "model": {
            "base_learning_rate": 2.5e-5,
            "params": {
                "parameterization": "v", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
                "scale_factor": 0.18215, "image_size": LATENT_HW, "channels": 4,
                "unet_config": {"params": dict(TINY_UNET)},
                "cond_stage_config": {"params": {"arch": "sdcore-tiny-clip", "max_length": 77}},
            },
        },
        "train": train,
        "eval": {"num_prompts": 30000, "fid_target": 90.0, "clip_target": 0.15, "stop_on_target": True},
        "mlperf": {"division": "closed", "org": "test-org", "platform": "cpu-test", "poc_name": "Tester",
                   "poc_email": "tester@example.com", "status": "onprem"},
    }


def write_latent_shards(config: dict, num_shards: int = 3, per_shard: int = 20) -> str:
    """Real webdataset tars of (8, h, w) moments + captions, and the manifest the trainer reads."""
    out_dir = os.path.join(config["paths"]["data"], "laion400m", "latents", PART.removesuffix(".parquet"))
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        with tarfile.open(os.path.join(out_dir, name), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                moments = np.concatenate([rng.normal(size=(4, LATENT_HW, LATENT_HW)),
                                          rng.uniform(-8, -2, size=(4, LATENT_HW, LATENT_HW))]).astype(np.float32)
                buf = io.BytesIO()
                np.save(buf, moments)
                for ext, payload in (("npy", buf.getvalue()), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(name)
    manifest = os.path.join(out_dir, "manifest.json")
    with open(manifest, "w") as f:
        json.dump({"shards": shards, "samples": num_shards * per_shard, "failed": 0}, f)
    return manifest


class FixedGlobalBatchSource:
    """Micro-batches that are a function of (step, micro) only: the global batch of every step is the
    same whatever the world size, and rank r holds rows [r*B, (r+1)*B) of it. With ``fixed`` every step
    gets the same batch (for the overfitting test)."""

    num_samples = 1000

    def __init__(self, plan, rank: int, fixed: bool = False):
        self.plan, self.rank, self.fixed = plan, rank, fixed

    def micro_batches(self, start_step: int):
        step = start_step
        while True:
            for micro in range(self.plan.accumulation):
                seed = stream_seed(7, 0 if self.fixed else step, micro)
                g = torch.Generator().manual_seed(seed)
                moments = torch.cat([torch.randn(self.plan.global_batch // self.plan.accumulation, 4,
                                                 LATENT_HW, LATENT_HW, generator=g),
                                     torch.full((self.plan.global_batch // self.plan.accumulation, 4,
                                                 LATENT_HW, LATENT_HW), -6.0)], dim=1)
                rows = slice(self.rank * self.plan.batch_size, (self.rank + 1) * self.plan.batch_size)
                captions = [f"caption {step} {micro} {i}" for i in range(rows.start, rows.stop)]
                yield LatentBatch(moments=moments[rows], captions=captions)
            step += 1


class HashedCaptionConditioner:
    """A fixed random context per caption (no text encoder), so tests stay fast and deterministic."""

    def __call__(self, captions, device):
        contexts = []
        for caption in captions:
            g = torch.Generator().manual_seed(stream_seed(9, *caption.encode()))
            contexts.append(torch.randn(77, CONTEXT_DIM, generator=g))
        return torch.stack(contexts).to(device)


class ScriptedEvaluator:
    """Returns the given (fid, clip) pairs in order, one per evaluation; records what it was asked."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = []

    def evaluate(self, unet, samples_seen):
        self.calls.append(samples_seen)
        fid, clip = self.scores[min(len(self.calls), len(self.scores)) - 1]
        return {"fid": fid, "clip": clip, "num_prompts": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> int:
    from sdcore import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--source", choices=["fixed", "shards"], required=True)
    parser.add_argument("--scores", default="[[300, 0.01]]", help="JSON list of [fid, clip] per evaluation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with open(args.config) as f:
        config = json.load(f)
    make_source = (lambda cfg, env, plan: FixedGlobalBatchSource(plan, env.rank)) if args.source == "fixed" \
        else train.latent_source
    return train.main(config, args.run_dir, device="cpu", make_data_source=make_source,
                      make_conditioner=lambda cfg, env: HashedCaptionConditioner(),
                      make_evaluator=lambda cfg, env: ScriptedEvaluator(json.loads(args.scores)))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(_cli())
