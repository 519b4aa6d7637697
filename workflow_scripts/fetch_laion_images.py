"""Download the images of one filtered LAION part with img2dataset (reference parameters)."""

import argparse

from sdcore.prep.laion import fetch_images
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--in", dest="inp", required=True, help="filtered parquet part")
    parser.add_argument("--out-dir", required=True, help="webdataset output directory")
    parser.add_argument("--manifest", required=True, help="manifest JSON, written last")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--samples-per-shard", type=int, required=True)
    parser.add_argument("--min-success-rate", type=float, required=True,
                        help="fail (with a summary of error kinds) below this fraction of stored images")
    parser.add_argument("--timeout", type=float, default=10, help="per-URL timeout in seconds")
    parser.add_argument("--retries", type=int, default=0, help="retries per URL")
    args = parser.parse_args()
    setup_logging()
    fetch_images(args.inp, args.out_dir, args.manifest, args.processes, args.threads, args.samples_per_shard,
                 args.min_success_rate, args.timeout, args.retries)


if __name__ == "__main__":
    main()
