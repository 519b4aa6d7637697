"""Print (and save) the readable summary of a finished training run: samples/s, loss curve,
FID/CLIP per checkpoint, the MLPerf log's path and the compliance checker's verdict."""

import argparse
import os
import sys

from sdcore.train import run_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = run_report(args.run_dir)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(report)
    os.replace(tmp, args.out)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
