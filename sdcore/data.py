"""Training data: latent-moment shards through webdataset, and the caption conditioner.

Each sample of a latent shard is ``<key>.npy`` (float32 (8, h, w): VAE mean then log-variance)
beside ``<key>.txt`` (its caption), as written by the latent-encoding stage.

Exact resumption without snapshotting a loader. The stream of one rank is cut into *blocks*
of ``block_steps`` optimizer steps (the trainer uses its checkpoint interval). Every block is
produced by a fresh webdataset pipeline (shards resampled with replacement, shuffle buffer)
whose seeds depend only on (seed, rank, block, loader role), so the micro-batches of step ``s``
are a pure function of ``s``. A run resumed at step ``s`` starts block ``s // block_steps`` and
skips the micro-batches before ``s`` inside it; the skip happens before decoding, so it costs
reading the tar bytes only. Ranks get distinct seeds, so they draw different shards and orders.

With ``num_workers`` DataLoader workers, the loader hands out batches round-robin from worker
0 upwards. Worker ``w`` therefore plays the *role* ``(skip + w) % num_workers`` of the block's
stream: role ``r`` yields the block's micro-batches ``r, r + W, r + 2W, ...``. After skipping,
worker 0 is the one holding the next micro-batch, so the order is the same as a run that never
stopped.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

DATA_SEED_DOMAIN = 1  # keeps the data-stream seeds apart from the trainer's per-sample noise seeds


@dataclass
class LatentBatch:
    """One micro-batch of a rank: VAE moments (B, 8, h, w) float32 and the captions."""

    moments: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> "LatentBatch":
        """Called by the DataLoader's pin-memory thread (CUDA runs) for faster host-to-device copies."""
        return LatentBatch(moments=self.moments.pin_memory(), captions=self.captions)


class MicroBatchSource(Protocol):
    """Where the trainer's micro-batches come from (the latent shards, or a test's fixed data)."""

    num_samples: int  # size of the training set, for the MLPerf log's train_samples

    def micro_batches(self, start_step: int) -> Iterator[LatentBatch]:
        """This rank's micro-batches from optimizer step ``start_step`` on, endlessly."""
        ...


class Conditioner(Protocol):
    """Turns a batch's captions into the UNet's cross-attention context (B, 77, context_dim).

    The seam for precomputed text embeddings: a conditioner that looks the embeddings up
    instead of running the text encoder can replace ``FrozenTextConditioner``.
    """

    def __call__(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        ...


class FrozenTextConditioner:
    """Runs the frozen OpenCLIP text tower (penultimate layer + ln_final) on the captions."""

    def __init__(self, text_encoder: torch.nn.Module):
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        tokens = self.text_encoder.tokenize(list(captions)).to(device)
        return self.text_encoder(tokens)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def shard_paths(manifests: Sequence[str | os.PathLike]) -> list[str]:
    """Absolute shard paths of the latent manifests (``{"shards": [...]}``, names relative to the manifest)."""
    paths: list[str] = []
    for manifest in manifests:
        with open(manifest) as f:
            shards = json.load(f)["shards"]
        base = os.path.dirname(os.path.abspath(manifest))
        paths.extend(os.path.join(base, shard) for shard in shards)
    if not paths:
        raise ValueError(f"no latent shards listed in {list(manifests)}")
    return paths


def _decode(sample: dict) -> tuple[np.ndarray, str]:
    moments = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    return moments.astype(np.float32, copy=False), sample["txt"].decode("utf-8")


def _as_is(batch: LatentBatch) -> LatentBatch:
    """The workers already batch; the DataLoader passes their batches through."""
    return batch


def _collate(samples: list[tuple[np.ndarray, str]]) -> LatentBatch:
    moments = torch.from_numpy(np.stack([m for m, _ in samples]))
    return LatentBatch(moments=moments, captions=[c for _, c in samples])


class _BlockStream(IterableDataset):
    """One block of one rank's stream, as seen by one DataLoader worker (see module docstring)."""

    def __init__(self, shards, batch_size, shuffle_buffer, seed, rank, block, skip, num_batches, num_roles):
        super().__init__()
        self.shards = shards
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank, self.block = seed, rank, block
        self.skip, self.num_batches, self.num_roles = skip, num_batches, num_roles

    def __iter__(self) -> Iterator[LatentBatch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        role = (self.skip + worker) % self.num_roles
        role_skip = max(0, -(-(self.skip - role) // self.num_roles))
        role_batches = max(0, -(-(self.num_batches - role) // self.num_roles)) - role_skip
        seed = stream_seed(DATA_SEED_DOMAIN, self.seed, self.rank, self.block, role)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.shards, seed=seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, seed=seed),
        )
        samples = iter(pipeline)
        for _ in range(role_skip * self.batch_size):
            next(samples)
        for _ in range(role_batches):
            yield _collate([_decode(next(samples)) for _ in range(self.batch_size)])


class LatentShardSource:
    """This rank's micro-batches from latent shards: resampled, shuffled, full batches only."""

    def __init__(
        self,
        shards: Sequence[str],
        batch_size: int,
        micro_batches_per_step: int,
        block_steps: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        num_samples: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.shards = list(shards)
        self.batch_size = batch_size
        self.micro_per_step = micro_batches_per_step
        self.block_steps = block_steps
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank = seed, rank
        self.num_samples = num_samples
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def micro_batches(self, start_step: int) -> Iterator[LatentBatch]:
        block, step_in_block = divmod(start_step, self.block_steps)
        skip = step_in_block * self.micro_per_step
        per_block = self.block_steps * self.micro_per_step
        while True:
            stream = _BlockStream(
                self.shards, self.batch_size, self.shuffle_buffer, self.seed, self.rank,
                block, skip, per_block, max(1, self.num_workers),
            )
            loader = DataLoader(
                stream, batch_size=None, num_workers=self.num_workers,
                pin_memory=self.pin_memory, collate_fn=_as_is,
            )
            yield from loader
            block, skip = block + 1, 0
