"""Filter one LAION metadata part by licence and write a JSON report."""

import argparse

from sdcore.prep.laion import FILTER_MODES, filter_part
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--in", dest="inp", required=True, help="metadata parquet part")
    parser.add_argument("--out", required=True, help="filtered parquet")
    parser.add_argument("--report", required=True, help="JSON report (rows in, rows kept, licences)")
    parser.add_argument("--mode", choices=FILTER_MODES, default="reference",
                        help="reference: LICENSE != '?' (the reference); cc-by: creativecommons.org/licenses/by/ only")
    args = parser.parse_args()
    setup_logging()
    filter_part(args.inp, args.out, args.report, args.mode)


if __name__ == "__main__":
    main()
