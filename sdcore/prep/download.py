"""Fetch one file through fsspec with retries, resume, verification and an atomic rename.

Any fsspec URL works: https, file://, plain local paths, and s3:// through s3fs (any
S3-compatible store: AWS, Cloudflare R2, MinIO, moto; see `s3_storage_options`). Bytes go to
`<out>.part`; a later attempt, or a later run, continues that partial file where the source can
seek (HTTP Range requests, S3 ranged GETs, local files), and restarts from byte 0 where it cannot.
The final name only ever holds a file that passed the size and checksum checks (sha256, sha512,
md5).

Long downloads report progress as one log line (bytes done, total when known, rate, ETA) at most
every `progress_seconds`; the job logs are files, so nothing is redrawn in place.

Failures raise PrepError (or its subclass ChecksumError) with a one-line message naming what
failed: a missing source fails at once, naming the URL; denied access fails at once; an
unreachable endpoint fails after the configured retries, naming the endpoint; a checksum or size
mismatch names the file with the expected and actual values and leaves no file behind. No
message ever holds an S3 secret.
"""

import hashlib
import logging
import os
import time
import urllib.parse
from pathlib import Path

import fsspec

from sdcore.files import atomic_path
from . import PrepError

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
PROGRESS_SECONDS = 5.0
DIGESTS = ("sha256", "sha512", "md5")

# Exception classes (matched by name along the cause chain, so that no backend must be imported)
# that mean the endpoint could not be reached at all, as opposed to a failure mid-transfer.
_UNREACHABLE = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError",  # botocore
    "ClientConnectorError", "ClientConnectorDNSError", "ServerTimeoutError",   # aiohttp
    "ConnectionRefusedError", "gaierror",                                      # stdlib
})


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


# --- S3 -------------------------------------------------------------------------------------

def resolve_s3_credentials(access_key_id=None, secret_access_key=None, session_token=None, environ=None):
    """The S3 credentials to use and where each came from; never logs or returns the secret in text.

    Precedence, for each of the access key id, the secret and the session token separately: the
    explicit argument (a command-line flag) when given, else the environment variable
    (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`). When neither the key id
    nor the secret is found, (None, None, None, "default chain") is returned and botocore's own
    chain applies (AWS_PROFILE, ~/.aws/credentials, instance roles). Finding only one of the pair
    is an error. Returns (key, secret, token, source), source one of "flags", "environment",
    "flags+environment", "default chain".
    """
    environ = os.environ if environ is None else environ
    picked, sources = {}, set()
    for name, given, variable in (("key", access_key_id, "AWS_ACCESS_KEY_ID"),
                                  ("secret", secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                                  ("token", session_token, "AWS_SESSION_TOKEN")):
        if given:
            picked[name] = given
            sources.add("flags")
        elif environ.get(variable):
            picked[name] = environ[variable]
            sources.add("environment")
        else:
            picked[name] = None
    if picked["key"] is None and picked["secret"] is None:
        return None, None, None, "default chain"
    if picked["key"] is None or picked["secret"] is None:
        missing = "access key id" if picked["key"] is None else "secret access key"
        raise PrepError(f"S3 credentials incomplete: the {missing} is missing (give both, by flags or by "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or neither to use the default AWS chain)")
    source = "flags+environment" if len(sources) == 2 else sources.pop()
    return picked["key"], picked["secret"], picked["token"], source


def s3_storage_options(endpoint_url=None, key=None, secret=None, token=None, anon=False, region=None,
                       connect_timeout=10.0, read_timeout=60.0):
    """fsspec storage options for s3fs.

    `endpoint_url` is the S3-compatible service (None: AWS). `key`/`secret`/`token` are passed
    explicitly when given (see resolve_s3_credentials for where the CLI takes them from); `anon`
    sends unsigned requests (public buckets). botocore's own retries are turned off
    (total_max_attempts 1) so that `download`'s retries, with their backoff and resume, are the
    only ones and an unreachable endpoint fails after exactly the configured attempts.
    """
    if anon and (key or secret):
        raise PrepError("S3: anonymous access and credentials are mutually exclusive")
    options = {"config_kwargs": {"retries": {"total_max_attempts": 1},
                                 "connect_timeout": connect_timeout, "read_timeout": read_timeout}}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if anon:
        options["anon"] = True
    if key:
        options["key"] = key
        options["secret"] = secret
    if token:
        options["token"] = token
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def _protocols(fs):
    return fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def _is_http(fs):
    return any(p in ("http", "https") for p in _protocols(fs))


def _is_s3(fs):
    return any(p in ("s3", "s3a") for p in _protocols(fs))


def _endpoint(url, fs, storage_options):
    """A human name for the service a URL is fetched from (for error messages)."""
    if _is_s3(fs):
        return storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS S3 endpoint"
    parsed = urllib.parse.urlparse(str(url))
    if parsed.scheme and parsed.netloc:
        return f"{parsed.scheme}://{parsed.netloc}"
    return "the local file system"


def _is_unreachable(err):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(cls.__name__ in _UNREACHABLE for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


# --- transfer -------------------------------------------------------------------------------

def _human_bytes(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # not reached


def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """One log line (done, total, rate, ETA) at most every `interval` seconds; None disables."""

    def __init__(self, label, total, offset, interval):
        self.label, self.total, self.interval = label, total, interval
        self.start = self.last = time.monotonic()
        self.start_done = offset

    def update(self, done):
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.start, 1e-9)
        if self.total:
            eta = _hms((self.total - done) / rate) if rate > 0 else "unknown"
            log.info("%s: %s of %s (%.1f%%) at %s/s, ETA %s", self.label, _human_bytes(done),
                     _human_bytes(self.total), 100.0 * done / self.total, _human_bytes(rate), eta)
        else:
            log.info("%s: %s of unknown total at %s/s", self.label, _human_bytes(done), _human_bytes(rate))


def _open_source(fs, path, offset, chunk_bytes):
    """Open the source positioned at `offset`; return (file, first_chunk, offset actually used).

    HTTP: a fresh download streams one GET (block_size=0); a resume uses fsspec's random-access
    file, whose reads are Range requests. A server that ignores Range, or gives no length, makes
    the first read or the seek fail with ValueError, and the download restarts from byte 0.
    S3: a random-access file whose reads are ranged GETs of `chunk_bytes` (plus as much read-ahead).
    """
    http, s3 = _is_http(fs), _is_s3(fs)
    if s3:
        kwargs = {"block_size": chunk_bytes, "cache_type": "readahead"}
    else:
        kwargs = {"block_size": chunk_bytes} if http else {}
    if offset:
        src = fs.open(path, "rb", **kwargs)
        try:
            src.seek(offset)
            return src, src.read(chunk_bytes), offset
        except ValueError as err:
            src.close()
            log.warning("%s: cannot resume at byte %d (%s); restarting from 0", path, offset, err)
    src = fs.open(path, "rb", **({"block_size": 0} if http else kwargs))
    return src, src.read(chunk_bytes), 0


def _source_size(fs, path, src):
    size = getattr(src, "size", None)
    if isinstance(size, int):
        return size
    length = getattr(getattr(src, "r", None), "content_length", None)  # fsspec's HTTP stream: the response
    if isinstance(length, int):
        return length
    if not _is_http(fs):  # cheap elsewhere; an extra HEAD request is not worth it for HTTP
        try:
            return int(fs.size(path))
        except Exception:  # noqa: BLE001 - the total is only for the progress report
            return None
    return None


def _fetch_into(fs, path, part, expected_size, chunk_bytes, progress_seconds, label):
    """Append the rest of the source to `part` (or rewrite it when resuming is impossible)."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        log.warning("%s: partial file is larger than the expected %d bytes; restarting", part, expected_size)
        offset = 0
    if expected_size is not None and offset == expected_size:
        return
    start = time.monotonic()
    src, chunk, offset = _open_source(fs, path, offset, chunk_bytes)
    if offset:
        log.info("%s: resuming at byte %d", label, offset)
    written = 0
    with src, open(part, "ab" if offset else "wb") as dst:
        progress = _Progress(label, expected_size or _source_size(fs, path, src), offset, progress_seconds)
        while chunk:
            dst.write(chunk)
            written += len(chunk)
            progress.update(offset + written)
            chunk = src.read(chunk_bytes)
    elapsed = max(time.monotonic() - start, 1e-9)
    log.info("%s: %d bytes from offset %d in %.1f s (%.1f MB/s)", label, written, offset, elapsed,
             written / elapsed / 1e6)


def _verify(part, url, out, size, expected):
    """Check size and digests of the finished partial file; return its sha256."""
    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{out} (from {url}): size mismatch: expected {size} bytes, got {actual_size}")
    wanted = [name for name in DIGESTS if expected.get(name)]
    digests = file_digests(part, ["sha256"] + [n for n in wanted if n != "sha256"])
    for name in wanted:
        if digests[name] != expected[name].lower():
            raise ChecksumError(f"{out} (from {url}): {name} mismatch: expected {expected[name].lower()}, "
                                f"got {digests[name]}")
    return digests["sha256"]


def _describe(err):
    """`Type: message` of an error, with the innermost cause when the error itself says little."""
    text = f"{type(err).__name__}: {err}"
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" <- {type(cause).__name__}: {cause}"
    return " ".join(text.split())  # one line


def _redact(text, secret):
    """`text` with the secret masked (secrets shorter than 8 characters are not real ones, and masking
    them would garble the message)."""
    return text.replace(secret, "***") if secret and len(secret) >= 8 else text


def download(url, out, sha256=None, md5=None, size=None, retries=3, backoff_seconds=2.0, *, sha512=None,
             storage_options=None, progress_seconds=PROGRESS_SECONDS, chunk_bytes=CHUNK_BYTES):
    """Download `url` to `out`, verified and atomically; return the file's sha256.

    `storage_options` go to the fsspec backend (for s3:// see `s3_storage_options`). Transient
    errors are retried `retries` times with exponential backoff (`backoff_seconds` · 2^attempt),
    each attempt resuming the partial file; an endpoint still unreachable after them fails naming
    the endpoint. A missing source, or denied access, fails at once. On a size or checksum
    mismatch the partial file is deleted and ChecksumError names the file with the expected and
    actual values. When no checksum is given, the computed sha256 goes to `<out>.sha256` so that
    it can be pinned later. `progress_seconds` (None: never) spaces the progress lines.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    storage_options = dict(storage_options or {})
    secret = storage_options.get("secret")
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options)
    endpoint = _endpoint(url, fs, storage_options)
    for attempt in range(retries + 1):
        try:
            _fetch_into(fs, path, part, size, chunk_bytes, progress_seconds, str(url))
            break
        except FileNotFoundError as err:
            if not _is_unreachable(err):  # fsspec's HTTP backend reports a refused connection as not found
                raise PrepError(f"{url}: source not found at {endpoint} (wanted for {out})") from err
            error = err
        except PermissionError as err:
            raise PrepError(_redact(f"{url}: access denied by {endpoint} ({err}); check the credentials "
                                    f"(wanted for {out})", secret)) from err
        except Exception as err:  # network and backend errors vary by fsspec implementation
            error = err
        reason = _redact(_describe(error), secret)
        if attempt == retries:
            if _is_unreachable(error):
                raise PrepError(f"{url}: endpoint {endpoint} unreachable after {retries + 1} attempts "
                                f"({reason}); {out} not written") from error
            raise PrepError(f"{url}: download to {out} failed after {retries + 1} attempts ({reason})") from error
        wait = backoff_seconds * 2**attempt
        log.warning("%s: attempt %d of %d failed (%s); retrying in %.2f s", url, attempt + 1, retries + 1,
                    reason, wait)
        time.sleep(wait)
    expected = {"sha256": sha256, "sha512": sha512, "md5": md5}
    try:
        digest = _verify(part, url, out, size, expected)
    except ChecksumError:
        part.unlink()
        raise
    if not any(expected.values()):
        with atomic_path(out.with_name(out.name + ".sha256")) as tmp:
            tmp.write_text(f"{digest}  {out.name}\n")
        log.info("%s: no checksum given; sha256 %s written to %s.sha256", out, digest, out.name)
    os.replace(part, out)
    log.info("%s: complete, sha256 %s", out, digest)
    return digest
