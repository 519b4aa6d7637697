"""Resize the subset's COCO images to size x size bicubic PNGs (aspect not kept)."""

import argparse
import logging

from sdcore.prep.coco import resize_images


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tsv", required=True, help="prompt subset TSV")
    parser.add_argument("--images-dir", required=True, help="extracted val2014 images")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--marker", required=True, help="written after every image is in place")
    parser.add_argument("--workers", type=int, default=1, help="resizing processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resize_images(args.tsv, args.images_dir, args.out_dir, args.size, args.marker, args.workers)


if __name__ == "__main__":
    main()
