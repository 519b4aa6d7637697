"""Safe checkpoint loading: SD ``.ckpt`` / ``.pt`` / ``.safetensors`` to per-part, strictly checked modules.

Pickles are only ever opened with ``torch.load(weights_only=True)``, which refuses anything that would run code.
Each model part (VAE ``first_stage_model.``, text encoder ``cond_stage_model.``, UNet ``model.diffusion_model.``)
must match its module exactly; the error lists every missing, unexpected and mis-shaped name so a wrong
checkpoint is diagnosed in one go.
"""

import hashlib
import pickle
from pathlib import Path

import torch
from torch import nn

from sdcore.autoencoder import AutoencoderKL
from sdcore.unet import UNetModel

VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."
UNET_PREFIX = "model.diffusion_model."
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_LISTED_NAMES = 50


class CheckpointError(Exception):
    """A checkpoint that cannot be used: unreadable, unsafe, or not matching the model."""


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file on the CPU, unwrapping Lightning's ``{"state_dict": ...}``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        state_dict = load_file(str(path), device="cpu")
    elif suffix in PICKLE_SUFFIXES:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{path}: refused, the pickle holds more than tensors and plain containers "
                                  f"(loading it would run code): {error}") from error
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} "
                              f"(expected .safetensors or one of {sorted(PICKLE_SUFFIXES)})")
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state_dict).__name__}")
    not_tensors = sorted(name for name, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listing(not_tensors)}")
    return state_dict


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


def load_frozen_models(ckpt_path, model_params: dict, load_unet: bool = False) -> tuple:
    """(vae, text_encoder), or (vae, text_encoder, unet) with ``load_unet``, from an SD checkpoint.

    ``model_params`` is the reference yaml's ``model.params`` block (first_stage_config, cond_stage_config,
    scale_factor, unet_config). The frozen parts come back in eval mode without gradients; the UNet is only
    needed to score a pretrained SD2 UNet, since the benchmark trains its own from scratch.
    """
    from sdcore.text_encoder import FrozenOpenCLIPText  # here, not at the top: open_clip takes seconds to import

    text_params = model_params["cond_stage_config"]["params"]
    if text_params.get("layer", "penultimate") != "penultimate":
        raise ValueError(f"only the penultimate text-encoder layer is implemented, not {text_params['layer']!r}")
    state_dict = load_state_dict_file(ckpt_path)
    vae_params = model_params["first_stage_config"]["params"]
    vae = AutoencoderKL(vae_params["ddconfig"], vae_params["embed_dim"], scale_factor=model_params["scale_factor"])
    load_part(vae, state_dict, VAE_PREFIX, "VAE")
    vae.eval().requires_grad_(False)

    text_encoder = FrozenOpenCLIPText(text_params["arch"], max_length=text_params.get("max_length", 77))
    load_part(text_encoder, state_dict, TEXT_ENCODER_PREFIX, "text encoder")
    if not load_unet:
        return vae, text_encoder

    unet = UNetModel(**model_params["unet_config"]["params"])
    load_part(unet, state_dict, UNET_PREFIX, "UNet")
    return vae, text_encoder, unet.eval()
