"""Write the COCO-2014 prompt subset TSV (image_id, id, caption) exactly as the reference."""

import argparse

from sdcore.prep.coco import write_subset
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--annotations", required=True, help="captions_val2014.json")
    parser.add_argument("--out", required=True, help="TSV")
    parser.add_argument("--size", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args()
    setup_logging()
    write_subset(args.annotations, args.out, args.size, args.seed)


if __name__ == "__main__":
    main()
