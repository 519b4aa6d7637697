"""Lay a submission's run logs out as the MLPerf tools expect and run them: the package checker, the
RCP checker and the result summarizer (sdcore.submission). Their verdicts and whole outputs go to
--reports/report.txt; a failing verdict (e.g. unconverged runs) is reported, not an error."""

import argparse
import sys

import yaml

from sdcore.submission import build_submission


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logs", nargs="+", required=True, help="the runs' final mlperf.log files, in run order")
    parser.add_argument("--system", required=True, help="YAML: division and system (submission.system of the config)")
    parser.add_argument("--package", required=True, help="submission folder to (re)write")
    parser.add_argument("--reports", required=True, help="folder of the tools' outputs and report.txt")
    args = parser.parse_args()
    with open(args.system) as f:
        config = yaml.safe_load(f)
    check = build_submission(args.logs, args.package, config, args.reports)
    print(check.report(), end="")
    for run in check.runs:
        print(f"verdict {run.name}: {run.verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
