"""Extract the members of a zip under a prefix, safely and atomically (marker file last)."""

import argparse

from sdcore.prep.coco import extract_zip
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zip", required=True)
    parser.add_argument("--member-prefix", required=True,
                        help="e.g. 'val2014/' or 'annotations/captions_val2014.json'; its directory part is dropped")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--marker", required=True, help="written after every member is in place")
    args = parser.parse_args()
    setup_logging()
    extract_zip(args.zip, args.member_prefix, args.out_dir, args.marker)


if __name__ == "__main__":
    main()
