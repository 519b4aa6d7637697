"""Checkpoint files: the SD2 checkpoint's frozen parts, and the UNet weights the trainer saves.

Pickles are only ever opened with ``torch.load(weights_only=True)``, which refuses anything that
would run code. Each model part of an SD checkpoint (VAE ``first_stage_model.``, text encoder
``cond_stage_model.``, UNet ``model.diffusion_model.``) must match its module exactly; the error
lists every missing, unexpected and mis-shaped name, so a wrong checkpoint is diagnosed in one go.

The UNet weights of training checkpoints are safetensors files (``save_unet``/``load_unet``) with
the training position (step, samples, seed) in the file's metadata; any tool that reads
safetensors reads them, and a truncated or corrupt file is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from sdcore.files import atomic_path

VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."
UNET_PREFIX = "model.diffusion_model."
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_LISTED_NAMES = 50


class CheckpointError(Exception):
    """A checkpoint that cannot be used: unreadable, unsafe, truncated, or not matching the model."""


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file on the CPU, unwrapping Lightning's ``{"state_dict": ...}``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)[0]
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} "
                              f"(expected .safetensors or one of {sorted(PICKLE_SUFFIXES)})")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # also what a legacy (non-zip) file cut short raises
        raise CheckpointError(f"{path}: refused, the pickle holds more than tensors and plain containers "
                              f"(loading it would run code), or it is truncated: {error}") from error
    except (RuntimeError, EOFError, OSError) as error:
        # torch's zip reader on a truncated or corrupt file (OSError EINVAL when the cut is inside the data)
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt checkpoint: {error}") from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state_dict).__name__}")
    not_tensors = sorted(name for name, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listing(not_tensors)}")
    return state_dict


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated or corrupt file names itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: {error}") from error


def save_unet(path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """UNet weights as safetensors (atomically), ``metadata`` values stored as JSON strings."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(value) for key, value in metadata.items()})


def load_unet(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of a file written by ``save_unet``."""
    tensors, metadata = load_safetensors(path)
    try:
        return tensors, {key: json.loads(value) for key, value in metadata.items()}
    except ValueError as error:
        raise CheckpointError(f"{path}: metadata is not sdcore's (JSON values): {error}") from error


def extract_part(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {name[len(prefix):]: value for name, value in state_dict.items() if name.startswith(prefix)}


def load_part(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, part_name: str) -> nn.Module:
    """Load the ``prefix`` entries of a full checkpoint into ``module``; every name and shape must match."""
    part = extract_part(state_dict, prefix)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(part))
    unexpected = sorted(set(part) - set(expected))
    mismatched = sorted(f"{name} {tuple(part[name].shape)} != {tuple(expected[name].shape)}"
                        for name in set(part) & set(expected) if part[name].shape != expected[name].shape)
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(names)}): {_listing(names)}"
                    for label, names in (("missing", missing), ("unexpected", unexpected),
                                         ("shape mismatch (checkpoint != model)", mismatched)) if names]
        raise CheckpointError(f"{part_name} (prefix {prefix!r}) does not match the checkpoint; "
                              + "; ".join(problems))
    module.load_state_dict(part, strict=True)
    return module


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_NAMES])
    return shown if len(names) <= MAX_LISTED_NAMES else f"{shown}, ... and {len(names) - MAX_LISTED_NAMES} more"


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StableDiffusionCheckpoint:
    """The parts of Stability AI's ``512-base-ema.ckpt`` (or a file of the same layout), read once.

    The benchmark uses only its frozen VAE and text encoder; its UNet is there for scoring a
    pretrained model. Parts come back in eval mode without gradients.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.state_dict = load_state_dict_file(self.path)

    def vae(self, first_stage_params: dict, scale_factor: float) -> nn.Module:
        """``first_stage_config.params`` of the reference yaml -> the frozen AutoencoderKL."""
        from sdcore.autoencoder import AutoencoderKL

        vae = AutoencoderKL(first_stage_params["ddconfig"], first_stage_params["embed_dim"], scale_factor=scale_factor)
        return load_part(vae, self.state_dict, VAE_PREFIX, f"VAE of {self.path}").eval().requires_grad_(False)

    def text_encoder(self, cond_stage_params: dict) -> nn.Module:
        """``cond_stage_config.params`` -> the frozen OpenCLIP text tower (penultimate layer)."""
        from sdcore.text_encoder import FrozenOpenCLIPText  # here: open_clip takes seconds to import

        layer = cond_stage_params.get("layer", "penultimate")
        if layer != "penultimate":
            raise ValueError(f"only the penultimate text-encoder layer is implemented, not {layer!r}")
        encoder = FrozenOpenCLIPText(cond_stage_params["arch"], max_length=cond_stage_params.get("max_length", 77))
        return load_part(encoder, self.state_dict, TEXT_ENCODER_PREFIX, f"text encoder of {self.path}")

    def unet(self, unet_params: dict) -> nn.Module:
        from sdcore.unet import UNetModel

        unet = UNetModel(**unet_params)
        return load_part(unet, self.state_dict, UNET_PREFIX, f"UNet of {self.path}").eval().requires_grad_(False)
