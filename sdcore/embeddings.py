"""Precomputed text embeddings: every caption of the training shards encoded once by the frozen text
encoder, then looked up by sample during training (what the fastest MLPerf submissions do).

The side store. One safetensors file per latent shard, ``<shard>.ctx.safetensors``, beside an
index ``embeddings.json`` that maps each shard of the latent index to its file. A file holds the
tensor ``contexts`` (N, 77, width), the shard's samples in shard order, and in its metadata the
sample keys, a CRC-32 of each caption and of each context row, and how they were made (encoder
arch, checkpoint name and size, precision, batch size, device, threads). Why side files and not new
members in copies of the shards: the moment shards stay the published (sha512-listed) or rebuilt
artifacts, untouched; no copy of their moments (131 KB per sample) is made beside contexts that are
larger still (315 KB per sample in fp32: 2 TB for the 6.5 M samples); one file per shard can be
made, checked and redone on its own; and safetensors reads one row without reading the file (it is
memory-mapped). Every file is written under a temporary name and renamed (``sdcore.files``), the
index last, after the files it lists.

Bitwise equal to encoding online. The trainer encodes each micro-batch of ``train.batch_size``
captions under the autocast of ``train.precision``; the result of a caption is the same whatever
the other captions of its batch, but not whatever the batch *size* (the GEMMs' blocking depends on
the row count). So the captions are encoded here in batches of exactly ``train.batch_size`` (the
last one padded by repeating its last caption) under the same autocast, and the stored rows are the
very values the online encoder gives, on a device of the same type. ``PrecomputedTextConditioner``
checks the store's precision and batch size against the run's config, and each row's CRC and its
caption's CRC at lookup, so a store made for other settings, other shards, or damaged on disk fails
with a message naming the file.

The data stream names each sample: ``LatentBatch.captions`` is a ``sdcore.data.SampleCaptions``
whose ``keys`` and ``shards`` are each caption's webdataset key and shard, in the stream's order.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sdcore.data import _shard_samples, read_latent_index
from sdcore.files import atomic_path, read_json, write_json
from sdcore.precision import FastPaths

log = logging.getLogger(__name__)

FORMAT = "sdcore-text-embeddings-1"
SIDE_SUFFIX = ".ctx.safetensors"
CONTEXTS = "contexts"


class EmbeddingError(ValueError):
    """A missing, corrupt or mismatched embedding file or index; the message names it."""


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _row_crc(row: torch.Tensor) -> int:
    return _crc(row.contiguous().numpy().tobytes())


def side_file_name(shard_relative: str) -> str:
    """The embedding file of a shard named ``shard_relative`` in the latent index (path separators
    flattened, so shards of different parts, all named 00000.tar, get different files)."""
    stem = shard_relative.removesuffix(".tar").replace("\\", "/").strip("/")
    return stem.replace("../", "up.").replace("/", "__") + SIDE_SUFFIX


def shard_captions(shard: str) -> tuple[list[str], list[str]]:
    """(keys, captions) of a shard's samples in shard order, read as the training stream reads them."""
    keys, captions = [], []
    for sample in _shard_samples([{"url": shard}]):
        if sample.get("txt") is None:
            raise EmbeddingError(f"{shard}: sample {sample['__key__']} has no caption (.txt)")
        keys.append(sample["__key__"])
        captions.append(sample["txt"].decode("utf-8"))
    return keys, captions


@dataclass(frozen=True)
class EncodeSettings:
    """How the contexts are made; they must be the run's for the lookup to equal online encoding."""

    precision: str          # train.precision: the autocast the trainer encodes under
    batch_size: int         # train.batch_size: the per-rank micro-batch the trainer encodes
    arch: str               # text encoder arch (model.params.cond_stage_config.params.arch)
    checkpoint: str = ""    # SD checkpoint file name the encoder weights came from
    checkpoint_bytes: int = -1

    def as_metadata(self) -> dict:
        return {"precision": self.precision, "batch_size": self.batch_size, "arch": self.arch,
                "checkpoint": self.checkpoint, "checkpoint_bytes": self.checkpoint_bytes}


@torch.no_grad()
def encode_captions(text_encoder: torch.nn.Module, captions: Sequence[str], settings: EncodeSettings,
                    device: torch.device) -> torch.Tensor:
    """(N, 77, width) contexts of ``captions`` on the CPU, encoded as the trainer encodes them:
    ``FrozenTextConditioner`` under the autocast of ``settings.precision``, ``settings.batch_size``
    captions at a time (the last batch padded with copies of its last caption)."""
    from sdcore.data import FrozenTextConditioner

    conditioner = FrozenTextConditioner(text_encoder)
    fast = FastPaths.from_config({}, settings.precision)
    rows = []
    for start in range(0, len(captions), settings.batch_size):
        batch = list(captions[start:start + settings.batch_size])
        real = len(batch)
        batch += [batch[-1]] * (settings.batch_size - real)
        with fast.autocast_context(device):
            rows.append(conditioner(batch, device)[:real].cpu())
    return torch.cat(rows) if rows else torch.empty(0)


def write_shard_embeddings(shard: str, out_path, text_encoder: torch.nn.Module, settings: EncodeSettings,
                           device: torch.device) -> int:
    """Encode every caption of ``shard`` into ``out_path`` (atomically); returns the number of samples."""
    from safetensors.torch import save_file

    keys, captions = shard_captions(shard)
    if not keys:
        raise EmbeddingError(f"{shard}: no samples")
    if len(set(keys)) != len(keys):
        raise EmbeddingError(f"{shard}: a sample key occurs twice")
    contexts = encode_captions(text_encoder, captions, settings, device).contiguous()
    metadata = {"format": FORMAT, "shard": os.path.basename(shard), "keys": json.dumps(keys),
                "caption_crc32": json.dumps([_crc(c.encode("utf-8")) for c in captions]),
                "row_crc32": json.dumps([_row_crc(row) for row in contexts]),
                "device": torch.device(device).type, "threads": str(torch.get_num_threads()),
                "settings": json.dumps(settings.as_metadata(), sort_keys=True)}
    with atomic_path(out_path) as tmp:
        save_file({CONTEXTS: contexts}, str(tmp), metadata=metadata)
    return len(keys)


def encode_latent_index(latent_index, out_index, text_encoder: torch.nn.Module, settings: EncodeSettings,
                        device, shards: Sequence[int] | None = None) -> dict:
    """Encode the captions of every shard of ``latent_index`` into side files beside ``out_index``,
    then write ``out_index`` (the embeddings index). Files that exist and were made with the same
    settings for the same shard are kept (a rerun after an interruption only does the rest).
    ``shards`` restricts the work to those shard positions and writes no index (for parallel jobs;
    a final call without it writes the index)."""
    device = torch.device(device)
    shard_paths, samples = read_latent_index(latent_index)
    latent_base = os.path.dirname(os.path.abspath(latent_index))
    out_base = Path(os.path.abspath(out_index)).parent
    entries = {}
    todo = range(len(shard_paths)) if shards is None else shards
    for position in todo:
        shard = shard_paths[position]
        relative = os.path.relpath(shard, latent_base)
        side = out_base / side_file_name(relative)
        if side.exists() and _made_with(side, settings, shard):
            log.info("%s: kept (already made with these settings)", side)
        else:
            count = write_shard_embeddings(shard, side, text_encoder, settings, device)
            log.info("%s: %d contexts of %s", side, count, shard)
        entries[os.path.relpath(shard, out_base)] = side.name
    index = {"format": FORMAT, "latent_index": os.path.relpath(os.path.abspath(latent_index), out_base),
             "samples": samples, "settings": settings.as_metadata(), "shards": entries}
    if shards is None:
        write_json(out_index, index)
    return index


def _side_metadata(path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except FileNotFoundError:
        raise EmbeddingError(f"{path}: embedding file missing") from None
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise EmbeddingError(f"{path}: corrupt embedding file: {error}") from error


def _made_with(side, settings: EncodeSettings, shard: str) -> bool:
    try:
        metadata = _side_metadata(side)
    except EmbeddingError:
        return False
    return (metadata.get("format") == FORMAT and metadata.get("shard") == os.path.basename(shard)
            and json.loads(metadata.get("settings", "{}")) == settings.as_metadata())


class _SideFile:
    """One shard's embedding file, opened (memory-mapped) on first use."""

    def __init__(self, path: Path, shard: str):
        self.path, self.shard = path, shard
        self.handle = None

    def open(self):
        from safetensors import safe_open

        if self.handle is None:
            metadata = _side_metadata(self.path)
            try:
                handle = safe_open(str(self.path), framework="pt")
                if metadata.get("format") != FORMAT:
                    raise EmbeddingError(f"{self.path}: not an sdcore text-embedding file "
                                         f"(format {metadata.get('format')!r})")
                keys = json.loads(metadata["keys"])
                self.rows = {key: row for row, key in enumerate(keys)}
                self.caption_crc = json.loads(metadata["caption_crc32"])
                self.row_crc = json.loads(metadata["row_crc32"])
                self.contexts = handle.get_slice(CONTEXTS)
                shape = self.contexts.get_shape()
            except EmbeddingError:
                raise
            except Exception as error:
                raise EmbeddingError(f"{self.path}: corrupt embedding file: {error}") from error
            if len(shape) != 3 or shape[0] != len(keys) or len(self.caption_crc) != len(keys) \
                    or len(self.row_crc) != len(keys):
                raise EmbeddingError(f"{self.path}: corrupt embedding file: {shape[0] if shape else '?'} rows, "
                                     f"{len(keys)} keys")
            self.handle = handle
        return self

    def context(self, key: str, caption: str) -> torch.Tensor:
        self.open()
        row = self.rows.get(key)
        if row is None:
            raise EmbeddingError(f"{self.path}: no embedding for sample {key} of {self.shard}")
        if _crc(caption.encode("utf-8")) != self.caption_crc[row]:
            raise EmbeddingError(f"{self.path}: sample {key} was encoded from another caption than the one in "
                                 f"{self.shard}: the store was made from other shards")
        try:
            context = self.contexts[row]
        except Exception as error:
            raise EmbeddingError(f"{self.path}: corrupt embedding file: {error}") from error
        if _row_crc(context) != self.row_crc[row]:
            raise EmbeddingError(f"{self.path}: corrupt embedding file: the context of sample {key} fails its CRC")
        return context


class PrecomputedTextConditioner:
    """A ``sdcore.data.Conditioner`` that looks each sample's context up in the side store of
    ``index_path`` instead of running the text encoder. Its captions must name their samples
    (``sdcore.data.SampleCaptions``, as ``LatentShardSource`` makes them).

    ``precision`` and ``batch_size``, when given (the run's ``train.precision`` and
    ``train.batch_size``), must be the store's: otherwise the contexts would not be the ones online
    encoding gives, and construction fails. Every listed file must exist (checked here; each is
    opened on first use).
    """

    def __init__(self, index_path, precision: str | None = None, batch_size: int | None = None):
        self.index_path = Path(index_path)
        try:
            index = read_json(self.index_path)
        except FileNotFoundError:
            raise EmbeddingError(f"{self.index_path}: embeddings index missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise EmbeddingError(f"{self.index_path}: corrupt embeddings index: {error}") from error
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise EmbeddingError(f"{self.index_path}: not an sdcore embeddings index")
        self.settings = index["settings"]
        for name, wanted in (("precision", precision), ("batch_size", batch_size)):
            if wanted is not None and self.settings[name] != wanted:
                raise EmbeddingError(f"{self.index_path}: contexts encoded with {name} {self.settings[name]!r}, but "
                                     f"the run uses {wanted!r}: re-encode them (encode_text_embeddings.py)")
        base = Path(os.path.abspath(self.index_path)).parent
        self.files: dict[str, _SideFile] = {}
        for shard, side in index["shards"].items():
            shard_path = os.path.normpath(os.path.join(base, shard))
            side_path = base / side
            if not side_path.exists():
                raise EmbeddingError(f"{side_path}: embedding file missing (listed in {self.index_path})")
            self.files[shard_path] = _SideFile(side_path, shard_path)

    def _file(self, shard: str) -> _SideFile:
        side = self.files.get(os.path.normpath(os.path.abspath(shard)))
        if side is None:
            raise EmbeddingError(f"{self.index_path}: lists no embeddings for shard {shard}")
        return side

    def __call__(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        keys, shards = getattr(captions, "keys", None), getattr(captions, "shards", None)
        if keys is None or shards is None:
            raise EmbeddingError("precomputed text embeddings need captions that name their samples "
                                 "(sdcore.data.SampleCaptions: a LatentShardSource stream)")
        contexts = [self._file(shard).context(key, caption) for caption, key, shard in zip(captions, keys, shards)]
        return torch.stack(contexts).to(device)


def conditioner_factory(index_path):
    """A ``Factories.conditioner`` for ``sdcore.training.trainer``: the precomputed store of
    ``index_path``, checked against the run's precision and batch size."""

    def build(config: dict, env, inputs) -> PrecomputedTextConditioner:
        train = config["train"]
        return PrecomputedTextConditioner(index_path, precision=train["precision"], batch_size=train["batch_size"])

    return build


def encode_for_config(config: dict, latent_index, sd_checkpoint, out_index, device="cpu",
                      shards: Sequence[int] | None = None) -> dict:
    """The embeddings of a run's config: the text encoder of ``sd_checkpoint``
    (``model.params.cond_stage_config.params``), encoded at ``train.precision`` in batches of
    ``train.batch_size`` (what ``encode_latent_index`` needs for bitwise equality)."""
    from sdcore.checkpoint import StableDiffusionCheckpoint

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    params = config["model"]["params"]["cond_stage_config"]["params"]
    settings = EncodeSettings(precision=config["train"]["precision"], batch_size=int(config["train"]["batch_size"]),
                              arch=params["arch"], checkpoint=os.path.basename(str(sd_checkpoint)),
                              checkpoint_bytes=os.path.getsize(sd_checkpoint))
    encoder = StableDiffusionCheckpoint(sd_checkpoint).text_encoder(params).to(device)
    return encode_latent_index(latent_index, out_index, encoder, settings, device, shards)
