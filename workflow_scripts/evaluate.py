"""Offline evaluation of one saved training checkpoint (FID, CLIP score, a sample grid), as the MLPerf
rules allow: outside the timed run, in any order.

Start it like training (workflow_scripts/launch.py: srun or torchrun, several ranks split the prompts)
or as one process. Rank 0 writes the JSON result (sdcore.evaluate.write_eval_result) and, beside it,
<result>_samples.png.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from sdcore.distributed import LaunchShapeError, init_distributed, shutdown
from sdcore.evaluate import EvalInputs, evaluate_checkpoint
from sdcore.files import write_json
from sdcore.logs import setup_logging

POLL_SECONDS = float(os.environ.get("SDCORE_POLL_SECONDS", "10"))


def wait_for_checkpoint(checkpoint: Path, training_summary: Path) -> bool:
    """Whether the checkpoint appeared (True) before the training ended without it (False)."""
    waited = 0.0
    while not checkpoint.exists():
        if training_summary.exists():
            return checkpoint.exists()
        if waited % 600 == 0:
            logging.info("waiting for %s", checkpoint)
        time.sleep(POLL_SECONDS)
        waited += POLL_SECONDS
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the run's evaluation config (YAML)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint (.safetensors)")
    parser.add_argument("--prompts", required=True, type=Path, help="COCO prompt TSV")
    parser.add_argument("--fid-stats", required=True, type=Path, help="COCO Inception statistics (.npz)")
    parser.add_argument("--inception", required=True, type=Path, help="Inception weights (pytorch-fid layout)")
    parser.add_argument("--clip", required=True, type=Path, help="OpenCLIP weights of the CLIP score")
    parser.add_argument("--sd-checkpoint", required=True, type=Path, help="SD checkpoint (frozen VAE, text encoder)")
    parser.add_argument("--out", required=True, type=Path, help="JSON result to write")
    parser.add_argument("--wait-for-training", type=Path, metavar="SUMMARY",
                        help="evaluation beside a running training (eval.stop_on_target): wait for the checkpoint; "
                             "if the training ends (SUMMARY appears) without it, record that and stop")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    setup_logging()
    if args.wait_for_training and not wait_for_checkpoint(args.checkpoint, args.wait_for_training):
        step = int(args.checkpoint.stem.removeprefix("step_"))
        write_json(args.out, {"step": step, "skipped": f"the training stopped before step {step}"})
        return 0
    try:
        env = init_distributed(config["launch"])
    except LaunchShapeError as error:  # one line per rank, before any collective
        print(f"evaluate: {error}", file=sys.stderr)
        return 2
    inputs = EvalInputs(prompts=args.prompts, fid_stats=args.fid_stats, inception=args.inception, clip=args.clip,
                        sd_checkpoint=args.sd_checkpoint)
    try:
        result = evaluate_checkpoint(config, inputs, args.checkpoint, args.out, env.device, env.rank, env.world_size)
    finally:
        shutdown(env)
    if env.is_main:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
