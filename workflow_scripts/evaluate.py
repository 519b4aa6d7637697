"""Offline evaluation of one saved training checkpoint (FID, CLIP score), as the MLPerf rules allow.

Single process:   python workflow_scripts/evaluate.py --config CONFIG_YAML --checkpoint PT --out JSON
Several ranks:    torchrun --nproc-per-node N workflow_scripts/evaluate.py ...   (or srun on SLURM)
Rank 0 writes the JSON result {checkpoint, step, samples_seen, fid, clip, num_prompts, seconds, targets_met, ...}.
"""

import argparse
import json
import logging

import yaml

from sdcore.distributed import init_distributed, shutdown
from sdcore.evaluate import evaluate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="merged config YAML of the run")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) to evaluate")
    parser.add_argument("--out", required=True, help="JSON result to write")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    with open(args.config) as handle:
        config = yaml.safe_load(handle)
    env = init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{env.rank} %(name)s %(levelname)s: %(message)s")
    try:
        result = evaluate_checkpoint(config, args.checkpoint, args.out, env.device, env.rank, env.world_size)
    finally:
        shutdown(env)
    if env.is_main:
        print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
