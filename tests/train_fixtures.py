"""Small deterministic pieces for the trainer tests, and a command line to run the trainer with them.

Imported by tests/test_train*.py and tests/test_mlperf_log.py; run as a script
(``python tests/train_fixtures.py --config C.json --run-dir D --source fixed|shards [--latents I]``)
by the tests that need separate processes (2 ranks, a real SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
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
TIMEOUT_MINUTES = "5"  # a rank whose peer died gives up after this long (SDCORE_COLLECTIVE_TIMEOUT_MINUTES)


def launch_shape(nproc_per_node: int = 1, nodes: int = 1) -> dict:
    """The config's ``launch`` block of a CPU (gloo) job."""
    return {"nodes": nodes, "nproc_per_node": nproc_per_node, "gpus_per_node": 0, "cpus_per_task": 1, "runtime": 10}


def tiny_config(root: str, eval_mode: str = "inline", nproc_per_node: int = 1, **train_overrides) -> dict:
    """A complete trainer config with the real key names (rules/schemas/config.schema.yaml for the
    train, eval and launch blocks), tiny sizes, paths under ``root``, a CPU launch of one rank."""
    train = {
        "seed": 42, "batch_size": 4, "gradient_accumulation_steps": 1, "precision": "fp32",
        "optimizer": {"betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.01},
        "warmup_steps": 5, "warmup_start_factor": 1.0e-6, "shuffle_buffer": 16,
        "checkpoint_every_samples": 24, "max_samples": 48, "num_workers": 0,
        "tensorboard": False, "plot_every_steps": 1000, "text_embeddings": "online",
        "fast_paths": {"attention": "math", "channels_last": False, "compile": False, "conv_gemm_max_pixels": 0,
                       "conv_winograd_min_pixels": 0, "conv_winograd4_min_pixels": 0,
                       "persistent_weight_casts": False, "onednn_linear": False,
                       "fused_optimizer": False, "keep_freed_memory": False},
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
        "eval": {"mode": eval_mode, "num_prompts": 30000, "batch_size": 4, "precision": "fp32", "ddim_steps": 50,
                 "eta": 0.0, "guidance_scale": 8.0, "fid_target": 90.0, "clip_target": 0.15, "stop_on_target": True,
                 "sample_grid": 0, "launch": launch_shape()},
        "mlperf": {"division": "closed", "org": "test-org", "platform": "cpu-test", "poc_name": "Tester",
                   "poc_email": "tester@example.com", "status": "onprem"},
        "launch": launch_shape(nproc_per_node),
    }


def write_latent_shards(config: dict, num_shards: int = 3, per_shard: int = 20, published_layout: bool = False,
                        name: str = "manifest.json") -> str:
    """Real webdataset tars of VAE moments + captions, and the latent index the trainer reads (shard
    paths relative to it). Moments are (8, h, w) as the rebuild chain writes them, or (1, 8, h, w) as
    in the MLCommons-published shards with ``published_layout``; the values are the same either way."""
    layout = "published" if published_layout else "rebuilt"
    out_dir = os.path.join(config["paths"]["data"], "laion400m", "latents", layout, PART.removesuffix(".parquet"))
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s in range(num_shards):
        shard = f"{s:05d}.tar"
        with tarfile.open(os.path.join(out_dir, shard), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                moments = np.concatenate([rng.normal(size=(4, LATENT_HW, LATENT_HW)),
                                          rng.uniform(-8, -2, size=(4, LATENT_HW, LATENT_HW))]).astype(np.float32)
                buf = io.BytesIO()
                np.save(buf, moments[None] if published_layout else moments)
                for ext, payload in (("npy", buf.getvalue()), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(shard)
    index = os.path.join(out_dir, name)
    with open(index, "w") as f:
        json.dump({"shards": shards, "samples": num_shards * per_shard}, f)
    return index


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


class HookedConditioner(HashedCaptionConditioner):
    """Calls ``hook(n)`` before the n-th conditioning (1-based; with accumulation 1, during step n of
    the attempt, after the previous step's checkpoint, state and plot were written)."""

    def __init__(self, hook):
        self.hook, self.count = hook, 0

    def __call__(self, captions, device):
        self.count += 1
        self.hook(self.count)
        return super().__call__(captions, device)


class ScriptedEvaluator:
    """Returns the given (fid, clip) pairs in order, one per evaluation (the last one repeated);
    records the samples counts and seeds it was asked for. Same signature as sdcore.evaluate.Evaluator."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = []
        self.seeds = []

    def evaluate(self, unet, samples_seen, seed, samples_png=None):
        self.calls.append(samples_seen)
        self.seeds.append(seed)
        fid, clip = self.scores[min(len(self.calls), len(self.scores)) - 1]
        return {"fid": fid, "clip": clip, "num_prompts": 4, "samples_seen": int(samples_seen), "seed": int(seed)}


def no_evaluator(config, env, inputs):
    raise AssertionError("an evaluator was built, but eval.mode is offline")


def factories(source="fixed", fixed: bool = False, conditioner=None, evaluator=None):
    """``sdcore.training.trainer.Factories`` of the tests: ``source`` "fixed" (FixedGlobalBatchSource),
    "shards" (the product's latent_source, reading ``TrainInputs.latents``) or a data factory;
    ``conditioner`` an instance (default HashedCaptionConditioner); ``evaluator`` an instance, or None
    for a factory that fails if called (offline mode builds none)."""
    from sdcore.training import trainer

    if source == "fixed":
        data = lambda config, env, plan, inputs: FixedGlobalBatchSource(plan, env.rank, fixed)
    elif source == "shards":
        data = trainer.latent_source
    else:
        data = source
    conditioner = conditioner or HashedCaptionConditioner()
    return trainer.Factories(
        data=data, conditioner=lambda config, env, inputs: conditioner,
        evaluator=no_evaluator if evaluator is None else (lambda config, env, inputs: evaluator))


@contextlib.contextmanager
def deterministic_cpu(deterministic: bool = True):
    """One CPU thread (also through OMP_NUM_THREADS, which sdcore.distributed.init_distributed applies
    to torch), and deterministic algorithms; everything restored afterwards."""
    threads = torch.get_num_threads()
    old_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp


# ---- reading a run directory --------------------------------------------------------------------

def losses(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "train", "loss.csv")) as f:
        return list(csv.DictReader(f))


def loss_curve(run_dir) -> list[float]:
    return [float(r["loss"]) for r in losses(run_dir)]


def mlperf_records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "train", "mlperf.log")) as f:
        return [json.loads(line.split(" ", 1)[1]) for line in f if line.startswith(":::MLLOG")]


def summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "train", "summary.json")) as f:
        return json.load(f)


def state(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, "train", "state.pt"), map_location="cpu", weights_only=True)


def checkpoint(run_dir, step: int) -> tuple[dict, dict]:
    """(UNet state_dict, metadata) of the run's checkpoint at ``step``."""
    from sdcore.checkpoint import load_unet

    return load_unet(os.path.join(run_dir, "checkpoints", f"step_{step:08d}.safetensors"))


def checkpoint_files(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def step_files(steps) -> list[str]:
    return [f"step_{s:08d}.safetensors" for s in steps]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ: {different[:5]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> int:
    from sdcore.training import trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--source", choices=["fixed", "shards"], required=True)
    parser.add_argument("--latents", help="latent index (--source shards)")
    parser.add_argument("--scores", default="[[300, 0.01]]", help="JSON list of [fid, clip] per evaluation (inline)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with open(args.config) as f:
        config = json.load(f)
    base = factories(args.source, evaluator=ScriptedEvaluator(json.loads(args.scores)))

    def data(cfg, env, plan, inputs):  # says which seed this rank trains with (entropy seeds are broadcast)
        logging.getLogger("train_fixtures").info("rank %d trains with seed %d", env.rank, plan.seed)
        return base.data(cfg, env, plan, inputs)

    inputs = trainer.TrainInputs(latents=args.latents)
    return trainer.main(config, args.run_dir, inputs, trainer.Factories(data=data, conditioner=base.conditioner,
                                                                        evaluator=base.evaluator))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(_cli())
