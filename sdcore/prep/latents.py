"""Encode img2dataset image shards into VAE moment shards, as the reference's training data.

Per image (SPEC section 1): PIL -> RGB -> ToTensor() (values in [0, 1]; the reference never
rescales to [-1, 1]) -> bicubic Resize of the short side -> CenterCrop -> `quant_conv(encoder(x))`,
an (8, s/8, s/8) float32 array stored as `<key>.npy` beside the sample's `.txt` and `.json`; the
image itself is dropped. One output shard per input shard, same name.

The reference applied Resize to a tensor with torchvision 0.15 (NGC 22.12 container), whose
default for tensors was no antialiasing; `antialias=False` reproduces that, `True` is an option.
"""

import concurrent.futures
import io
import itertools
import logging
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from sdcore.autoencoder import SCALE_FACTOR
from sdcore.checkpoint import StableDiffusionCheckpoint
from sdcore.files import atomic_path, read_json, write_json
from . import PrepError, resolve_device

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff")
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # webdataset: key = path up to the first dot


def reference_transform(image_size, antialias=False):
    """The reference's preprocessing: ToTensor, bicubic Resize (short side), CenterCrop."""
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=antialias),
        transforms.CenterCrop(image_size),
    ])


def iter_tar_samples(path):
    """Yield webdataset samples {"__key__": key, ext: bytes, ...} from a tar, in key order.

    img2dataset writes a shard's samples as their downloads finish, so two fetches of the same rows
    order them differently; in key order (the parquet rows' order) the latent shard, and so the
    training stream of a seed, is the same after every fetch. A corrupt or truncated tar raises
    PrepError naming the shard.
    """
    try:
        with tarfile.open(path) as tar:
            members = {}
            for member in tar.getmembers():  # headers only: a seek per member
                match = _MEMBER_NAME.match(member.name)
                if member.isfile() and match is not None:
                    key, ext = match.groups()
                    members.setdefault(key, {})[ext] = member
            for key in sorted(members):
                sample = {"__key__": key, "__mtime__": min(m.mtime for m in members[key].values())}
                for ext, member in members[key].items():
                    sample[ext] = tar.extractfile(member).read()
                yield sample
    except (tarfile.TarError, EOFError, OSError) as err:
        raise PrepError(f"{path}: corrupt or truncated tar: {err}") from err


def _add_member(tar, name, data, mtime):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _chunks(iterable, size):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _decode(sample, transform):
    """The preprocessed image tensor of a sample, or a message saying why there is none."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return "no image member"
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            return transform(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _write_batch(out, vae, decoded, device):
    """Encode [(sample, image tensor)] as one batch; add <key>.npy and the non-image members to `out`."""
    moments = vae.moments(torch.stack([x for _, x in decoded]).to(device)).float().cpu().numpy()
    for (sample, _), m in zip(decoded, moments):
        key, mtime = sample["__key__"], sample["__mtime__"]
        _add_member(out, f"{key}.npy", _npy_bytes(m), mtime)
        for ext, data in sample.items():
            if not ext.startswith("__") and ext not in IMAGE_EXTENSIONS:
                _add_member(out, f"{key}.{ext}", data, mtime)


@torch.no_grad()
def encode_shard(in_tar, out_tar, vae, transform, batch_size, device, workers=1):
    """Encode one shard; return its report {samples_in, encoded, skipped: {key: error}}.

    Samples are taken `batch_size` at a time, their images decoded and preprocessed by `workers`
    threads (PIL and torch release the GIL), and encoded as one batch; an image that cannot be
    decoded is skipped and reported (that batch is then smaller). Output members per sample:
    <key>.npy, then every non-image member (.txt, .json) unchanged.
    """
    skipped = {}
    samples_in = encoded = 0
    with (concurrent.futures.ThreadPoolExecutor(workers) as pool,
          atomic_path(out_tar) as tmp, tarfile.open(tmp, "w") as out):
        for chunk in _chunks(iter_tar_samples(in_tar), batch_size):
            samples_in += len(chunk)
            decoded = []
            for sample, result in zip(chunk, pool.map(_decode, chunk, itertools.repeat(transform))):
                if isinstance(result, str):
                    skipped[sample["__key__"]] = result
                else:
                    decoded.append((sample, result))
            if decoded:
                _write_batch(out, vae, decoded, device)
                encoded += len(decoded)
    return {"samples_in": samples_in, "encoded": encoded, "skipped": skipped}


def _fingerprint(in_tar, checkpoint, image_size, antialias):
    """What a finished shard depends on; a shard whose report matches is not encoded again."""
    in_stat, ckpt_stat = os.stat(in_tar), os.stat(checkpoint)
    return {
        "input": os.path.abspath(in_tar), "input_bytes": in_stat.st_size, "input_mtime_ns": in_stat.st_mtime_ns,
        "checkpoint": os.path.abspath(checkpoint), "checkpoint_bytes": ckpt_stat.st_size,
        "checkpoint_mtime_ns": ckpt_stat.st_mtime_ns, "image_size": image_size, "antialias": antialias,
    }


def _expected_images(in_tar):
    """img2dataset's success count for the shard, when its NNNNN_stats.json is beside it."""
    stats = Path(in_tar).with_name(Path(in_tar).stem + "_stats.json")
    return read_json(stats)["successes"] if stats.exists() else None


def encode_manifest(manifest_path, out_dir, out_manifest, checkpoint, first_stage_params, image_size=512,
                    batch_size=32, device="auto", antialias=False, workers=1):
    """Encode every shard listed in an image manifest; write reports per shard and a manifest last.

    Shards whose report carries the same fingerprint (input, checkpoint, size) are kept from an
    earlier run, so an interrupted run resumes. The input tar must hold as many images as
    img2dataset reported for it; a shorter tar is an error naming the shard.
    """
    Image.MAX_IMAGE_PIXELS = None  # as the reference: LAION has very large images, all wanted
    in_manifest = read_json(manifest_path)
    in_dir = Path(manifest_path).parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    transform = reference_transform(image_size, antialias)
    vae = None
    shards, per_shard = [], {}
    latent_size = image_size // 2 ** (len(first_stage_params["ddconfig"]["ch_mult"]) - 1)
    for shard in in_manifest["shards"]:
        in_tar, out_tar = in_dir / shard, out_dir / shard
        report_path = out_dir / f"{Path(shard).stem}_report.json"
        fingerprint = _fingerprint(in_tar, checkpoint, image_size, antialias)
        if out_tar.exists() and report_path.exists() and read_json(report_path).get("fingerprint") == fingerprint:
            report = read_json(report_path)
            log.info("%s: already encoded, kept", out_tar)
        else:
            if vae is None:
                # moments() does not use the scale factor
                vae = StableDiffusionCheckpoint(checkpoint).vae(first_stage_params, SCALE_FACTOR).to(device)
            start = time.monotonic()
            report = encode_shard(in_tar, out_tar, vae, transform, batch_size, device, workers)
            elapsed = time.monotonic() - start
            expected = _expected_images(in_tar)
            if expected is not None and report["samples_in"] != expected:
                out_tar.unlink()
                raise PrepError(f"{in_tar}: holds {report['samples_in']} samples but img2dataset stored "
                                f"{expected}; truncated shard?")
            report.update(shard=shard, fingerprint=fingerprint, seconds=elapsed,
                          images_per_second=report["encoded"] / max(elapsed, 1e-9))
            write_json(report_path, report)
            log.info("%s: %d encoded, %d skipped, %.2f images/s (batch %d, %s)", out_tar, report["encoded"],
                     len(report["skipped"]), report["images_per_second"], batch_size, device)
        per_shard[shard] = {"encoded": report["encoded"], "skipped": len(report["skipped"])}
        if report["encoded"]:
            shards.append(shard)
    manifest = {
        "shards": shards,
        "samples": sum(s["encoded"] for s in per_shard.values()),
        "failed": sum(s["skipped"] for s in per_shard.values()),
        "image_size": image_size,
        "latent_shape": [2 * first_stage_params["embed_dim"], latent_size, latent_size],
        "per_shard": per_shard,
    }
    write_json(out_manifest, manifest)
    return manifest
