"""Aggregate the per-part licence filter reports."""

import argparse
import logging

from sdcore.prep.laion import summarize_filter


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", nargs="+", required=True, help="per-part JSON reports")
    parser.add_argument("--out", required=True, help="summary JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summarize_filter(args.reports, args.out)


if __name__ == "__main__":
    main()
