"""sdcore.prep.download: local and HTTP sources, resume, retries, verification, atomicity."""

import hashlib
import http.server
import logging
import socket
import threading

import pytest

from sdcore.prep import PrepError
from sdcore.prep.download import ChecksumError, download

PAYLOAD = bytes(range(256)) * 4000  # 1 MB, non-repeating at chunk boundaries


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves `directory`; honours `Range` when the server's `ranges` flag is set; records requests."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.server.fail_first > 0:
            self.server.fail_first -= 1
            self.send_error(503)
            return
        range_header = self.headers.get("Range")
        if not (self.server.ranges and range_header):
            return super().do_GET()
        data = (self.server.root / self.path.lstrip("/")).read_bytes()
        start, _, end = range_header.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start:end + 1])


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "blob.bin").write_bytes(PAYLOAD)
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.root, httpd.requests, httpd.ranges, httpd.fail_first = root, [], True, 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("as_url", [False, True])
def test_local_source_and_sha256_sidecar(tmp_path, as_url):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "out" / "copy.bin"
    digest = download(src.as_uri() if as_url else str(src), out)
    assert out.read_bytes() == PAYLOAD
    assert digest == _sha256(PAYLOAD)
    assert (tmp_path / "out" / "copy.bin.sha256").read_text() == f"{digest}  copy.bin\n"
    assert not (tmp_path / "out" / "copy.bin.part").exists()


def test_verified_download_writes_no_sidecar(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "copy.bin"
    download(str(src), out, sha256=_sha256(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest(), size=len(PAYLOAD),
             sha512=hashlib.sha512(PAYLOAD).hexdigest().upper())
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "copy.bin.sha256").exists()


@pytest.mark.parametrize("check", ["sha256", "sha512", "md5", "size"])
def test_mismatch_leaves_no_file(tmp_path, check):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "copy.bin"
    wrong = {"sha256": {"sha256": "0" * 64}, "sha512": {"sha512": "0" * 128}, "md5": {"md5": "0" * 32},
             "size": {"size": len(PAYLOAD) + 1}}[check]
    with pytest.raises(ChecksumError) as err:
        download(str(src), out, **wrong)
    message = str(err.value)
    assert str(out) in message and "mismatch" in message
    if check == "sha256":
        assert "0" * 64 in message and _sha256(PAYLOAD) in message
    if check == "sha512":
        assert "0" * 128 in message and hashlib.sha512(PAYLOAD).hexdigest() in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]


def test_missing_source_fails_at_once(tmp_path):
    with pytest.raises(PrepError, match="not found"):
        download(str(tmp_path / "absent.bin"), tmp_path / "out.bin", retries=5, backoff_seconds=60)
    assert not (tmp_path / "out.bin").exists()


def test_local_resume_appends_to_partial(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "copy.bin"
    # A partial whose tail differs from the source proves the prefix was kept, not re-fetched.
    (tmp_path / "copy.bin.part").write_bytes(b"\xff" * 1000)
    download(str(src), out)
    assert out.read_bytes() == b"\xff" * 1000 + PAYLOAD[1000:]


def test_http_resume_uses_range(tmp_path, server):
    url = f"http://127.0.0.1:{server.server_port}/blob.bin"
    out = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:300_000])
    download(url, out, sha256=_sha256(PAYLOAD))
    assert out.read_bytes() == PAYLOAD
    ranges = [r for _, r in server.requests if r]
    assert ranges and ranges[0].startswith("bytes=300000-")


def test_http_without_range_support_restarts(tmp_path, server):
    server.ranges = False
    url = f"http://127.0.0.1:{server.server_port}/blob.bin"
    out = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"\x00" * 300_000)  # wrong bytes: must be discarded
    download(url, out, sha256=_sha256(PAYLOAD))
    assert out.read_bytes() == PAYLOAD


def test_http_transient_errors_are_retried(tmp_path, server):
    server.fail_first = 2
    url = f"http://127.0.0.1:{server.server_port}/blob.bin"
    download(url, tmp_path / "blob.bin", retries=3, backoff_seconds=0.01)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_http_gives_up_after_retries(tmp_path, server):
    server.fail_first = 10
    url = f"http://127.0.0.1:{server.server_port}/blob.bin"
    with pytest.raises(PrepError, match="after 2 attempts"):
        download(url, tmp_path / "blob.bin", retries=1, backoff_seconds=0.01)
    assert not (tmp_path / "blob.bin").exists()


def test_http_unreachable_endpoint_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    with pytest.raises(PrepError, match=f"endpoint http://127.0.0.1:{port} unreachable after 2 attempts"):
        download(f"http://127.0.0.1:{port}/blob.bin", tmp_path / "blob.bin", retries=1, backoff_seconds=0.01)
    assert list(tmp_path.iterdir()) == []


def test_local_progress_reports_total(tmp_path, caplog):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    caplog.set_level(logging.INFO, logger="sdcore.prep.download")
    download(str(src), tmp_path / "copy.bin", chunk_bytes=100_000, progress_seconds=0)
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert len(lines) == 11  # one per 100 kB chunk of the 1,024,000 bytes
    assert "1.0 MB of 1.0 MB (100.0%)" in lines[-1] and "ETA 0:00:00" in lines[-1]


def test_http_stream_progress_knows_the_total(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="sdcore.prep.download")
    url = f"http://127.0.0.1:{server.server_port}/blob.bin"
    download(url, tmp_path / "blob.bin", chunk_bytes=200_000, progress_seconds=0)
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert lines and all(" of 1.0 MB (" in line for line in lines)
