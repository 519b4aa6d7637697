"""The published dataset layout, and the downloader against a live local S3 endpoint (moto server).

The endpoint runs in a child process (tests/s3_server.py); this process talks HTTP to it through
s3fs, as it would to Cloudflare R2.
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from s3_server import TEST_KEY_ID, TEST_SECRET, free_port, running_s3_server
from sdcore.prep import PrepError
from sdcore.prep.download import ChecksumError, download, resolve_s3_credentials, s3_storage_options
from sdcore.prep.published import (COCO_PROMPTS, COCO_STATS, DATASETS_PREFIX, MOMENTS_DIR, SHA512SUMS,
                                   expected_sha512, format_sha512sums, load_sha512sums, moment_shard_bytes,
                                   parse_sha512sums, published_url, shard_names, write_published_mirror)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mlcommons-training-wg-public"
TSV = "image_id\tid\tcaption\n42\t7\tA cat on a mat.\n9\t11\tTwo dogs in the snow.\n"
SHARDS, SAMPLES = 3, 3
SHARD_BYTES_MIN = SAMPLES * 8 * 64 * 64 * 4  # three (1, 8, 64, 64) float32 arrays


def _stats():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 4))
    return {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}


class Published:
    def __init__(self, tree, mirror, endpoint):
        self.tree, self.mirror, self.endpoint = tree, mirror, endpoint
        self.options = s3_storage_options(endpoint, TEST_KEY_ID, TEST_SECRET)

    def url(self, relative):
        return published_url(relative, bucket=BUCKET)

    def moments_url(self, name):
        return self.url(f"{MOMENTS_DIR}/{name}")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published-style mirror (plus a truncated shard under broken/) served at s3://BUCKET/DATASETS_PREFIX."""
    tree = tmp_path_factory.mktemp("bucket") / "tree"
    mirror = write_published_mirror(tree, TSV, _stats(), shards=SHARDS, samples_per_shard=SAMPLES)
    full = (mirror.moments_dir / "00001.tar").read_bytes()
    (tree / "broken").mkdir()
    (tree / "broken" / "00001.tar").write_bytes(full[: len(full) // 2])
    with running_s3_server(tree, BUCKET, DATASETS_PREFIX) as endpoint:
        yield Published(tree, mirror, endpoint)


def _sha512(data):
    return hashlib.sha512(data).hexdigest()


def _progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if " of " in r.getMessage() and "ETA" in r.getMessage()]


# --- the published layout -------------------------------------------------------------------

def test_mirror_layout_matches_the_published_shards(tmp_path):
    mirror = write_published_mirror(tmp_path / "m", TSV, _stats(), shards=2, samples_per_shard=2,
                                    captions=[["a red cube", "ein grüner Ball"], ["x", "y"]])
    moments = tmp_path / "m" / "laion-400m" / "moments-webdataset-filtered"
    assert sorted(p.name for p in moments.iterdir()) == ["00000.tar", "00001.tar", SHA512SUMS]
    assert sorted(p.name for p in (tmp_path / "m" / "coco2014").iterdir()) == [COCO_PROMPTS, COCO_STATS]
    assert not [p for p in (tmp_path / "m").rglob("*.tmp")]
    with tarfile.open(moments / "00000.tar") as tar:
        members = tar.getmembers()
        assert members[0].isdir()  # the reference re-packs with tarfile.add(dir, arcname='')
        names = [m.name for m in members[1:]]
        assert names == ["000000000.json", "000000000.npy", "000000000.txt",
                         "000000001.json", "000000001.npy", "000000001.txt"]
        array = np.load(io.BytesIO(tar.extractfile("000000001.npy").read()), allow_pickle=False)
        caption = tar.extractfile("000000001.txt").read().decode()
        meta = json.loads(tar.extractfile("000000001.json").read())
    assert array.shape == (1, 8, 64, 64) and array.dtype == np.float32
    assert (array[:, 4:] < 0).all()  # log-variance channels
    assert caption == "ein grüner Ball"
    assert meta["key"] == "000000001" and meta["caption"] == caption and meta["status"] == "success"
    sums = load_sha512sums(moments / SHA512SUMS)
    assert set(sums) == {"00000.tar", "00001.tar"}
    for name in sums:
        assert sums[name] == _sha512((moments / name).read_bytes())
        assert mirror.files[f"{MOMENTS_DIR}/{name}"] == ((moments / name).stat().st_size, sums[name])
    assert (tmp_path / "m" / "coco2014" / COCO_PROMPTS).read_text() == TSV
    with np.load(tmp_path / "m" / "coco2014" / COCO_STATS) as stats:
        np.testing.assert_array_equal(stats["sigma"], _stats()["sigma"])


def test_mirror_is_deterministic_and_seeded(tmp_path):
    a = write_published_mirror(tmp_path / "a", TSV, _stats(), shards=1, samples_per_shard=2, latent_size=(8, 8))
    b = write_published_mirror(tmp_path / "b", TSV, _stats(), shards=1, samples_per_shard=2, latent_size=(8, 8))
    c = write_published_mirror(tmp_path / "c", TSV, _stats(), shards=1, samples_per_shard=2, latent_size=(8, 8),
                               seed=1)
    assert a.files == b.files
    assert a.files[f"{MOMENTS_DIR}/00000.tar"] != c.files[f"{MOMENTS_DIR}/00000.tar"]
    data, keys = moment_shard_bytes(0, 2, (8, 8), root_entry=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert all(m.isfile() for m in tar.getmembers())
    assert keys == ["000000000", "000000001"]


def test_mirror_rejects_bad_inputs(tmp_path):
    with pytest.raises(PrepError, match="mu and sigma"):
        write_published_mirror(tmp_path / "m", TSV, {"mu": np.zeros(2)}, shards=1)
    with pytest.raises(PrepError, match="cannot read the COCO prompts"):
        write_published_mirror(tmp_path / "m", tmp_path / "absent.tsv", _stats(), shards=1)


def test_sha512sums_parsing(tmp_path):
    d1, d2 = "ab" * 64, "CD" * 64
    sums = parse_sha512sums(f"{d1}  00000.tar\n\n{d2} *./00001.tar\n", source="s.txt")
    assert dict(sums) == {"00000.tar": d1, "00001.tar": d2.lower()}
    assert sums.lookup("s3://bucket/prefix/00001.tar") == d2.lower()
    assert parse_sha512sums(format_sha512sums(dict(sums))) == sums
    path = tmp_path / SHA512SUMS
    path.write_text(format_sha512sums(dict(sums)))
    assert expected_sha512(path, "00000.tar") == d1
    with pytest.raises(PrepError, match=re.escape(f"{path}: no sha512 listed for 00002.tar")):
        expected_sha512(path, "00002.tar")
    path.write_text(f"{d1}  00000.tar\n{d1[:-1]}  00001.tar\n")
    with pytest.raises(PrepError, match=re.escape(f"{path}:2: malformed sha512sum line")):
        load_sha512sums(path)
    with pytest.raises(PrepError, match="listed again"):
        parse_sha512sums(f"{d1}  a.tar\n{d2}  a.tar\n")
    with pytest.raises(PrepError, match="absent.txt: cannot read"):
        load_sha512sums(tmp_path / "absent.txt")
    assert shard_names()[0] == "00000.tar" and shard_names()[-1] == "00831.tar"


# --- credentials ----------------------------------------------------------------------------

def test_credential_precedence():
    env = {"AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "env-secret"}
    assert resolve_s3_credentials(environ=env) == ("env-key", "env-secret", None, "environment")
    assert resolve_s3_credentials("flag-key", "flag-secret", environ=env) == ("flag-key", "flag-secret", None, "flags")
    assert resolve_s3_credentials("flag-key", environ=env)[:2] == ("flag-key", "env-secret")
    assert resolve_s3_credentials("flag-key", environ=env)[3] == "flags+environment"
    assert resolve_s3_credentials(environ={}) == (None, None, None, "default chain")
    with pytest.raises(PrepError, match="secret access key is missing") as err:
        resolve_s3_credentials("flag-key", environ={})
    assert "flag-key" not in str(err.value)
    with pytest.raises(PrepError, match="mutually exclusive"):
        s3_storage_options(key="k", secret="s", anon=True)


# --- against the live endpoint --------------------------------------------------------------

def test_every_published_file_downloads_and_verifies(published, tmp_path):
    out = tmp_path / "datasets"
    sums_path = out / MOMENTS_DIR / SHA512SUMS
    download(published.moments_url(SHA512SUMS), sums_path, storage_options=published.options)
    sums = load_sha512sums(sums_path)
    assert sorted(sums) == shard_names(SHARDS)
    for name in sums:
        local = published.mirror.moments_dir / name
        digest_256 = download(published.moments_url(name), out / MOMENTS_DIR / name, sha512=sums.lookup(name),
                              size=local.stat().st_size, storage_options=published.options, retries=0)
        assert (out / MOMENTS_DIR / name).read_bytes() == local.read_bytes()
        assert digest_256 == hashlib.sha256(local.read_bytes()).hexdigest()
        assert not (out / MOMENTS_DIR / f"{name}.sha256").exists()  # verified: no sidecar
        assert (out / MOMENTS_DIR / name).stat().st_size > SHARD_BYTES_MIN
    for name in (COCO_PROMPTS, COCO_STATS):  # no checksum is published for these: compare the bytes
        download(published.url(f"coco2014/{name}"), out / "coco2014" / name, storage_options=published.options)
        assert (out / "coco2014" / name).read_bytes() == (published.mirror.coco_dir / name).read_bytes()
    if shutil.which("sha512sum"):  # the listing is what `sha512sum -c` accepts, as the reference checks it
        subprocess.run(["sha512sum", "--quiet", "-c", SHA512SUMS], cwd=out / MOMENTS_DIR, check=True)
    assert not list(out.rglob("*.part"))


def test_wrong_sha512_leaves_nothing(published, tmp_path):
    dest = tmp_path / "dest"
    out = dest / "00000.tar"
    actual = published.mirror.files[f"{MOMENTS_DIR}/00000.tar"][1]
    with pytest.raises(ChecksumError) as err:
        download(published.moments_url("00000.tar"), out, sha512="0" * 128, storage_options=published.options)
    message = str(err.value)
    assert str(out) in message and "sha512 mismatch" in message
    assert "0" * 128 in message and actual in message
    assert "\n" not in message
    assert list(dest.iterdir()) == []


def test_missing_object_fails_at_once(published, tmp_path):
    url = published.moments_url("00099.tar")
    start = time.monotonic()
    with pytest.raises(PrepError) as err:
        download(url, tmp_path / "00099.tar", retries=5, backoff_seconds=30, storage_options=published.options)
    assert time.monotonic() - start < 10  # no retries (they would sleep 30 s and more)
    assert url in str(err.value) and "not found" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_bucket_fails_at_once(published, tmp_path):
    with pytest.raises(PrepError, match="not found"):
        download("s3://no-such-bucket/x.tar", tmp_path / "x.tar", retries=5, backoff_seconds=30,
                 storage_options=published.options)


def test_unreachable_endpoint_names_it_after_the_retries(tmp_path, caplog):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.INFO, logger="sdcore.prep.download")
    start = time.monotonic()
    with pytest.raises(PrepError) as err:
        download(f"s3://{BUCKET}/{DATASETS_PREFIX}/x.tar", tmp_path / "x.tar", retries=2, backoff_seconds=0.01,
                 storage_options=s3_storage_options(endpoint, TEST_KEY_ID, TEST_SECRET))
    assert time.monotonic() - start < 20
    message = str(err.value)
    assert f"endpoint {endpoint} unreachable after 3 attempts" in message
    assert "\n" not in message and TEST_SECRET not in message
    retries = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert TEST_SECRET not in caplog.text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("check", ["sha512", "size"])
def test_truncated_shard_is_rejected(published, tmp_path, check):
    size, digest = published.mirror.files[f"{MOMENTS_DIR}/00001.tar"]
    out = tmp_path / "00001.tar"
    with pytest.raises(ChecksumError) as err:
        download(published.url("broken/00001.tar"), out, storage_options=published.options,
                 **({"sha512": digest} if check == "sha512" else {"size": size}))
    message = str(err.value)
    assert str(out) in message and f"{check} mismatch" in message
    assert (digest if check == "sha512" else f"expected {size} bytes, got {size // 2}") in message
    assert list(tmp_path.iterdir()) == []


def test_s3_resume_uses_ranged_reads(published, tmp_path):
    local = (published.mirror.moments_dir / "00002.tar").read_bytes()
    out = tmp_path / "00002.tar"
    # A partial whose bytes differ from the source proves they were kept, not re-fetched.
    Path(f"{out}.part").write_bytes(b"\xff" * 100_000)
    download(published.moments_url("00002.tar"), out, storage_options=published.options, chunk_bytes=64 << 10)
    assert out.read_bytes() == b"\xff" * 100_000 + local[100_000:]


def test_progress_lines_for_long_downloads(published, tmp_path, caplog):
    size = published.mirror.files[f"{MOMENTS_DIR}/00000.tar"][0]
    caplog.set_level(logging.INFO, logger="sdcore.prep.download")
    download(published.moments_url("00000.tar"), tmp_path / "a.tar", storage_options=published.options,
             chunk_bytes=32 << 10, progress_seconds=0)
    lines = _progress_lines(caplog)
    assert len(lines) >= size // (32 << 10) - 1
    pattern = re.compile(r": [\d.]+ kB of [\d.]+ kB \(\d+\.\d%\) at [\d.]+ [kMG]?B/s, ETA \d+:\d\d:\d\d$")
    assert all(pattern.search(line) and "\n" not in line for line in lines), lines[:3]
    assert lines[-1].split(" of ")[1].startswith(f"{size / 1000:.1f} kB (100.0%)")
    caplog.clear()
    download(published.moments_url("00000.tar"), tmp_path / "b.tar", storage_options=published.options,
             chunk_bytes=32 << 10, progress_seconds=3600)
    assert _progress_lines(caplog) == []  # spaced by the interval: none within a fast download
    assert any("complete" in r.getMessage() for r in caplog.records)


def _cli(args, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(env_extra, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "workflow_scripts" / "download.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_s3_download_with_sha512_list(published, tmp_path):
    sums = tmp_path / SHA512SUMS
    sums.write_bytes((published.mirror.moments_dir / SHA512SUMS).read_bytes())
    creds = {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
    out = tmp_path / "00001.tar"
    ok = _cli(["--url", published.moments_url("00001.tar"), "--out", str(out), "--sha512-from", str(sums),
               "--s3-endpoint", published.endpoint, "--retries", "0"], creds)
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == (published.mirror.moments_dir / "00001.tar").read_bytes()
    assert "credentials from environment" in ok.stderr and TEST_SECRET not in ok.stderr
    bad = _cli(["--url", published.moments_url("00002.tar"), "--out", str(tmp_path / "00002.tar"),
                "--sha512", "0" * 128, "--s3-endpoint", published.endpoint,
                "--s3-secret-access-key", TEST_SECRET], {"AWS_ACCESS_KEY_ID": TEST_KEY_ID})
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "00002.tar" in errors[0] and "sha512 mismatch" in errors[0]
    assert "Traceback" not in bad.stderr and TEST_SECRET not in bad.stderr
    assert not (tmp_path / "00002.tar").exists() and not (tmp_path / "00002.tar.part").exists()


def test_server_stops_when_the_block_raises(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a")
    with pytest.raises(RuntimeError, match="boom"):
        with running_s3_server(tree, "bucket-b") as endpoint:
            port = int(endpoint.rsplit(":", 1)[1])
            socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it was serving
            raise RuntimeError("boom")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]  # port file and log removed
