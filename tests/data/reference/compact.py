"""Make the repository's copy of the reference conformance data from the original golden files.

    python tests/data/reference/compact.py SOURCE_DIR

SOURCE_DIR holds the original ``golden/*.pt`` and ``sd2_512_base_tensors.json`` (made by running
the MLPerf reference's own model code; see README.md here). Their model weights are 44 MB, but
every weight tensor of the UNet, VAE and text-encoder golden models is ``base + 0.05 * randn``
drawn from one ``torch.Generator().manual_seed(7)`` in the state-dict order of the full model
(base 1 for normalisation weights, 0 otherwise). This script checks that bitwise for every tensor
and stores the recipe plus a sha256 of the weights instead of the tensors; ``tests/reference.py``
regenerates them and checks the digest. Inputs and reference outputs are kept as they are.
"""

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: its helper modules import by name
from reference import WEIGHT_SEED, WEIGHT_STD, weights_digest  # noqa: E402

WEIGHTED = ("unet", "vae", "text_encoder")
COPIED = ("diffusion", "frechet")


def draw_order(name: str, data: dict) -> list[tuple[str, list[int]]]:
    """Names and shapes in the order the generator drew them: the full model's state dict."""
    if name == "text_encoder":  # drawn over the whole CLIP model; the visual tower was dropped after
        import open_clip

        full = open_clip.CLIP(**data["open_clip_config"]).state_dict()
        return [(key, list(value.shape)) for key, value in full.items()]
    return [(key, list(value.shape)) for key, value in data["state_dict"].items()]


def recipe(name: str, data: dict) -> dict:
    """The weight recipe of one golden model, verified bitwise against its stored tensors."""
    state = data["state_dict"]
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    order, ones = draw_order(name, data), []
    for key, shape in order:
        noise = torch.randn(shape, generator=generator)
        if key not in state:
            continue
        for base in (0.0, 1.0):
            if torch.equal(state[key], base + WEIGHT_STD * noise):
                if base:
                    ones.append(key)
                break
        else:
            raise SystemExit(f"{name}: {key} is not base + {WEIGHT_STD} * randn in draw order")
    missing = set(state) - {key for key, _ in order}
    if missing:
        raise SystemExit(f"{name}: tensors outside the draw order: {sorted(missing)}")
    return {"seed": WEIGHT_SEED, "std": WEIGHT_STD, "draw_order": order, "kept": list(state),
            "ones": ones, "sha256": weights_digest(state)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="directory with golden/ and sd2_512_base_tensors.json")
    args = parser.parse_args()
    out = HERE / "golden"
    out.mkdir(exist_ok=True)
    for name in WEIGHTED:
        data = torch.load(args.source / "golden" / f"{name}.pt", weights_only=True)
        compact = {key: value for key, value in data.items() if key != "state_dict"}
        compact["weights"] = recipe(name, data)
        torch.save(compact, out / f"{name}.pt")
    for name in COPIED:
        shutil.copy2(args.source / "golden" / f"{name}.pt", out / f"{name}.pt")
    shutil.copy2(args.source / "sd2_512_base_tensors.json", HERE / "sd2_512_base_tensors.json")
    for path in sorted(HERE.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"{path.relative_to(HERE)}  {path.stat().st_size:>9} bytes  sha256 {digest}...")


if __name__ == "__main__":
    main()
