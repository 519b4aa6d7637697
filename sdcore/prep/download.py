"""Fetch one file through fsspec with retries, resume, verification and an atomic rename.

Any fsspec URL works (https, file://, plain local paths; s3:// and others when the user installs
the backend). Bytes go to `<out>.part`; a later attempt, or a later run, continues that partial
file where the source can seek (HTTP Range requests), and restarts from byte 0 where it cannot.
The final name only ever holds a file that passed the size and checksum checks.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

import fsspec

from . import PrepError, atomic_output

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20


class ChecksumError(PrepError):
    """The downloaded bytes do not match the expected size or digest."""


def file_digests(path, algorithms):
    """Hex digests of a file for each hashlib algorithm name, computed in one pass."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _is_http(fs):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("http", "https") for p in protocols)


def _open_source(fs, path, offset):
    """Open the source positioned at `offset`; return (file, first_chunk, offset actually used).

    HTTP: a fresh download streams one GET (block_size=0); a resume uses fsspec's random-access
    file, whose reads are Range requests. A server that ignores Range, or gives no length, makes
    the first read or the seek fail with ValueError, and the download restarts from byte 0.
    """
    http = _is_http(fs)
    if offset:
        src = fs.open(path, "rb", **({"block_size": CHUNK_BYTES} if http else {}))
        try:
            src.seek(offset)
            return src, src.read(CHUNK_BYTES), offset
        except ValueError as err:
            src.close()
            log.warning("%s: cannot resume at byte %d (%s); restarting from 0", path, offset, err)
    src = fs.open(path, "rb", **({"block_size": 0} if http else {}))
    return src, src.read(CHUNK_BYTES), 0


def _fetch_into(fs, path, part, expected_size):
    """Append the rest of the source to `part` (or rewrite it when resuming is impossible)."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        log.warning("%s: partial file is larger than the expected %d bytes; restarting", part, expected_size)
        offset = 0
    if expected_size is not None and offset == expected_size:
        return
    start = time.monotonic()
    src, chunk, offset = _open_source(fs, path, offset)
    written = 0
    with src, open(part, "ab" if offset else "wb") as dst:
        while chunk:
            dst.write(chunk)
            written += len(chunk)
            chunk = src.read(CHUNK_BYTES)
    elapsed = max(time.monotonic() - start, 1e-9)
    log.info("%s: %d bytes from offset %d in %.1f s (%.1f MB/s)", path, written, offset, elapsed,
             written / elapsed / 1e6)


def _verify(part, url, out, size, sha256, md5):
    """Check size and digests of the finished partial file; return its sha256."""
    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{out} (from {url}): size mismatch: expected {size} bytes, got {actual_size}")
    digests = file_digests(part, ["sha256"] + (["md5"] if md5 else []))
    for name, expected in (("sha256", sha256), ("md5", md5)):
        if expected and digests[name] != expected.lower():
            raise ChecksumError(f"{out} (from {url}): {name} mismatch: expected {expected.lower()}, "
                                f"got {digests[name]}")
    return digests["sha256"]


def download(url, out, sha256=None, md5=None, size=None, retries=3, backoff_seconds=2.0):
    """Download `url` to `out`, verified and atomically; return the file's sha256.

    Transient errors are retried `retries` times with exponential backoff, each attempt resuming
    the partial file. A missing source fails at once. On a size or checksum mismatch the partial
    file is deleted and ChecksumError names the file with the expected and actual values. When no
    checksum is given, the computed sha256 goes to `<out>.sha256` so that it can be pinned later.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    fs, path = fsspec.core.url_to_fs(str(url))
    for attempt in range(retries + 1):
        try:
            _fetch_into(fs, path, part, size)
            break
        except FileNotFoundError as err:
            raise PrepError(f"{url}: source not found (wanted for {out})") from err
        except Exception as err:  # network and backend errors vary by fsspec implementation
            if attempt == retries:
                raise PrepError(f"{url}: download to {out} failed after {retries + 1} attempts: {err}") from err
            wait = backoff_seconds * 2**attempt
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", url, attempt + 1, err, wait)
            time.sleep(wait)
    try:
        digest = _verify(part, url, out, size, sha256, md5)
    except ChecksumError:
        part.unlink()
        raise
    if not (sha256 or md5):
        with atomic_output(out.with_name(out.name + ".sha256")) as tmp:
            tmp.write_text(f"{digest}  {out.name}\n")
        log.info("%s: no checksum given; sha256 %s written to %s.sha256", out, digest, out.name)
    os.replace(part, out)
    log.info("%s: complete, sha256 %s", out, digest)
    return digest
