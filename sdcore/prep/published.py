"""The dataset MLCommons publishes for the benchmark, and a small stand-in laid out the same way.

Where it lives (mlcommons/training, stable_diffusion/scripts/datasets/*download*.sh, the rclone
era of the reference): bucket `mlcommons-training-wg-public` on Cloudflare R2 (endpoint below),
read through S3 with a read-only key pair printed in those scripts.

- `stable_diffusion/datasets/laion-400m/moments-webdataset-filtered/`: `00000.tar` ...
  `00831.tar` and `sha512sums.txt` (`<sha512>  <name>` lines, checked with `sha512sum -c`).
- `stable_diffusion/datasets/laion-400m/images-webdataset-filtered/`: the raw-image shards with
  their own `sha512sums.txt`, same names.
- `stable_diffusion/datasets/coco2014/val2014_30k.tsv` and `val2014_30k_stats.npz`; the reference
  scripts publish and check no checksum for these two.

The reference's current README replaced these rclone scripts with the MLCommons R2 Downloader
(`mlcommons/r2-downloader`: `*.uri` metadata files under https://training.mlcommons-storage.org,
Cloudflare Access, MD5 sums pulled from the bucket); whether the S3 key pair still works is not
established here.

A moment shard is what the reference's `webdataset_images2latents.py` makes of an img2dataset
shard: the shard extracted, each image replaced by `<key>.npy` (`np.save` of the VAE moments with
the batch axis kept: float32, shape (1, 8, 64, 64)), the `<key>.txt` caption and `<key>.json`
img2dataset metadata kept, and the directory re-packed with `tarfile.add(dir, arcname='')`: a
root directory entry first, then the members sorted by name (`<key>.json`, `<key>.npy`,
`<key>.txt`). `write_published_mirror` writes shards of that form.
"""

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdcore.files import atomic_path
from . import PrepError

log = logging.getLogger(__name__)

PUBLISHED_ENDPOINT = "https://c2686074cb2caf5cbaf6d134bdba8b47.r2.cloudflarestorage.com"
PUBLISHED_BUCKET = "mlcommons-training-wg-public"
DATASETS_PREFIX = "stable_diffusion/datasets"
MOMENTS_DIR = "laion-400m/moments-webdataset-filtered"
IMAGES_DIR = "laion-400m/images-webdataset-filtered"
COCO_DIR = "coco2014"
SHA512SUMS = "sha512sums.txt"
COCO_PROMPTS = "val2014_30k.tsv"
COCO_STATS = "val2014_30k_stats.npz"
MOMENT_SHARDS = 832
SAMPLES_PER_SHARD = 10_000  # img2dataset's number_sample_per_shard in the reference: keys are 5 + 4 digits

_SUM_LINE = re.compile(r"^([0-9a-fA-F]{128}) [ *](.+)$")
_MTIME = 1_690_000_000  # fixed member time stamps: the same inputs give byte-identical shards


def shard_names(count=MOMENT_SHARDS):
    """`00000.tar` ... the published shard names."""
    return [f"{i:05d}.tar" for i in range(count)]


def published_url(relative, bucket=PUBLISHED_BUCKET, prefix=DATASETS_PREFIX):
    """The s3:// URL of a file of the published layout, e.g. published_url('coco2014/val2014_30k.tsv')."""
    key = "/".join(p.strip("/") for p in (prefix, relative) if p and p.strip("/"))
    return f"s3://{bucket}/{key}"


# --- sha512sums.txt -------------------------------------------------------------------------

class Sha512Sums(Mapping):
    """Name -> lower-case sha512 hex, read from a `sha512sum` listing; remembers its file."""

    def __init__(self, digests, source):
        self._digests = dict(digests)
        self.source = str(source)

    def __getitem__(self, name):
        return self._digests[name]

    def __iter__(self):
        return iter(self._digests)

    def __len__(self):
        return len(self._digests)

    def lookup(self, name):
        """The expected sha512 of `name` (a file name, or a path/URL whose last part is listed)."""
        for candidate in (str(name), str(name).rsplit("/", 1)[-1]):
            if candidate in self._digests:
                return self._digests[candidate]
        raise PrepError(f"{self.source}: no sha512 listed for {name}")


def parse_sha512sums(text, source="<sha512sums>"):
    """Parse `sha512sum` output: `<128 hex> <space or *><name>` per line; blank lines are skipped.

    Names lose a leading `./`. A malformed line, or a name listed twice with different digests,
    raises PrepError naming the source and the line number.
    """
    digests = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SUM_LINE.match(line.rstrip("\r"))
        if match is None:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise PrepError(f"{source}:{number}: malformed sha512sum line (want '<128 hex digits>  <name>'): "
                            f"{shown!r}")
        digest, name = match.group(1).lower(), match.group(2)
        name = name[2:] if name.startswith("./") else name
        if digests.get(name, digest) != digest:
            raise PrepError(f"{source}:{number}: {name} listed again with a different sha512")
        digests[name] = digest
    return Sha512Sums(digests, source)


def load_sha512sums(path):
    """Read a `sha512sums.txt`; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PrepError(f"{path}: cannot read sha512 list: {err}") from err
    return parse_sha512sums(text, source=path)


def expected_sha512(sums, name):
    """The expected sha512 of `name` from a Sha512Sums or the path of a `sha512sums.txt`."""
    if not isinstance(sums, Sha512Sums):
        sums = load_sha512sums(sums)
    return sums.lookup(name)


def format_sha512sums(digests):
    """`sha512sum`-compatible text for {name: digest}, sorted by name."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def sha512_file(path):
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the stand-in ---------------------------------------------------------------------------

@dataclass
class PublishedMirror:
    """What write_published_mirror wrote. `files` maps paths relative to `root` to (size, sha512)."""

    root: Path
    moments_dir: Path
    coco_dir: Path
    shards: list
    files: dict = field(default_factory=dict)

    def relative(self, path):
        return Path(path).relative_to(self.root).as_posix()


def _member(name, data=None, directory=False):
    info = tarfile.TarInfo(name)
    info.mtime = _MTIME
    info.uname = info.gname = "root"
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        return info, None
    info.size, info.mode = len(data), 0o644
    return info, io.BytesIO(data)


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _sample_metadata(shard, index, key, caption, height, width, rng):
    """img2dataset's per-sample JSON (resize_mode=no, the reference's save_additional_columns)."""
    sample_id = int(shard * SAMPLES_PER_SHARD + index) * 7 + 12345
    licence = ("https://creativecommons.org/licenses/by/4.0/", "https://creativecommons.org/licenses/by-sa/4.0/",
               "https://creativecommons.org/licenses/by-nc/3.0/")[index % 3]
    return {
        "url": f"https://images.example.org/{sample_id}.jpg",
        "caption": caption,
        "SAMPLE_ID": sample_id,
        "LICENSE": licence,
        "NSFW": "UNLIKELY",
        "similarity": round(float(rng.uniform(0.3, 0.45)), 6),
        "WIDTH": width,
        "HEIGHT": height,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": "{}",
        "sha256": hashlib.sha256(f"image {key}".encode()).hexdigest(),
    }


def moment_shard_bytes(shard, samples, latent_size=(64, 64), seed=0, captions=None, root_entry=True):
    """The bytes of one published-style moment shard and its keys.

    Each sample: `<key>.json` (img2dataset metadata), `<key>.npy` (float32 (1, 8, h, w): channels
    0-3 a mean, 4-7 a log-variance), `<key>.txt` (the caption, UTF-8), keys `SSSSSIIII` as
    img2dataset names them; sorted by member name after a root directory entry, as the reference's
    re-packing does (`root_entry=False` leaves that entry out).
    """
    h, w = latent_size
    rng = np.random.default_rng([seed, shard])
    captions = list(captions) if captions is not None else None
    if captions is not None and len(captions) < samples:
        raise PrepError(f"shard {shard:05d}: {samples} samples but only {len(captions)} captions")
    members, keys = {}, []
    for index in range(samples):
        key = f"{shard:05d}{index:04d}"
        caption = captions[index] if captions is not None else f"synthetic sample {index} of shard {shard:05d}"
        mean = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        logvar = rng.uniform(-12.0, -4.0, size=(1, 4, h, w)).astype(np.float32)
        moments = np.concatenate([mean, logvar], axis=1)
        meta = _sample_metadata(shard, index, key, caption, 8 * h, 8 * w, rng)
        members[f"{key}.json"] = json.dumps(meta, indent=4).encode()
        members[f"{key}.npy"] = _npy_bytes(moments)
        members[f"{key}.txt"] = caption.encode("utf-8")
        keys.append(key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if root_entry:
            tar.addfile(*_member("", directory=True))
        for name in sorted(members):
            tar.addfile(*_member(name, members[name]))
    return buf.getvalue(), keys


def _write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _supplied_bytes(what, value):
    """Content the caller supplies: bytes as they are, str as UTF-8 text, a Path as that file's bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, os.PathLike):
        try:
            return Path(value).read_bytes()
        except OSError as err:
            raise PrepError(f"{value}: cannot read the {what}: {err}") from err
    raise PrepError(f"{what}: expected bytes, str or a path, got {type(value).__name__}")


def _stats_bytes(value):
    """The FID statistics: an {'mu', 'sigma'} mapping of arrays (saved with np.savez) or bytes/a path."""
    if isinstance(value, Mapping):
        missing = {"mu", "sigma"} - set(value)
        if missing:
            raise PrepError(f"{COCO_STATS}: the statistics need the keys mu and sigma (missing {sorted(missing)})")
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in value.items()})
        return buf.getvalue()
    if isinstance(value, str):
        raise PrepError(f"{COCO_STATS}: give the statistics as a mapping, bytes or a Path, not a str")
    return _supplied_bytes("FID statistics", value)


def write_published_mirror(out_dir, coco_prompts, coco_stats, shards=2, samples_per_shard=4,
                           latent_size=(64, 64), seed=0, captions=None, root_entry=True):
    """Lay out a small dataset in the published form under `out_dir`; return a PublishedMirror.

    out_dir/laion-400m/moments-webdataset-filtered/{00000..}.tar + sha512sums.txt
    out_dir/coco2014/val2014_30k.tsv, val2014_30k_stats.npz

    `out_dir` stands for `stable_diffusion/datasets/` in the bucket: uploading it under that
    prefix reproduces the published object keys. `coco_prompts` (bytes, str text, or a Path) and
    `coco_stats` (an {'mu', 'sigma'} mapping, bytes, or a Path) are the caller's content, written
    as given. `captions`, when given, is one list of captions per shard. Every file is written
    under a temporary name and renamed into place; `sha512sums.txt` is written after the shards
    it lists. The same arguments give byte-identical files.
    """
    root = Path(out_dir)
    moments_dir, coco_dir = root / MOMENTS_DIR, root / COCO_DIR
    if captions is not None and len(captions) != shards:
        raise PrepError(f"captions: one list per shard wanted ({shards}), got {len(captions)}")
    mirror = PublishedMirror(root=root, moments_dir=moments_dir, coco_dir=coco_dir, shards=[])
    digests = {}
    for shard, name in enumerate(shard_names(shards)):
        data, _ = moment_shard_bytes(shard, samples_per_shard, latent_size, seed,
                                     None if captions is None else captions[shard], root_entry)
        path = moments_dir / name
        _write_bytes(path, data)
        digests[name] = hashlib.sha512(data).hexdigest()
        mirror.shards.append(path)
        mirror.files[mirror.relative(path)] = (len(data), digests[name])
    sums = format_sha512sums(digests).encode()
    _write_bytes(moments_dir / SHA512SUMS, sums)
    mirror.files[mirror.relative(moments_dir / SHA512SUMS)] = (len(sums), hashlib.sha512(sums).hexdigest())
    for name, data in ((COCO_PROMPTS, _supplied_bytes("COCO prompts", coco_prompts)),
                       (COCO_STATS, _stats_bytes(coco_stats))):
        _write_bytes(coco_dir / name, data)
        mirror.files[mirror.relative(coco_dir / name)] = (len(data), hashlib.sha512(data).hexdigest())
    log.info("%s: published-style mirror with %d shards of %d samples", root, shards, samples_per_shard)
    return mirror

