"""Check an MLPerf log with the official compliance checker (training, ruleset 5.0.0).

Writes the checker's output and a verdict line to --out. Exit status 0 when the log passes, or
when in the closed division the quality target is the only failing check (a run that did not
converge, e.g. the demo's tiny random models); 1 for any other failure.
"""

import argparse
import sys

from sdcore.files import write_text
from sdcore.mlperf_log import RULESET, check_log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="mlperf.log of a run")
    parser.add_argument("--division", required=True, choices=["open", "closed"],
                        help="division to check (the log's submission_division is set to it in a copy)")
    parser.add_argument("--out", required=True, help="text report")
    args = parser.parse_args()
    result = check_log(args.log, args.division)
    report = (f"log: {args.log}\n"
              f"command: python -m mlperf_logging.compliance_checker --usage training --ruleset {RULESET} "
              f"(division {args.division})\n"
              f"--- checker output ---\n{result.output}"
              f"--- end of checker output ---\n"
              f"verdict ({args.division} division): {result.verdict}\n")
    write_text(args.out, report)
    print(report, end="")
    return 0 if result.passed or result.only_quality_failed else 1


if __name__ == "__main__":
    sys.exit(main())
