"""Training data: latent-moment shards through webdataset, and the caption conditioner.

Each sample of a latent shard is ``<key>.npy`` (float32 VAE moments, mean then log-variance:
(8, h, w) as the rebuild chain writes them, or (1, 8, h, w) as in the MLCommons-published
shards) beside ``<key>.txt`` (its caption). Which shards make the training set is a *latent
index* file that a workflow rule writes (``{"shards": [...], "samples": N}``, shard paths relative
to the index), whatever the layout the shards came in.

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

Bad samples. A sample whose moments are not the model's latent shape (or not moments at all), whose
caption is not UTF-8, that lacks its ``.npy`` or ``.txt``, or that lies in a shard cut short (or
gone) is an error naming its shard and key (``BadSampleError``), by default. The trainer streams
with ``skip_bad_samples``: such a sample is left out of the stream *before* the shuffle buffer and
reported, as ``(shard, key, reason)``, with the next batch the stream yields (``LatentBatch.skipped``);
a truncated shard counts as one bad sample, keyed ``<truncated>``, its samples before the cut kept.
Where a bad sample is left out is a function of the data alone, so a resumed stream skips the same
samples at the same places, and the trainer's limit (``train.max_bad_samples``) decides from the
reports before a batch with a skip is trained on.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdcore.files import read_json

DATA_SEED_DOMAIN = 1  # keeps the data-stream seeds apart from the trainer's per-sample noise seeds
LOADER_SEED_DOMAIN = 3  # the DataLoader's own generator (the trainer's noise seeds are domain 2)
TRUNCATED_KEY = "<truncated>"  # the key under which a truncated or unreadable shard is reported
# A stream that skips bad samples gives up when this many come in a row without one readable sample
# between them (data that are all bad would otherwise be resampled forever).
MAX_BAD_IN_A_ROW = 1000


class SampleCaptions(list):
    """The captions of a batch (a plain ``list[str]`` to every caller) that also name their samples:
    ``keys[i]`` is the webdataset key of caption ``i`` and ``shards[i]`` the shard it was read from.

    Why a list that carries them: the trainer hands a conditioner ``batch.captions`` only, and a
    conditioner of precomputed embeddings (``sdcore.embeddings``) looks the contexts up by sample.
    """

    def __init__(self, captions=(), keys=None, shards=None):
        super().__init__(captions)
        self.keys = list(keys) if keys is not None else None
        self.shards = list(shards) if shards is not None else None
        for name, values in (("keys", self.keys), ("shards", self.shards)):
            if values is not None and len(values) != len(self):
                raise ValueError(f"SampleCaptions: {len(values)} {name} for {len(self)} captions")


@dataclass
class LatentBatch:
    """One micro-batch of a rank: VAE moments (B, 8, h, w) float32 and the captions; ``keys`` and
    ``shards`` (when the stream knows them) name each sample: its webdataset key and its shard."""

    moments: torch.Tensor
    captions: list[str]
    keys: list[str] | None = None
    shards: list[str] | None = None
    # (shard, key, reason) of the bad samples the stream left out since its previous batch
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.keys is not None and not isinstance(self.captions, SampleCaptions):
            self.captions = SampleCaptions(self.captions, self.keys, self.shards)

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> "LatentBatch":
        """Called by the DataLoader's pin-memory thread (CUDA runs) for faster host-to-device copies."""
        return LatentBatch(moments=self.moments.pin_memory(), captions=self.captions, keys=self.keys,
                           shards=self.shards, skipped=self.skipped)


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


def read_latent_index(path: str | os.PathLike) -> tuple[list[str], int]:
    """(absolute shard paths, number of samples) of a latent index file."""
    index = read_json(path)
    base = os.path.dirname(os.path.abspath(path))
    shards = [os.path.join(base, shard) for shard in index["shards"]]
    if not shards:
        raise ValueError(f"{path}: lists no latent shards")
    return shards, int(index["samples"])


# ---- reading shards ---------------------------------------------------------------------------
#
# What webdataset's ``tarfile_to_samples`` yields (``url_opener`` -> ``tar_file_expander`` ->
# ``group_by_keys``), the same samples in the same order, read about 3x faster: tar headers parsed
# with one struct call instead of tarfile's per-field Python, and the data of members the stream
# never decodes (the img2dataset ``.json``) skipped with a seek instead of read. Such members stay
# in the sample with the value None, so the grouping, and so the order, are webdataset's.

_DECODED_SUFFIXES = frozenset({"npy", "txt"})
_TAR_BLOCK = 512
_TAR_HEADER = struct.Struct("100s24x12s12x8sc100s6s2x32x32x8x8x155s12x")  # name size chksum type link magic prefix
_SIGNED_HEADER = struct.Struct("148b8x356b")
_REGULAR_TYPES = frozenset(b"0\x007")  # tarfile.REGULAR_TYPES without GNU sparse files (not written here)
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


class ShardReadError(ValueError):
    """A shard that is not a readable tar; the message names it."""


class BadSampleError(ValueError):
    """A training sample that cannot be used (or too many in a row); the message names its shard."""


def _tar_number(field: bytes, url: str) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    try:
        return int(field.rstrip(b"\x00 ").decode("ascii").strip() or "0", 8)
    except ValueError:
        raise ShardReadError(f"{url}: invalid tar header number {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tar_members(stream, url: str, wanted: frozenset = _DECODED_SUFFIXES):
    """(name, bytes or None) of the regular members of a plain tar stream, in order: bytes for
    members whose suffix is in ``wanted``, None for the others (skipped, never read)."""
    long_name = pax = None
    while True:
        header = stream.read(_TAR_BLOCK)
        if len(header) < _TAR_BLOCK:
            # tarfile accepts a file that ends without the end-of-archive blocks; every writer of
            # shards (tarfile, webdataset, GNU tar) writes them, so here it is a file cut short
            # at a member boundary: half a shard must not pass for a whole one
            raise ShardReadError(f"{url}: truncated: " + ("cut inside a tar header" if header.strip(b"\x00")
                                                          else "ends without the tar end-of-archive blocks"))
        if not header.strip(b"\x00"):
            return  # end-of-archive block
        name, size, chksum, kind, _, magic, prefix = _TAR_HEADER.unpack(header)
        stored = _tar_number(chksum, url)
        if stored != sum(header[:148]) + 256 + sum(header[156:]) and \
                stored != sum(_SIGNED_HEADER.unpack(header)) + 256:  # some writers sum signed bytes
            raise ShardReadError(f"{url}: bad tar header checksum")
        size = _tar_number(size, url)
        padded = -(-size // _TAR_BLOCK) * _TAR_BLOCK
        kind = kind[0]
        if kind in b"LxgK":  # GNU long name / pax header / global pax / GNU long link: read its data
            data = stream.read(padded)[:size]
            if kind == ord("L"):
                long_name = data.rstrip(b"\x00").decode("utf-8", "surrogateescape")
            elif kind == ord("x"):
                pax = _pax_records(data)
            continue
        if long_name is not None:
            path = long_name
        elif pax is not None and "path" in pax:
            path = pax["path"]
        else:
            path = name.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            if magic == b"ustar\x00" and prefix[:1] != b"\x00":  # POSIX ustar: prefix/name
                path = prefix.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape") + "/" + path
        if pax is not None and "size" in pax:
            size = int(pax["size"])
            padded = -(-size // _TAR_BLOCK) * _TAR_BLOCK
        long_name = pax = None
        if kind not in _REGULAR_TYPES:
            if padded:
                stream.seek(padded, os.SEEK_CUR)
            continue
        if "/" not in path and path.startswith("__") and path.endswith("__") or _META_NAME.match(path):
            stream.seek(padded, os.SEEK_CUR)
            continue
        match = _KEY_AND_SUFFIX.match(path)
        if match is not None and match.group(2).lower() in wanted:
            data = stream.read(size)  # not the padding: slicing it off would copy the member again
            if len(data) < size:
                raise ShardReadError(f"{url}: {path} is truncated")
            if padded != size:
                stream.seek(padded - size, os.SEEK_CUR)
            yield path, data
        else:
            stream.seek(padded, os.SEEK_CUR)
            yield path, None


def _shard_samples(sources, report_truncation: bool = False):
    """Samples ({"__key__", "__url__", suffix: bytes or None}) of the shards ``sources`` names
    (``{"url": path}`` dicts, as ResampledShards yields), grouped as webdataset groups them.

    A shard that is truncated or cannot be read raises ShardReadError naming it; with
    ``report_truncation`` the samples before the damage are yielded (the one being read when it was
    found included, for the decoder to judge) and then a marker ``{"__key__": TRUNCATED_KEY,
    "__url__": url, "__bad__": reason}`` instead."""
    for source in sources:
        url = source["url"]
        if "://" in url or url.startswith("pipe:"):  # not a local file: webdataset opens it
            yield from wds.tariterators.tarfile_samples([source])
            continue
        current = None
        damage = None
        try:
            with open(url, "rb") as stream:
                for path, data in _tar_members(stream, url):
                    match = _KEY_AND_SUFFIX.match(path)
                    if match is None:
                        continue
                    prefix, suffix = match.group(1), match.group(2).lower()
                    if current is None or prefix != current["__key__"]:
                        if current is not None:
                            yield current
                        current = {"__key__": prefix, "__url__": url}
                    if suffix in current:
                        raise ValueError(f"{path}: duplicate file name in tar file {suffix} {current.keys()}")
                    current[suffix] = data
        except ShardReadError as error:
            damage = error
        except OSError as error:
            damage = ShardReadError(f"{url}: cannot read shard: {error}")
            damage.__cause__ = error
        if damage is not None and not report_truncation:
            raise damage
        if current is not None:
            yield current
        if damage is not None:
            yield {"__key__": TRUNCATED_KEY, "__url__": url, "__bad__": str(damage)}


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int] | None] = {}


def _load_npy(data: bytes) -> np.ndarray:
    """``np.load`` of an .npy member, without parsing the same header text again for every sample
    (numpy parses it with ``ast``): the header of each distinct layout is parsed once, then the
    array is a view of the member's bytes."""
    if data[:6] == _NPY_MAGIC:
        header_len, start = ((int.from_bytes(data[8:10], "little"), 10) if data[6] == 1
                             else (int.from_bytes(data[8:12], "little"), 12))
        header = data[:start + header_len]
        layout = _npy_headers.get(header, False)
        if layout is False:
            try:
                parsed = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:])) if data[6] == 1 \
                    else np.lib.format.read_array_header_2_0(io.BytesIO(header[8:]))
                shape, fortran, dtype = parsed
                layout = None if fortran or dtype.hasobject else (dtype, shape, len(header))
            except ValueError:
                layout = None
            if len(_npy_headers) < 64:
                _npy_headers[header] = layout
        if layout is not None:
            dtype, shape, offset = layout
            count = math.prod(shape)
            if len(data) - offset == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode(sample: dict, latent_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, str]:
    """(moments (8, h, w) float32, caption) of a sample; BadSampleError naming its shard and key if
    it has no .npy or .txt, the .npy is not VAE moments (of ``latent_shape`` when given) or the
    caption is not UTF-8."""
    where = f"{sample.get('__url__', '?')}: {sample['__key__']}"
    if "__bad__" in sample:
        raise BadSampleError(sample["__bad__"])
    for suffix in ("npy", "txt"):
        if sample.get(suffix) is None:
            raise BadSampleError(f"{where}: the sample has no .{suffix}")
    try:
        moments = _load_npy(sample["npy"])
    except (ValueError, EOFError, OSError) as error:
        raise BadSampleError(f"{where}.npy is not a readable .npy array: {error}") from None
    if moments.ndim == 4 and moments.shape[0] == 1:  # the published shards' (1, 8, h, w)
        moments = moments[0]
    if moments.ndim != 3 or moments.shape[0] != 8 or latent_shape is not None and moments.shape != latent_shape:
        expected = f"{latent_shape}" if latent_shape is not None else "(8, h, w)"
        raise BadSampleError(f"{where}.npy has shape {moments.shape}, expected VAE moments {expected} "
                             "or (1, 8, h, w)")
    if moments.dtype.kind != "f":
        raise BadSampleError(f"{where}.npy has dtype {moments.dtype}, expected floating-point VAE moments")
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSampleError(f"{where}.txt is not valid UTF-8: {error}") from None
    return moments.astype(np.float32, copy=False), caption


def _decoded_samples(samples, latent_shape, skipped: list | None):
    """The stage before the shuffle buffer: each sample decoded (``{"__key__", "__url__", "moments",
    "caption"}``). A bad sample raises BadSampleError; with ``skipped`` (a list) it is left out and
    ``(shard, key, reason)`` appended there instead."""
    in_a_row = 0
    for sample in samples:
        try:
            moments, caption = _decode(sample, latent_shape)
        except BadSampleError as error:
            if skipped is None:
                raise
            skipped.append((sample.get("__url__", "?"), sample["__key__"], str(error)))
            in_a_row += 1
            if in_a_row >= MAX_BAD_IN_A_ROW:
                raise BadSampleError(f"{in_a_row} bad samples in a row, none readable; the last: {error}") from None
            continue
        in_a_row = 0
        yield {"__key__": sample["__key__"], "__url__": sample["__url__"], "moments": moments, "caption": caption}


def _as_is(batch: LatentBatch) -> LatentBatch:
    """The workers already batch; the DataLoader passes their batches through."""
    return batch


def _collate(samples: list[tuple[np.ndarray, str]], keys: list[str] | None = None,
             shards: list[str] | None = None, out: torch.Tensor | None = None) -> LatentBatch:
    """The batch of ``samples``; its moments stacked into ``out`` (a ring slot) when given."""
    moments = torch.empty((len(samples), *samples[0][0].shape), dtype=torch.float32) if out is None else out
    np.stack([m for m, _ in samples], out=moments.numpy())
    return LatentBatch(moments=moments, captions=[c for _, c in samples], keys=keys, shards=shards)


RING_SLOTS = 6  # > the batches in flight per worker: the DataLoader's prefetch (2), the one being received


class _MomentRing:
    """A worker's batches of moments in shared memory, allocated once per worker.

    Why: a fresh shared-memory tensor per batch (torch's way) costs a shm file, a copy into it and a
    file-descriptor hand-over through the worker's resource-sharer thread; with them a worker gave
    2,950 samples/s (2.7 ms per 1 MiB batch, 1.1 ms in-process). Here the slots cross to the main
    process once, with the worker's first batch; the main process copies each batch out of its slot
    and counts it ``released``. A worker reuses a slot only after its batch was released, so the main
    process never reads a slot being overwritten.
    """

    def __init__(self, batch_shape: tuple[int, ...], slots: int = RING_SLOTS):
        self.slots = torch.empty((slots, *batch_shape), dtype=torch.float32).share_memory_()
        self.released = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.written = 0
        self.parent = os.getppid()  # built in the worker: its main process

    def next_slot(self) -> int:
        """The slot for the next batch, once the batch that last used it was released."""
        while self.written - self.released.numpy()[0] >= len(self.slots):
            if os.getppid() != self.parent:  # the main process is gone: nobody will release a slot
                raise SystemExit(0)
            time.sleep(0.0002)
        slot = self.written % len(self.slots)
        self.written += 1
        return slot


@dataclass
class _RingBatch:
    """A worker's batch in flight: a LatentBatch whose moments wait in slot ``slot`` of the worker's
    ring (``ring`` is sent with the worker's first batch only)."""

    batch: LatentBatch
    worker: int
    slot: int
    ring: _MomentRing | None = None

    def receive(self, rings: dict[int, _MomentRing], pin_memory: bool) -> LatentBatch:
        """The batch with its own copy of the moments; the slot is released for the worker."""
        if self.ring is not None:
            rings[self.worker] = self.ring
        ring = rings[self.worker]
        slot = ring.slots[self.slot]
        moments = torch.empty_like(slot, pin_memory=pin_memory)
        moments.copy_(slot)
        ring.released.numpy()[0] += 1  # numpy: a tensor op costs more than the count
        self.batch.moments = moments
        return self.batch


WORKER_SWITCH_INTERVAL = 0.0002  # seconds; Python's default is 0.005


def _worker_init(worker_id: int) -> None:
    """A worker's batches leave through its queue's feeder thread, which has to win the GIL from the
    decoding thread first: with Python's default 5 ms switch interval a batch can wait that long."""
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL)


class _BlockStream(IterableDataset):
    """One block of one rank's stream, as seen by one DataLoader worker (see module docstring)."""

    def __init__(self, shards, batch_size, shuffle_buffer, seed, rank, block, skip, num_batches, num_roles,
                 latent_shape=None, skip_bad_samples=False):
        super().__init__()
        self.shards = shards
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank, self.block = seed, rank, block
        self.skip, self.num_batches, self.num_roles = skip, num_batches, num_roles
        self.latent_shape, self.skip_bad_samples = latent_shape, skip_bad_samples

    def __iter__(self) -> Iterator[LatentBatch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        role = (self.skip + worker) % self.num_roles
        role_skip = max(0, -(-(self.skip - role) // self.num_roles))
        role_batches = max(0, -(-(self.num_batches - role) // self.num_roles)) - role_skip
        seed = stream_seed(DATA_SEED_DOMAIN, self.seed, self.rank, self.block, role)
        skipped = [] if self.skip_bad_samples else None
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.shards, seed=seed, worker_seed=lambda: 0, deterministic=True),
            # = wds.tarfile_to_samples(), faster
            lambda sources: _shard_samples(sources, report_truncation=self.skip_bad_samples),
            lambda samples: _decoded_samples(samples, self.latent_shape, skipped),
            wds.shuffle(self.shuffle_buffer, seed=seed),
        )
        samples = iter(pipeline)
        for _ in range(role_skip * self.batch_size):
            next(samples)
        if skipped:  # left out of the batches skipped here: the attempt that trained them reported them
            skipped.clear()
        ring = None
        for _ in range(role_batches):
            batch = [next(samples) for _ in range(self.batch_size)]
            slot = None
            if info is not None:  # a DataLoader worker: the moments go through its ring
                new_ring = ring is None
                if new_ring:
                    ring = _MomentRing((self.batch_size, *batch[0]["moments"].shape))
                slot = ring.next_slot()
            out = _collate([(sample["moments"], sample["caption"]) for sample in batch],
                           keys=[sample["__key__"] for sample in batch],
                           shards=[sample["__url__"] for sample in batch],
                           out=None if slot is None else ring.slots[slot])
            if skipped:
                out.skipped = list(skipped)
                skipped.clear()
            if slot is None:
                yield out
            else:
                out.moments = torch.empty(0)  # the moments stay in the slot
                yield _RingBatch(out, worker, slot, ring if new_ring else None)


class LatentShardSource:
    """This rank's micro-batches from latent shards: resampled, shuffled, full batches only.

    ``latent_shape``: the moments' shape (8, h, w) the model takes; a sample of another is bad.
    ``skip_bad_samples``: leave bad samples out and report them in ``LatentBatch.skipped`` (the
    trainer's way, which bounds them) instead of raising BadSampleError naming the first.
    """

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
        latent_shape: tuple[int, ...] | None = None,
        skip_bad_samples: bool = False,
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
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.skip_bad_samples = skip_bad_samples

    def micro_batches(self, start_step: int) -> Iterator[LatentBatch]:
        block, step_in_block = divmod(start_step, self.block_steps)
        skip = step_in_block * self.micro_per_step
        per_block = self.block_steps * self.micro_per_step
        while True:
            stream = _BlockStream(
                self.shards, self.batch_size, self.shuffle_buffer, self.seed, self.rank,
                block, skip, per_block, max(1, self.num_workers), self.latent_shape, self.skip_bad_samples,
            )
            # A generator of its own: the loader's seed draw must not move the global torch RNG, which
            # the trainer saves in its state (fetching across a block boundary before a state save
            # would otherwise make a resumed run's RNG differ from an uninterrupted one's).
            generator = torch.Generator().manual_seed(stream_seed(LOADER_SEED_DOMAIN, self.seed, self.rank, block))
            loader = DataLoader(
                stream, batch_size=None, num_workers=self.num_workers,
                # workers' batches are pinned as they leave their ring (_RingBatch.receive)
                pin_memory=self.pin_memory and self.num_workers == 0, collate_fn=_as_is, worker_init_fn=_worker_init,
                generator=generator,
            )
            rings: dict[int, _MomentRing] = {}
            for batch in loader:
                yield batch.receive(rings, self.pin_memory) if isinstance(batch, _RingBatch) else batch
            block, skip = block + 1, 0
