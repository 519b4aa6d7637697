#!/usr/bin/env python3
"""CI check that the demo's final checkpoint draws the demo's scenes, not noise.

Every scene of the demo mirror is one to three flat-coloured shapes on a flat background. This
samples the prompts of the demo config's ``sample.prompts`` with ``python -m sdcore.sample`` (the
sampling command, for real) from the run's last checkpoint and measures each image: the colour
spread of its 3-pixel border (the background: flat in a scene, mottled in noise) and the share of
its pixels that differ from the background colour by more than 0.25 in some channel (the shapes).
It fails unless every border is flat and the shapes cover a few per cent of the images on average.

    python .ci/check_samples.py demo/results/demo demo/checkpoints/sd/512-base-ema.ckpt
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

MAX_BORDER_STD = 0.10      # measured 0.017-0.074 at the demo's last checkpoint (Xeon model 167, 2026-12-02)
MIN_SHAPE_SHARE = 0.08     # measured 0.17-0.19 there (two runs); 0.03 at the half-way checkpoint (flat, no shapes yet)


def measure(path: Path) -> tuple[float, float]:
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    ring = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                           image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    shapes = np.abs(image - ring.mean(0)).max(-1) > 0.25
    return float(ring.std(0).mean()), float(shapes.mean())


def main(run_dir: str, sd_checkpoint: str) -> int:
    run = Path(run_dir)
    last = max(run.glob("checkpoints/step_*.safetensors"))
    prompts = yaml.safe_load((Path(__file__).parents[1] / "profiles/demo/demo-config.yaml").read_text())["sample"]["prompts"]
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "sdcore.sample", "--checkpoint", str(last), "--config",
                   str(run / "eval_config.yaml"), "--sd-checkpoint", sd_checkpoint, "--out", out]
        subprocess.run(command + [arg for p in prompts for arg in ("--prompt", p)], check=True)
        measured = [measure(p) for p in sorted(Path(out).glob("[0-9]*.png"))]
    for prompt, (border, share) in zip(prompts, measured):
        print(f"{last.name}: {prompt!r}: border spread {border:.3f}, shapes {share:.1%}")
    worst_border = max(b for b, _ in measured)
    mean_share = sum(s for _, s in measured) / len(measured)
    ok = len(measured) == len(prompts) and worst_border <= MAX_BORDER_STD and mean_share >= MIN_SHAPE_SHARE
    print(f"{'scenes' if ok else 'NOT scenes'}: worst border spread {worst_border:.3f} (<= {MAX_BORDER_STD}), "
          f"mean shape share {mean_share:.1%} (>= {MIN_SHAPE_SHARE:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
