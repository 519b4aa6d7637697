#!/usr/bin/env python3
"""CI check that the demo's final checkpoint draws the demo's scenes, not noise.

Every scene of the demo mirror is one to three flat-coloured shapes on a flat background. This
samples the prompts of the demo config's ``sample.prompts`` with ``python -m sdcore.sample`` (the
sampling command, for real) from the run's last checkpoint and measures each image:
- the spread of its 3-pixel border: the median absolute deviation from the border's median colour
  (x 1.4826, a standard deviation for normal noise), so that a shape reaching the border ("an
  orange square at the top") does not count. It rejects high-contrast noise;
- the share of its pixels that differ from that colour by more than 0.25 in some channel (the
  shapes). It rejects an untrained model's faint mottle, and, from above, noise.
It fails unless every border is flat and the shapes cover a few per cent of the images on average
but not most of them. Measured over sampling seeds 0-7 (``--seed``) on the demo's run (AMD EPYC
model 2, 2026-12-07; on one machine the run is the same every time). The border's standard
deviation, used before, reached 0.091 at the last checkpoint where a shape touched the border:

    | sampled from                    | border spread (MAD) | mean shape share |
    | ------------------------------- | ------------------- | ---------------- |
    | last checkpoint                 | 0.013-0.081         | 18-24 %          |
    | half-way checkpoint             | 0.006-0.060         | 0.1-2.7 %        |
    | randomly initialised UNet       | 0.033-0.052         | 0 %              |
    | uniform noise (not sampled)     | 0.37                | 88 %             |

    python .ci/check_samples.py demo/results/demo demo/checkpoints/sd/512-base-ema.ckpt
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

MAX_BORDER_SPREAD = 0.15   # see the table above
MIN_SHAPE_SHARE = 0.08
MAX_SHAPE_SHARE = 0.50


def measure(path: Path) -> tuple[float, float]:
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    ring = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                           image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    background = np.median(ring, 0)
    shapes = np.abs(image - background).max(-1) > 0.25
    return float(1.4826 * np.median(np.abs(ring - background), 0).mean()), float(shapes.mean())


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
    ok = (len(measured) == len(prompts) and worst_border <= MAX_BORDER_SPREAD
          and MIN_SHAPE_SHARE <= mean_share <= MAX_SHAPE_SHARE)
    print(f"{'scenes' if ok else 'NOT scenes'}: worst border spread {worst_border:.3f} (<= {MAX_BORDER_SPREAD}), "
          f"mean shape share {mean_share:.1%} ({MIN_SHAPE_SHARE:.0%}-{MAX_SHAPE_SHARE:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
