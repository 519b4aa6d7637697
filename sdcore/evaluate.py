"""Evaluation of a UNet (SPEC section 4): FID and CLIP score of images generated for the COCO prompts.

One ``Evaluator`` is built per process and reused for every checkpoint: it holds the prompts, the frozen VAE
and text encoder, the Inception-v3 feature extractor, the COCO statistics and the CLIP-score model, all
from files the caller names (``EvalInputs``). ``Evaluator.evaluate(unet, samples_seen, seed)`` runs on every
rank of a launch and returns the same result on all.

How the numbers are made, and why:

- Prompts are the first ``eval.num_prompts`` rows of the prompt TSV, split across ranks in contiguous
  blocks whose sizes differ by at most one. Every prompt is scored exactly once: the reference padded the
  last batch with duplicates, we do not (SPEC section 4).
- The initial latent of prompt ``i`` is drawn on the CPU from a generator seeded from ``(seed, i)``, then
  moved to the device: it depends on neither the world size, nor the batch size, nor the device.
- DDIM, 50 steps, eta 0, guidance 8.0 with the empty prompt (encoded once), decode ``z / 0.18215``, image
  ``clamp((x + 1) / 2, 0, 1)``.
- FID as the reference computes it (``sdcore.fid``): the float images through pytorch-fid's front end
  (bilinear to 299, ``2x - 1``) into the Inception network, pool3 features of all images gathered to rank 0,
  Gaussian in float64, Fréchet distance against the COCO statistics.
- CLIP score as the reference: each image to uint8 by truncation (``ToPILImage``), OpenCLIP's validation
  transform on the PIL image, cosine of the normalised image and text features, averaged over prompts.
- ``eval.precision`` (fp32 | fp16 | bf16) is autocast around the UNet, the VAE decoder, Inception and CLIP;
  the reference evaluates under fp16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from sdcore.checkpoint import StableDiffusionCheckpoint, load_part, load_state_dict_file, load_unet
from sdcore.diffusion import LinearSchedule, ddim_sample, ddim_timesteps
from sdcore.fid import FEATURE_DIM, FRONT_END, InceptionV3Features, frechet_distance, gaussian_stats, load_stats
from sdcore.files import atomic_path, read_json, write_json
from sdcore.attention import CrossAttention, check_attention_backend, set_attention_backend
from sdcore.conv import Conv2d
from sdcore.linear import Linear, set_linear_onednn
from sdcore.precision import FastPaths, keep_freed_memory
from sdcore.unet import UNetModel
from sdcore.winograd import FilterTileCache

log = logging.getLogger(__name__)

# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
GENERATOR_SEED_MODULUS = 2**32
GRID_COLUMNS = 4
GRID_CELL = 256  # pixels per image in the sample grid (demo images are upscaled, full-size ones shrunk)
GRID_CAPTION_HEIGHT = 48  # pixels of caption (up to 3 lines) under each image
GRID_TITLE_HEIGHT = 28  # pixels of the title line above the images


@dataclass(frozen=True)
class EvalInputs:
    """The files an evaluation reads, as the workflow's rule names them."""

    prompts: Path        # val2014_30k.tsv
    fid_stats: Path      # COCO Inception statistics (mu, sigma)
    inception: Path      # pytorch-fid Inception weights
    clip: Path           # OpenCLIP weights of the CLIP score
    sd_checkpoint: Path  # frozen VAE and text encoder


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


def to_unit_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in about [-1, 1] to float images in [0, 1]: clamp((x + 1) / 2, 0, 1)."""
    return torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images to uint8 by truncation, as the reference's ``ToPILImage`` does."""
    return (255.0 * images).to(torch.uint8)


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
        """(B,) raw cosine similarity of each image with its prompt: not scaled by 100, not clipped at 0."""
        image, text = self.image_features(images_uint8), self.text_features(prompts)
        return (nn.functional.normalize(image, dim=-1) * nn.functional.normalize(text, dim=-1)).sum(dim=-1)


def check_ddim_steps(steps: int, total: int) -> None:
    """ValueError unless the reference's uniform DDIM discretisation (``sdcore.diffusion.ddim_timesteps``) gives
    exactly ``steps`` timesteps inside the ``total``-step schedule. Counts such as 3 or 30 give one more, and 3 or
    1000 one past the schedule (the reference's sampler fails on those too); the divisors of 1000 below it are fine."""
    if steps < 1:
        raise ValueError(f"{steps} DDIM steps: at least 1 is needed")
    timesteps = ddim_timesteps(steps, total)
    if len(timesteps) != steps or int(timesteps[-1]) >= total:
        raise ValueError(f"{steps} DDIM steps: the reference's uniform discretisation (every {total} // {steps}-th "
                         f"timestep, plus one) gives {len(timesteps)} timesteps up to {int(timesteps[-1])}, not "
                         f"{steps} below {total}; use a divisor of {total} below it (e.g. 10, 25, 50)")


@dataclass(frozen=True)
class EvalFastPaths:
    """Speed paths of the evaluation (``eval.fast_paths``); the defaults are the faithful path.

    The UNet's kernels while it samples, each restored afterwards, None leaving the UNet's own (a
    trained UNet keeps its ``train.fast_paths``): ``attention`` (``"math"``, the reference's fp32
    softmax, ``"sdpa"`` or ``"onednn"``); ``onednn_linear``, fp32 linear layers (and GEMM
    convolutions) on oneDNN's GEMM, 2x MKL's sgemm on AMD EPYCs; ``conv_gemm_max_pixels``, convolutions of maps of at most that
    many pixels as GEMMs (64: the 8x8 maps of a 64x64 latent); ``conv_winograd_min_pixels``, 3x3
    convolutions of maps of at least that many pixels as Winograd F(2x2, 3x3) (``sdcore.winograd``;
    the GEMM convolutions keep the maps they are given), and ``conv_winograd4_min_pixels`` the same as
    F(4x4, 3x3), which goes first where both apply. ``fast_inception``: the Inception
    network with its BatchNorms folded into the convolutions and channels-last
    (``InceptionV3Features.speed_up_``). ``compile``: the UNet through ``torch.compile`` while it
    samples (compiled once per UNet and batch shape; the compilation, minutes on a CPU, pays off over
    the thousands of guided steps of an evaluation). ``keep_freed_memory``: the C heap keeps the
    memory each guided step frees (``sdcore.precision.keep_freed_memory``; CPUs). Each is checked
    against the faithful path in tests/test_eval_speed_paths.py.
    """

    attention: str | None = None
    onednn_linear: bool | None = None
    conv_gemm_max_pixels: int | None = None
    conv_winograd_min_pixels: int | None = None
    conv_winograd4_min_pixels: int | None = None
    fast_inception: bool = False
    compile: bool = False
    keep_freed_memory: bool = False

    @classmethod
    def from_config(cls, block: dict | None) -> "EvalFastPaths":
        block = dict(block or {})
        allowed = [f.name for f in fields(cls)]
        unknown = set(block) - set(allowed)
        if unknown:
            raise ValueError(f"eval.fast_paths: unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
        paths = cls(**block)
        if paths.attention is not None:
            check_attention_backend(paths.attention)
        for key in ("conv_gemm_max_pixels", "conv_winograd_min_pixels", "conv_winograd4_min_pixels"):
            if getattr(paths, key) is not None and getattr(paths, key) < 0:
                raise ValueError(f"eval.fast_paths.{key}: {getattr(paths, key)} is below 0")
        return paths


# What sampling_kernels sets on each kind of module, and restores.
_KERNEL_SETTINGS = ((CrossAttention, ("attention_backend",)), (Linear, ("onednn",)),
                    (Conv2d, ("gemm_max_pixels", "winograd_min_pixels", "winograd4_min_pixels", "gemm_onednn",
                              "winograd_filters")))


@contextlib.contextmanager
def sampling_kernels(model: nn.Module, paths: EvalFastPaths):
    """``model``'s attention, linear and convolution kernels as ``paths`` sets them inside the block,
    every module's own restored after (a trained UNet goes back to training with its own). Inside,
    each convolution keeps its Winograd filter tiles (``sdcore.winograd.FilterTileCache``: the
    weights are fixed while sampling); they are dropped on leaving."""
    saved = [(module, {name: getattr(module, name) for name in names})
             for module in model.modules() for kind, names in _KERNEL_SETTINGS if isinstance(module, kind)]
    try:
        if paths.attention is not None:
            set_attention_backend(model, paths.attention)
        if paths.onednn_linear is not None:
            set_linear_onednn(model, paths.onednn_linear)
        for conv in (module for module in model.modules() if isinstance(module, Conv2d)):
            conv.winograd_filters = FilterTileCache()
            if paths.conv_gemm_max_pixels is not None:
                conv.gemm_max_pixels = paths.conv_gemm_max_pixels
            if paths.conv_winograd_min_pixels is not None:
                conv.winograd_min_pixels = paths.conv_winograd_min_pixels
            if paths.conv_winograd4_min_pixels is not None:
                conv.winograd4_min_pixels = paths.conv_winograd4_min_pixels
            if paths.onednn_linear is not None:
                conv.gemm_onednn = paths.onednn_linear
        yield
    finally:
        for module, own in saved:
            for name, value in own.items():
                setattr(module, name, value)


class ImageGenerator:
    """Prompts to images with a UNet: the frozen text encoder and VAE of the SD checkpoint, guided DDIM
    (eta, steps, guidance scale), decode, under the autocast of ``precision``."""

    def __init__(self, model_params: dict, sd_checkpoint, device, precision: str = "fp32", ddim_steps: int = 50,
                 eta: float = 0.0, guidance_scale: float = 8.0, fast_paths: dict | None = None):
        self.device = torch.device(device)
        self.fast_paths = FastPaths.from_config({}, precision)
        self.eval_fast_paths = EvalFastPaths.from_config(fast_paths)
        if self.eval_fast_paths.keep_freed_memory:
            keep_freed_memory()
        self.latent_shape = (model_params["channels"], model_params["image_size"], model_params["image_size"])
        downsampling = 2 ** (len(model_params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
        self.image_shape = (3, model_params["image_size"] * downsampling, model_params["image_size"] * downsampling)
        self.ddim_steps, self.eta, self.guidance_scale = int(ddim_steps), float(eta), float(guidance_scale)
        check_ddim_steps(self.ddim_steps, model_params["timesteps"])  # before minutes of loading and sampling
        self.schedule = LinearSchedule(model_params["linear_start"], model_params["linear_end"],
                                       model_params["timesteps"]).to(self.device)
        sd = StableDiffusionCheckpoint(sd_checkpoint)
        self.vae = sd.vae(model_params["first_stage_config"]["params"], model_params["scale_factor"]).to(self.device)
        self.text_encoder = sd.text_encoder(model_params["cond_stage_config"]["params"]).to(self.device)
        self.uncond = self.text_encoder.encode([""])
        self._compiled: tuple[nn.Module, nn.Module] | None = None  # (UNet, its torch.compile), the last one

    def _runnable(self, unet: nn.Module) -> nn.Module:
        """``unet``, or its compiled form with ``eval.fast_paths.compile`` (reused while it is the same UNet)."""
        if not self.eval_fast_paths.compile:
            return unet
        if self._compiled is None or self._compiled[0] is not unet:
            self._compiled = (unet, torch.compile(unet))
        return self._compiled[1]

    def autocast(self):
        return self.fast_paths.autocast_context(self.device)

    @torch.no_grad()
    def generate(self, unet: nn.Module, prompts: list[str], x_T: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1] for ``prompts`` from the initial latents ``x_T``."""
        cond = self.text_encoder.encode(list(prompts))
        uncond = self.uncond.expand(len(prompts), -1, -1)
        runnable = self._runnable(unet)

        def unet_fn(x, t, context):
            with self.autocast():
                return runnable(x, t, context).float()

        with sampling_kernels(unet, self.eval_fast_paths):
            z = ddim_sample(unet_fn, x_T.to(self.device), cond, uncond, self.schedule, steps=self.ddim_steps,
                            eta=self.eta, guidance_scale=self.guidance_scale)
        with self.autocast():
            return to_unit_images(self.vae.decode_latents(z))


class Evaluator:
    """Everything but the UNet, built once; ``evaluate`` scores one UNet (see the module docstring)."""

    def __init__(self, config: dict, inputs: EvalInputs, device, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.settings = settings = config["eval"]
        self.prompts = load_prompts(inputs.prompts, int(settings["num_prompts"]))
        self.my_indices = rank_block(len(self.prompts), rank, world_size)
        self.generator = ImageGenerator(config["model"]["params"], inputs.sd_checkpoint, self.device,
                                        settings["precision"], settings["ddim_steps"], settings["eta"],
                                        settings["guidance_scale"], settings.get("fast_paths"))
        self.inception = InceptionV3Features(inputs.inception, self.device)
        if self.generator.eval_fast_paths.fast_inception:
            self.inception.speed_up_()
        self.coco = load_stats(inputs.fid_stats, front_end=FRONT_END)
        self.clip = ClipScorer(config["checkpoints"]["clip"]["arch"], inputs.clip, self.device)

    def generate(self, unet: nn.Module, indices: list[int], seed: int) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1] for the prompts ``indices``, from their seeded latents."""
        x_T = initial_latents(indices, self.generator.latent_shape, seed)
        return self.generator.generate(unet, [self.prompts[i] for i in indices], x_T)

    @torch.no_grad()
    def score_prompts(self, unet: nn.Module, indices, seed: int, batch_size: int | None = None,
                      keep_images_below: int = 0) -> tuple[PromptScores, torch.Tensor]:
        """Generate and score the images of ``indices`` on this rank (no communication). Also returns the
        uint8 images of the prompts with an index below ``keep_images_below`` (for the sample grid)."""
        batch_size = batch_size or int(self.settings["batch_size"])
        indices = list(indices)
        features, clip_scores, kept = [], [], []
        for start in tqdm(range(0, len(indices), batch_size), desc="evaluation", unit="batch", disable=self.rank != 0):
            batch = indices[start:start + batch_size]
            images = self.generate(unet, batch, seed)
            with self.generator.autocast():
                features.append(self.inception(images, autocast=True).double().cpu())
                images_uint8 = to_uint8_images(images)
                clip_scores.append(self.clip.score(images_uint8, [self.prompts[i] for i in batch]).double().cpu())
            kept += [image.cpu() for index, image in zip(batch, images_uint8) if index < keep_images_below]
        scores = PromptScores(torch.tensor(indices, dtype=torch.int64),
                              torch.cat(features) if features else torch.empty(0, FEATURE_DIM, dtype=torch.float64),
                              torch.cat(clip_scores) if clip_scores else torch.empty(0, dtype=torch.float64))
        return scores, torch.stack(kept) if kept else torch.empty((0, *self.generator.image_shape), dtype=torch.uint8)

    def evaluate(self, unet: nn.Module, samples_seen: int, seed: int, samples_png: Path | None = None) -> dict:
        """FID and CLIP score of ``unet`` over all prompts; call on every rank, returns the same dict on all.

        Pass the bare UNet (not the DDP wrapper: ranks run different numbers of forward passes). Its
        train/eval mode is restored afterwards. With ``samples_png``, rank 0 also saves the images of the
        first ``eval.sample_grid`` prompts as a captioned grid.
        """
        started = time.perf_counter()
        was_training = unet.training
        unet.eval()
        grid_size = min(int(self.settings["sample_grid"]), len(self.prompts)) if samples_png else 0
        try:
            local, images = self.score_prompts(unet, self.my_indices, seed, keep_images_below=grid_size)
        finally:
            unet.train(was_training)
        scores = local.gather(self.world_size, self.device)
        if grid_size:
            images = gather_rows(images.to(self.device), self.world_size).cpu() if self.world_size > 1 else images
        result = None
        if self.rank == 0:
            if not torch.equal(scores.indices, torch.arange(len(self.prompts))):
                raise RuntimeError("evaluation: the gathered prompts are not each prompt exactly once")
            mu, sigma = gaussian_stats(scores.inception.numpy())
            result = {"fid": frechet_distance(mu, sigma, self.coco.mu, self.coco.sigma),
                      "clip": float(scores.clip.mean()), "num_prompts": len(self.prompts),
                      "samples_seen": int(samples_seen), "seed": int(seed), "precision": self.settings["precision"],
                      "fid_front_end": FRONT_END, "seconds": time.perf_counter() - started}
            if grid_size:
                save_sample_grid(samples_png, images, self.prompts[:grid_size],
                                 f"{samples_seen} samples: FID {result['fid']:.2f}, CLIP {result['clip']:.4f}")
            log.info("evaluation at %d samples: FID %.4f, CLIP %.4f over %d prompts in %.1f s", samples_seen,
                     result["fid"], result["clip"], result["num_prompts"], result["seconds"])
        if self.world_size > 1:
            holder = [result]
            dist.broadcast_object_list(holder, src=0)
            result = holder[0]
        return result


def save_sample_grid(path, images_uint8: torch.Tensor, captions: list[str], title: str) -> None:
    """A PNG grid of the images with their captions under each, and a title line (atomically)."""
    columns = min(GRID_COLUMNS, len(captions))
    rows = -(-len(captions) // columns)
    caption_height, title_height = GRID_CAPTION_HEIGHT, GRID_TITLE_HEIGHT
    grid = Image.new("RGB", (columns * GRID_CELL, title_height + rows * (GRID_CELL + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title, fill="black")
    for i, (image, caption) in enumerate(zip(images_uint8, captions)):
        x, y = (i % columns) * GRID_CELL, title_height + (i // columns) * (GRID_CELL + caption_height)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS)
        grid.paste(picture, (x, y))
        lines = textwrap.wrap(caption, width=GRID_CELL // 7)[:3]
        draw.multiline_text((x + 4, y + GRID_CELL + 2), "\n".join(lines), fill="black", spacing=1)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def targets_met(result: dict, eval_settings: dict) -> bool:
    """FID <= eval.fid_target and CLIP >= eval.clip_target, at the same checkpoint."""
    return result["fid"] <= float(eval_settings["fid_target"]) and result["clip"] >= float(eval_settings["clip_target"])


def write_eval_result(path, result: dict, eval_settings: dict) -> dict:
    """The one writer of ``eval/step_N.json``: the scores with the targets they are judged by."""
    record = {**result, "fid_target": float(eval_settings["fid_target"]),
              "clip_target": float(eval_settings["clip_target"]), "targets_met": targets_met(result, eval_settings)}
    write_json(path, record)
    return record


def read_eval_results(paths) -> list[dict]:
    """The results of the existing files among ``paths``, in order."""
    return [read_json(p) for p in paths if Path(p).exists()]


def load_unet_checkpoint(config: dict, checkpoint_path, device) -> tuple[nn.Module, dict]:
    """The UNet of a training checkpoint (built from ``model.params.unet_config``) and its metadata
    (``step``, ``samples_seen``, ``seed``, ``global_batch``)."""
    state_dict, metadata = load_unet(checkpoint_path)
    unet = UNetModel(**config["model"]["params"]["unet_config"]["params"])
    # strict, and a CheckpointError listing every missing, unexpected and mis-shaped name (not a RuntimeError)
    load_part(unet, state_dict, "", f"UNet of {checkpoint_path}")
    return unet.to(device).eval().requires_grad_(False), metadata


def evaluate_checkpoint(config: dict, inputs: EvalInputs, checkpoint_path, out_path, device, rank: int = 0,
                        world_size: int = 1) -> dict:
    """Offline evaluation of one saved training checkpoint; rank 0 writes the result and the sample grid."""
    unet, metadata = load_unet_checkpoint(config, checkpoint_path, device)
    out_path = Path(out_path)
    evaluator = Evaluator(config, inputs, device, rank, world_size)
    result = evaluator.evaluate(unet, metadata["samples_seen"], metadata["seed"],
                                samples_png=out_path.with_name(f"{out_path.stem}_samples.png"))
    result = {"checkpoint": str(checkpoint_path), "step": metadata["step"], **result}
    if rank == 0:
        result = write_eval_result(out_path, result, config["eval"])
    return result
