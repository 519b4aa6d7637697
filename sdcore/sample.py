"""Generate images from a trained checkpoint: ``python -m sdcore.sample --help``.

    python -m sdcore.sample --run-dir results/demo --step 128 --sd-checkpoint demo/checkpoints/sd/512-base-ema.ckpt \
        --prompt "a red circle on the left" --prompt "two blue squares" --out samples/

The UNet comes from a training checkpoint (``--checkpoint FILE``, or ``--run-dir`` with ``--step``, which
also finds the run's model config); the frozen VAE and text encoder from the SD checkpoint. Sampling is
the evaluation's: guided DDIM with the empty prompt as the unconditional input, eta 0. Writes one PNG per
prompt (``<out>/0000.png``, ``0001.png``, ... in prompt order) and a captioned grid (``<out>/grid.png``), or
only the grid when ``--out`` ends in ``.png``. Any mistake in the arguments fails with one line (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

from sdcore.checkpoint import CheckpointError
from sdcore.evaluate import (ImageGenerator, check_ddim_steps, initial_latents, load_unet_checkpoint, save_sample_grid,
                             to_uint8_images)
from sdcore.files import atomic_path
from sdcore.logs import setup_logging

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A wrong argument: reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdcore.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_argument_group("checkpoint (one of)")
    which.add_argument("--checkpoint", type=Path, help="a training checkpoint, step_N.safetensors")
    which.add_argument("--run-dir", type=Path, help="a run directory (with --step): results/<run>")
    which.add_argument("--step", type=int, help="the checkpoint's step in --run-dir")
    parser.add_argument("--config", type=Path, help="YAML with model.params (default: <run-dir>/eval_config.yaml)")
    parser.add_argument("--sd-checkpoint", type=Path, required=True, help="SD checkpoint with the frozen VAE and text encoder")
    prompts = parser.add_argument_group("prompts (either or both)")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    prompts.add_argument("--prompts-file", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, as the evaluation)")
    parser.add_argument("--guidance-scale", type=float, default=8.0, help="classifier-free guidance, >= 1 (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial latents (prompt i: its own stream)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per batch")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast precision")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--out", type=Path, required=True, help="output directory, or a .png for the grid only")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """(checkpoint, config, prompts) from the arguments, or UsageError naming what is wrong."""
    if args.checkpoint is None:
        if args.run_dir is None or args.step is None:
            raise UsageError("give --checkpoint FILE, or --run-dir DIR with --step N")
        checkpoint = args.run_dir / "checkpoints" / f"step_{args.step:08d}.safetensors"
    else:
        checkpoint = args.checkpoint
    if not checkpoint.is_file():
        raise UsageError(f"no checkpoint {checkpoint}")
    config = args.config or (args.run_dir / "eval_config.yaml" if args.run_dir else None)
    if config is None or not config.is_file():
        raise UsageError(f"no model config {config}: pass --config (a run's eval_config.yaml)")
    if not args.sd_checkpoint.is_file():
        raise UsageError(f"no SD checkpoint {args.sd_checkpoint}")
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise UsageError(f"no prompt file {args.prompts_file}")
        from_file = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not from_file:  # even beside --prompt: an empty file is a mistake, not a choice
            raise UsageError(f"{args.prompts_file}: no prompts in it")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompts-file FILE")
    if args.guidance_scale < 1:
        raise UsageError(f"--guidance-scale must be >= 1 (1: no guidance), got {args.guidance_scale:g}")
    if args.steps < 1 or args.steps > 1000 or args.batch_size < 1:
        raise UsageError("--steps must be in 1..1000 and --batch-size >= 1")
    return checkpoint, config, prompts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here")
    return device


def load_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "params" not in config["model"]:
        raise UsageError(f"{path}: no model.params (pass a run's eval_config.yaml)")
    return config


def sample(args: argparse.Namespace) -> list[Path]:
    checkpoint, config_path, prompts = resolve(args)
    device = resolve_device(args.device)
    config = load_config(config_path)
    try:
        check_ddim_steps(args.steps, config["model"]["params"].get("timesteps", 1000))
    except ValueError as error:
        raise UsageError(f"--steps: {error}") from None
    unet, metadata = load_unet_checkpoint(config, checkpoint, device)
    generator = ImageGenerator(config["model"]["params"], args.sd_checkpoint, device, args.precision, args.steps,
                               0.0, args.guidance_scale)
    images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = list(range(start, min(start + args.batch_size, len(prompts))))
        x_T = initial_latents(batch, generator.latent_shape, args.seed)
        images.append(to_uint8_images(generator.generate(unet, [prompts[i] for i in batch], x_T)).cpu())
        log.info("sampled %d / %d prompts", batch[-1] + 1, len(prompts))
    images = torch.cat(images)
    title = f"{checkpoint.name} (step {metadata.get('step')}), {args.steps} DDIM steps, guidance {args.guidance_scale:g}"
    written = []
    if args.out.suffix.lower() == ".png":
        save_sample_grid(args.out, images, prompts, title)
        return [args.out]
    from PIL import Image

    for i, image in enumerate(images):
        path = args.out / f"{i:04d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        written.append(path)
    save_sample_grid(args.out / "grid.png", images, prompts, title)
    return written + [args.out / "grid.png"]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        written = sample(args)
    except (UsageError, CheckpointError) as error:
        print(f"sdcore.sample: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
