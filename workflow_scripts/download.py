"""Download one file (any fsspec URL or local path) with retries, resume and verification."""

import argparse
import logging

from sdcore.prep.download import download


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="fsspec URL (https://, file://, s3://, ...) or local path")
    parser.add_argument("--out", required=True, help="destination file (written atomically)")
    parser.add_argument("--sha256", help="expected sha256 (hex)")
    parser.add_argument("--md5", help="expected md5 (hex)")
    parser.add_argument("--size", type=int, help="expected size in bytes")
    parser.add_argument("--retries", type=int, default=3, help="retries after the first attempt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    download(args.url, args.out, sha256=args.sha256 or None, md5=args.md5 or None, size=args.size,
             retries=args.retries)


if __name__ == "__main__":
    main()
