"""The reference conformance data carried by the repository (tests/data/reference/).

``golden(name)`` returns a golden file as the reference produced it: inputs, reference outputs
and, for the models, the ``state_dict``, regenerated from its recipe and checked against the
sha256 of the original tensors (see tests/data/reference/README.md).
"""

import functools
import hashlib
import json
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
WEIGHT_SEED = 7
WEIGHT_STD = 0.05


def weights_digest(state_dict: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def regenerate_weights(recipe: dict) -> dict:
    """The golden model's tensors: base + std * randn, drawn in the full model's state-dict order."""
    generator = torch.Generator().manual_seed(recipe["seed"])
    kept, ones = set(recipe["kept"]), set(recipe["ones"])
    drawn = {}
    for name, shape in recipe["draw_order"]:
        noise = torch.randn(shape, generator=generator)
        if name in kept:
            drawn[name] = (1.0 if name in ones else 0.0) + recipe["std"] * noise
    state = {name: drawn[name] for name in recipe["kept"]}
    if weights_digest(state) != recipe["sha256"]:
        raise AssertionError("regenerated golden weights differ from the reference's (sha256 mismatch)")
    return state


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
    data = torch.load(REFERENCE_DIR / "golden" / f"{name}.pt", weights_only=True)
    if "weights" in data:
        data["state_dict"] = regenerate_weights(data.pop("weights"))
    return data


def golden(name: str) -> dict:
    """A fresh copy of golden/<name>.pt (unet, vae, text_encoder, diffusion, frechet)."""
    data = _load(name)
    return {key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()}


def sd2_tensors() -> dict:
    """Names and shapes of the tensors of Stability AI's 512-base-ema.ckpt, per model part."""
    return json.loads((REFERENCE_DIR / "sd2_512_base_tensors.json").read_text())
