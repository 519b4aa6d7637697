"""Inception pool3 statistics (mu, sigma) of the resized COCO subset, for FID."""

import argparse

from sdcore.prep.coco import fid_stats
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images-dir", required=True, help="resized images from coco_resize.py")
    parser.add_argument("--tsv", required=True, help="prompt subset TSV (selects and orders the images)")
    parser.add_argument("--inception", required=True, help="Inception-v3 FID weights (pytorch-fid layout)")
    parser.add_argument("--out", required=True, help=".npz with keys mu, sigma")
    parser.add_argument("--batch-size", type=int, default=50, help="pytorch-fid's default, as the reference")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    setup_logging()
    fid_stats(args.images_dir, args.tsv, args.inception, args.out, args.batch_size, args.device)


if __name__ == "__main__":
    main()
