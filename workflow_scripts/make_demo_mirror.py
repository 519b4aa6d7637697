"""Generate the demo mirror (LAION parts and images, COCO archives, tiny checkpoints) under --out.

The checkpoints are built for the model in --config (the merged pipeline config, or the demo
overrides alone: only `model.params` and `checkpoints.clip.arch` are read).
"""

import argparse
import logging
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml  # noqa: E402

from sdcore.prep.demo_mirror import make_mirror  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="mirror directory; MANIFEST.json is written there last")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--config", required=True, help="config YAML with model.params and checkpoints.clip.arch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(args.config) as f:
        config = yaml.safe_load(f)
    start = time.perf_counter()
    manifest = make_mirror(args.out, args.seed, config)
    logging.info("mirror of %d files in %.1f s: %s", len(manifest["files"]), time.perf_counter() - start,
                 manifest["counts"])


if __name__ == "__main__":
    main()
