"""Aggregate the per-part licence filter reports."""

import argparse

from sdcore.prep.laion import summarize_filter
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", nargs="+", required=True, help="per-part JSON reports")
    parser.add_argument("--out", required=True, help="summary JSON")
    args = parser.parse_args()
    setup_logging()
    summarize_filter(args.reports, args.out)


if __name__ == "__main__":
    main()
