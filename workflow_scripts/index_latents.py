"""Write the latent index of the training set (``{"shards": [...], "samples": N}``, shard paths
relative to the index): from the latent manifests of the rebuilt LAION parts (--manifests), or
from shards whose samples are counted here (--shards: the published moment shards)."""

import argparse
import logging
import os
import tarfile

from sdcore.files import read_json, write_json
from sdcore.logs import ProgressLog, setup_logging


def count_samples(shard: str) -> int:
    """Samples of a shard: its ``.npy`` members (tar headers only; the data are skipped, not read)."""
    try:
        with tarfile.open(shard, "r:") as tar:
            return sum(1 for member in tar if member.isfile() and member.name.endswith(".npy"))
    except (tarfile.TarError, OSError) as error:
        raise SystemExit(f"{shard}: not a readable tar: {error}") from error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifests", nargs="+", help="latents/<part>/manifest.json files")
    source.add_argument("--shards", nargs="+", help="shard files whose samples are counted")
    parser.add_argument("--out", required=True, help="latent index JSON")
    args = parser.parse_args()
    setup_logging()
    base = os.path.dirname(os.path.abspath(args.out))
    if args.manifests:
        shards, samples = [], 0
        for path in args.manifests:
            manifest = read_json(path)
            part_dir = os.path.dirname(os.path.abspath(path))
            shards += [os.path.join(part_dir, shard) for shard in manifest["shards"]]
            samples += manifest["samples"]
        layout = "rebuild"
    else:
        shards, samples, layout = [os.path.abspath(s) for s in args.shards], 0, "published"
        progress = ProgressLog("counting samples", len(shards), "shards")
        for shard in shards:
            samples += count_samples(shard)
            progress.update()
    if not shards:
        raise SystemExit("no latent shards")
    write_json(args.out, {"layout": layout, "shards": [os.path.relpath(s, base) for s in shards], "samples": samples})
    logging.info("%s: %d shards, %d samples", args.out, len(shards), samples)


if __name__ == "__main__":
    main()
