"""Resize the subset's COCO images as the reference's coco-split-resize.py: size x size bicubic, aspect not
kept, JPEG under the original names."""

import argparse

from sdcore.prep.coco import resize_images
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tsv", required=True, help="prompt subset TSV")
    parser.add_argument("--images-dir", required=True, help="extracted val2014 images")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--marker", required=True, help="written after every image is in place")
    parser.add_argument("--workers", type=int, default=1, help="resizing processes")
    args = parser.parse_args()
    setup_logging()
    resize_images(args.tsv, args.images_dir, args.out_dir, args.size, args.marker, args.workers)


if __name__ == "__main__":
    main()
