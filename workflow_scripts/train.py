"""Train (or resume) the benchmark's UNet in a run directory; see sdcore.train.

Launch with one process per device: plain ``python`` (1 process), ``torchrun --nproc_per_node N``,
or ``srun`` with one task per GPU (ranks from the SLURM environment). Exit status 0: finished
(target reached or sample limit); 75: preempted (SIGTERM/SIGUSR1) after writing resume.pt, so a
retry of the same command resumes.
"""

import argparse
import logging
import sys

import yaml

from sdcore import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="merged workflow config YAML")
    parser.add_argument("--run-dir", required=True, help="results/{run}: checkpoints, logs, summary")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(args.config) as f:
        config = yaml.safe_load(f)
    return train.main(config, args.run_dir, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
