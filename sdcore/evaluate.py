"""Evaluation of a UNet (SPEC section 4): FID and CLIP score of images generated for the COCO prompts.

One ``Evaluator`` is built per process and reused for every checkpoint: it holds the prompts, the frozen VAE
and text encoder, the Inception-v3 feature extractor, the COCO statistics and the CLIP-score model.
``Evaluator.evaluate(unet, samples_seen)`` runs on every rank of a launch and returns the same result on all.

How the numbers are made, and why:

- Prompts are the first ``eval.num_prompts`` rows of ``val2014_30k.tsv``, split across ranks in contiguous
  blocks whose sizes differ by at most one. Every prompt is scored exactly once: the reference padded the
  last batch with duplicates, we do not (SPEC section 4).
- The initial latent of prompt ``i`` is drawn on the CPU from a generator seeded from ``(seed, i)``, then
  moved to the device. It therefore depends on neither the world size, nor the batch size, nor the device,
  and with eta = 0 (DDIM is then deterministic) neither does the image, up to floating-point differences of
  batched kernels.
- DDIM, 50 steps, eta 0, guidance 8.0 with the empty prompt (encoded once), decode ``z / 0.18215``, image
  ``clamp((x + 1) / 2, 0, 1)``, then uint8 by ``(255 * x).to(uint8)``: truncation, which is what the
  reference's ``ToPILImage`` does to the images it hands to the CLIP model. torch-fidelity's Inception takes
  uint8 only, so the same images go to it (the reference gave its pytorch-fid Inception the float images; the
  quantisation moves each pixel by less than 1/255).
- FID: pool3 features of all images gathered to rank 0, Gaussian fitted in float64, Fréchet distance against
  the COCO statistics. CLIP score: OpenCLIP's own validation transform applied to each uint8 image as a PIL
  image (as the reference does), cosine of the normalised image and text features, averaged over prompts.
- The UNet runs under the evaluation's ``FastPaths`` autocast (``eval.precision``, default fp32); VAE,
  Inception and CLIP always run in fp32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from sdcore.checkpoint import load_frozen_models, load_state_dict_file
from sdcore.diffusion import LinearSchedule, ddim_sample
from sdcore.metrics import (INCEPTION_FEATURE, clip_score, frechet_distance, gaussian_stats, inception_features,
                            load_inception)
from sdcore.precision import FastPaths
from sdcore.unet import UNetModel

log = logging.getLogger(__name__)

PROMPTS_FILE = "coco2014/val2014_30k.tsv"
COCO_STATS_FILE = "coco2014/val2014_512x512_30k_stats.npz"
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
GENERATOR_SEED_MODULUS = 2**32


@dataclass(frozen=True)
class EvalPaths:
    """Where the evaluation inputs live, from ``paths`` and ``checkpoints`` of the config."""

    prompts: Path
    coco_stats: Path
    sd_checkpoint: Path
    inception: Path
    clip: Path

    @classmethod
    def from_config(cls, config: dict) -> "EvalPaths":
        data, checkpoints = Path(config["paths"]["data"]), Path(config["paths"]["checkpoints"])
        files = config["checkpoints"]
        return cls(prompts=data / PROMPTS_FILE, coco_stats=data / COCO_STATS_FILE,
                   sd_checkpoint=checkpoints / "sd" / files["sd"]["file"],
                   inception=checkpoints / "inception" / files["inception"]["file"],
                   clip=checkpoints / "clip" / files["clip"]["file"])


@dataclass
class PromptScores:
    """Per-prompt results of one rank (or, after ``gather``, of all ranks in prompt order)."""

    indices: torch.Tensor          # (N,) int64 prompt indices
    inception: torch.Tensor        # (N, 2048) float64 pool3 features
    clip: torch.Tensor             # (N,) float64 CLIP scores

    def gather(self, world_size: int, device: torch.device) -> "PromptScores":
        """All ranks' rows on every rank (CPU), sorted by prompt index, so the result does not depend on the split.

        The collectives run on ``device`` because NCCL only moves GPU tensors.
        """
        rows = (self.indices, self.inception, self.clip)
        if world_size > 1:
            rows = tuple(gather_rows(part.to(device), world_size).cpu() for part in rows)
        indices, inception, clip = rows
        order = torch.argsort(indices)
        return PromptScores(indices[order], inception[order], clip[order])


def load_prompts(tsv_path, num_prompts: int) -> list[str]:
    """The captions of the first ``num_prompts`` rows of the prompt TSV."""
    from sdcore.prep.coco import read_subset

    captions = read_subset(tsv_path)["caption"].tolist()
    if len(captions) < num_prompts:
        raise ValueError(f"{tsv_path}: {len(captions)} prompts, but eval.num_prompts is {num_prompts}")
    return captions[:num_prompts]


def rank_block(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous block of item indices of ``rank``; blocks cover every item once, sizes differ by <= 1."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def initial_latents(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T ~ N(0, 1) for each prompt index, each from its own CPU generator (see the module docstring).

    Prompt i uses the generator seed (base + i) mod 2**32, where base is the run seed hashed by numpy's
    SeedSequence: distinct for every prompt of a run, unrelated between runs with different seeds.
    """
    base = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    generator = torch.Generator(device="cpu")
    noise = []
    for index in indices:
        generator.manual_seed((base + int(index)) % GENERATOR_SEED_MODULUS)
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise)


def to_uint8_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in about [-1, 1] to uint8 images: clamp((x+1)/2, 0, 1), times 255, truncated like ToPILImage."""
    return (255.0 * torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)).to(torch.uint8)


def gather_rows(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ between ranks) in rank order, on every rank."""
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, counts)])


class ClipScorer:
    """OpenCLIP model, its validation transform and tokenizer: the reference's CLIP score, batched."""

    def __init__(self, arch: str, weights_path, device: torch.device):
        import open_clip

        import sdcore.text_encoder  # noqa: F401  registers sdcore's OpenCLIP configs (the tiny demo arch)

        model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        model.load_state_dict(load_state_dict_file(weights_path), strict=True)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()

    @torch.no_grad()
    def image_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Each (3, H, W) uint8 image goes through the transform as a PIL image, exactly like the reference."""
        pixels = torch.stack([self.preprocess(Image.fromarray(image.permute(1, 2, 0).cpu().numpy()))
                              for image in images_uint8])
        return self.model.encode_image(pixels.to(self.device)).float()

    def score(self, images_uint8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) raw cosine similarity of each image with its prompt."""
        return clip_score(self.image_features(images_uint8), self.text_features(prompts))


def eval_fast_paths(config: dict) -> FastPaths:
    """``eval.fast_paths`` and ``eval.precision`` (both optional): the faithful fp32 math path by default."""
    return FastPaths.from_config(config["eval"].get("fast_paths", {}), config["eval"].get("precision", "fp32"))


class Evaluator:
    """Everything but the UNet, built once; ``evaluate`` scores one UNet (see the module docstring)."""

    def __init__(self, config: dict, device, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.settings = config["eval"]
        self.seed = int(config["train"]["seed"])
        self.fast_paths = eval_fast_paths(config)
        params = config["model"]["params"]
        self.latent_shape = (params["channels"], params["image_size"], params["image_size"])
        paths = EvalPaths.from_config(config)

        self.prompts = load_prompts(paths.prompts, int(self.settings["num_prompts"]))
        self.my_indices = rank_block(len(self.prompts), rank, world_size)
        self.schedule = LinearSchedule(params["linear_start"], params["linear_end"], params["timesteps"]).to(self.device)
        vae, text_encoder = load_frozen_models(paths.sd_checkpoint, params)
        self.vae, self.text_encoder = vae.to(self.device), text_encoder.to(self.device)
        self.uncond = self.text_encoder.encode([""])
        self.inception = load_inception(paths.inception, self.device)
        with np.load(paths.coco_stats) as stats:
            self.coco_mu, self.coco_sigma = stats["mu"], stats["sigma"]
        self.clip = ClipScorer(config["checkpoints"]["clip"]["arch"], paths.clip, self.device)

    @torch.no_grad()
    def score_prompts(self, unet: nn.Module, indices, batch_size: int | None = None) -> PromptScores:
        """Generate and score the images of ``indices`` on this rank (no communication)."""
        batch_size = batch_size or int(self.settings["batch_size"])
        indices = list(indices)
        features, clip_scores = [], []
        batches = range(0, len(indices), batch_size)
        for start in tqdm(batches, desc="evaluation", unit="batch", disable=self.rank != 0):
            batch = indices[start:start + batch_size]
            images = self.generate(unet, batch)
            prompts = [self.prompts[i] for i in batch]
            features.append(torch.from_numpy(inception_features(self.inception, images)))
            clip_scores.append(self.clip.score(images, prompts).double().cpu())
        return PromptScores(torch.tensor(indices, dtype=torch.int64),
                            torch.cat(features) if features else torch.empty(0, int(INCEPTION_FEATURE), dtype=torch.float64),
                            torch.cat(clip_scores) if clip_scores else torch.empty(0, dtype=torch.float64))

    @torch.no_grad()
    def generate(self, unet: nn.Module, indices: list[int]) -> torch.Tensor:
        """(B, 3, H, W) uint8 images for the prompts ``indices``."""
        cond = self.text_encoder.encode([self.prompts[i] for i in indices])
        uncond = self.uncond.expand(len(indices), -1, -1)
        x_T = initial_latents(indices, self.latent_shape, self.seed).to(self.device)

        def unet_fn(x, t, context):
            with self.fast_paths.autocast_context(self.device):
                return unet(x, t, context).float()

        z = ddim_sample(unet_fn, x_T, cond, uncond, self.schedule,
                        steps=int(self.settings["ddim_steps"]), eta=float(self.settings["eta"]),
                        guidance_scale=float(self.settings["guidance_scale"]))
        return to_uint8_images(self.vae.decode_latents(z))

    def evaluate(self, unet: nn.Module, samples_seen: int) -> dict:
        """FID and CLIP score of ``unet`` over all prompts; call on every rank, returns the same dict on all.

        Pass the bare UNet (not the DDP wrapper: ranks run different numbers of forward passes). Its
        train/eval mode is restored afterwards.
        """
        started = time.perf_counter()
        was_training = unet.training
        unet.eval()
        try:
            local = self.score_prompts(unet, self.my_indices)
        finally:
            unet.train(was_training)
        scores = local.gather(self.world_size, self.device)
        result = None
        if self.rank == 0:
            if not torch.equal(scores.indices, torch.arange(len(self.prompts))):
                raise RuntimeError("evaluation: the gathered prompts are not each prompt exactly once")
            mu, sigma = gaussian_stats(scores.inception.numpy())
            result = {"fid": frechet_distance(mu, sigma, self.coco_mu, self.coco_sigma),
                      "clip": float(scores.clip.mean()), "num_prompts": len(self.prompts),
                      "samples_seen": int(samples_seen), "seconds": time.perf_counter() - started}
            log.info("evaluation at %d samples: FID %.4f, CLIP %.4f over %d prompts in %.1f s", samples_seen,
                     result["fid"], result["clip"], result["num_prompts"], result["seconds"])
        if self.world_size > 1:
            holder = [result]
            dist.broadcast_object_list(holder, src=0)
            result = holder[0]
        return result


def targets_met(result: dict, eval_settings: dict) -> bool:
    """FID <= eval.fid_target and CLIP >= eval.clip_target, at the same checkpoint."""
    return result["fid"] <= float(eval_settings["fid_target"]) and result["clip"] >= float(eval_settings["clip_target"])


def load_unet_checkpoint(config: dict, checkpoint_path, device) -> tuple[nn.Module, dict]:
    """The UNet of a training checkpoint (built from ``model.params.unet_config``, eval fast paths applied)
    and the checkpoint's ``step`` and ``samples_seen``."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    unet = UNetModel(**config["model"]["params"]["unet_config"]["params"])
    unet.load_state_dict(checkpoint["unet"], strict=True)
    unet = eval_fast_paths(config).apply(unet.to(device).eval().requires_grad_(False))
    return unet, {"step": int(checkpoint["step"]), "samples_seen": int(checkpoint["samples_seen"])}


def evaluate_checkpoint(config: dict, checkpoint_path, out_path, device, rank: int = 0, world_size: int = 1) -> dict:
    """Offline evaluation of one saved training checkpoint; rank 0 writes the JSON result atomically."""
    from sdcore.prep import write_json

    unet, progress = load_unet_checkpoint(config, checkpoint_path, device)
    result = Evaluator(config, device, rank, world_size).evaluate(unet, progress["samples_seen"])
    result = {"checkpoint": str(checkpoint_path), "step": progress["step"], **result,
              "fid_target": float(config["eval"]["fid_target"]), "clip_target": float(config["eval"]["clip_target"]),
              "targets_met": targets_met(result, config["eval"])}
    if rank == 0:
        write_json(out_path, result)
    return result
