"""Benchmark (not a test): samples/s of the training data stream (sdcore.data.LatentShardSource).

Writes published-layout moment shards (sdcore.prep.published.write_published_mirror: (1, 8, 64, 64)
float32 moments, caption and img2dataset JSON per sample) into a temporary directory, then reads
the stream as the trainer does: batch 8, the real shuffle buffer (1000), shards resampled, with 1
and 4 DataLoader workers (and the in-process loader, 0 workers, for reference). The first batches
(shuffle buffer filling, worker start-up) are not timed; each setting is timed `--repeats` times,
alternating, and the best is kept. Goal: >= 3,000 samples/s per worker. With more workers than
cores the wall-clock rate per worker is bounded by the cores, so the rate per busy core is printed
too.

    python benchmarks/latent_loader.py [--shards 4 --per-shard 1500] [--batches 400] [--workers 1 4]
"""

import argparse
import itertools
import os
import tempfile
import time

from machine import MachineInfo  # benchmarks/machine.py; also puts the repository on sys.path

from sdcore.data import LatentShardSource
from sdcore.prep.published import write_published_mirror

GOAL_PER_WORKER = 3000.0
BATCH = 8
SHUFFLE_BUFFER = 1000


def write_shards(out_dir: str, shards: int, per_shard: int) -> list[str]:
    mirror = write_published_mirror(out_dir, coco_prompts="image_id\tid\tcaption\n",
                                    coco_stats={"mu": [0.0], "sigma": [[1.0]]}, shards=shards,
                                    samples_per_shard=per_shard, latent_size=(64, 64))
    return [str(p) for p in mirror.shards]


def rate(shards: list[str], workers: int, batches: int, warmup: int, seed: int) -> float:
    """Samples/s over `batches` batches after `warmup` ones."""
    source = LatentShardSource(shards, batch_size=BATCH, micro_batches_per_step=1,
                               block_steps=10 ** 9, shuffle_buffer=SHUFFLE_BUFFER, seed=seed, rank=0,
                               num_samples=0, num_workers=workers)
    stream = source.micro_batches(0)
    for batch in itertools.islice(stream, warmup):
        assert batch.moments.shape == (BATCH, 8, 64, 64)
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    seconds = time.perf_counter() - start
    stream.close()
    return batches * BATCH / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=1500, help="samples per shard (> the shuffle buffer)")
    parser.add_argument("--batches", type=int, default=400, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=150, help="untimed batches (fills the shuffle buffer)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    machine = MachineInfo.measure()
    machine.print()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="sdcore-loader-") as tmp:
        started = time.perf_counter()
        shards = write_shards(tmp, args.shards, args.per_shard)
        size = sum(os.path.getsize(s) for s in shards)
        print(f"\n{args.shards} published-layout shards x {args.per_shard} samples ((1, 8, 64, 64) float32 moments), "
              f"{size / 2**20:.0f} MiB, written in {time.perf_counter() - started:.1f} s (page cache warm)")
        print(f"stream: batch {BATCH}, shuffle buffer {SHUFFLE_BUFFER}, {args.warmup} untimed + {args.batches} "
              f"timed batches, best of {args.repeats}")
        best = {w: 0.0 for w in args.workers}
        for repeat in range(args.repeats):
            for workers in args.workers:
                best[workers] = max(best[workers], rate(shards, workers, args.batches, args.warmup, seed=repeat))
    print(f"\n| DataLoader workers | samples/s | per worker | per busy core (of {cores}) | goal >= {GOAL_PER_WORKER:.0f}/worker |")
    print("| --- | --- | --- | --- | --- |")
    for workers, samples_per_s in best.items():
        per_worker = samples_per_s / max(workers, 1)
        per_core = samples_per_s / min(max(workers, 1), cores)
        verdict = "meets" if per_core >= GOAL_PER_WORKER else "MISSES"
        label = f"{workers} (in-process)" if workers == 0 else str(workers)
        print(f"| {label} | {samples_per_s:,.0f} | {per_worker:,.0f} | {per_core:,.0f} | {verdict} |")


if __name__ == "__main__":
    main()
