"""Print (and save) the readable summary of a finished run, and draw FID and CLIP per checkpoint:
throughput, loss, the scores against the targets, the time to train, the checker's verdict; and the
loss curve."""

import argparse
import sys
from pathlib import Path

from sdcore.files import write_text
from sdcore.training.history import plot_loss
from sdcore.training.report import plot_evaluations, run_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True, help="summary text")
    parser.add_argument("--plot", required=True, help="PNG of FID and CLIP per checkpoint")
    parser.add_argument("--loss", required=True, help="PNG of the loss curve")
    args = parser.parse_args()
    report = run_report(args.run_dir)
    write_text(args.out, report)
    plot_evaluations(args.run_dir, args.plot)
    plot_loss(Path(args.run_dir) / "train" / "loss.csv", args.loss, title=f"training loss of {args.run_dir}")
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
