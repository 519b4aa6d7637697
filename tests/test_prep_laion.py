"""sdcore.prep.laion: licence filter, summary, and the img2dataset fetch with its manifest."""

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdcore.prep import PrepError
from sdcore.prep.laion import fetch_images, filter_part, summarize_filter

REPO = Path(__file__).resolve().parents[1]
LICENCES = [
    "?", None, "http://creativecommons.org/licenses/by/2.0/", "https://creativecommons.org/licenses/by/4.0/",
    "http://creativecommons.org/licenses/by-nc-sa/3.0/", "http://creativecommons.org/licenses/by-sa/2.0/",
    "https://www.creativecommons.org/licenses/by/3.0/legalcode", "http://creativecommons.org/publicdomain/zero/1.0/",
]


def metadata_table(urls, seed=0):
    """A LAION-like metadata table with the reference's columns, licences drawn from LICENCES."""
    rng = np.random.default_rng(seed)
    n = len(urls)
    return pa.table({
        "SAMPLE_ID": pa.array(np.arange(1000, 1000 + n), pa.int64()),
        "URL": urls,
        "TEXT": [f"caption {i}" for i in range(n)],
        "HEIGHT": pa.array(rng.integers(32, 512, n), pa.int32()),
        "WIDTH": pa.array(rng.integers(32, 512, n), pa.int32()),
        "LICENSE": [LICENCES[i] for i in rng.integers(0, len(LICENCES), n)],
        "NSFW": ["UNLIKELY"] * n,
        "similarity": rng.random(n),
    })


@pytest.fixture
def part(tmp_path):
    path = tmp_path / "part-00000.snappy.parquet"
    pq.write_table(metadata_table([f"http://example.invalid/{i}.jpg" for i in range(500)]), path)
    return path


def test_reference_filter_matches_pandas(tmp_path, part):
    report = filter_part(part, tmp_path / "f.parquet", tmp_path / "f.json", mode="reference")
    df = pd.read_parquet(part)
    expected = df[df["LICENSE"] != "?"]  # the reference's expression: keeps null licences
    kept = pd.read_parquet(tmp_path / "f.parquet")
    assert report["rows_in"] == len(df) and report["rows_kept"] == len(expected) == len(kept)
    assert kept["SAMPLE_ID"].tolist() == expected["SAMPLE_ID"].tolist()
    assert kept["LICENSE"].isna().sum() == df["LICENSE"].isna().sum() > 0
    assert pq.read_schema(tmp_path / "f.parquet").names == pq.read_schema(part).names
    assert json.loads((tmp_path / "f.json").read_text()) == report
    assert report["licences"]["<null>"] == df["LICENSE"].isna().sum()
    assert "?" not in report["licences"] and sum(report["licences"].values()) == len(kept)


def test_cc_by_filter_keeps_only_cc_by(tmp_path, part):
    report = filter_part(part, tmp_path / "f.parquet", tmp_path / "f.json", mode="cc-by")
    kept = pd.read_parquet(tmp_path / "f.parquet")
    licences = pd.read_parquet(part)["LICENSE"].dropna()
    expected = [v for v in licences if re.match(r"https?://(www\.)?creativecommons\.org/licenses/by/", v)]
    assert report["rows_kept"] == len(kept) == len(expected) > 0
    assert set(kept["LICENSE"]) == {LICENCES[2], LICENCES[3], LICENCES[6]}


def test_truncated_parquet_names_the_file(tmp_path, part):
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrepError, match=re.escape(str(part))):
        filter_part(part, tmp_path / "f.parquet", tmp_path / "f.json")
    assert not (tmp_path / "f.parquet").exists()


def test_summary_adds_up_parts(tmp_path, part):
    other = tmp_path / "part-00001.snappy.parquet"
    pq.write_table(metadata_table([f"http://example.invalid/{i}.jpg" for i in range(300)], seed=1), other)
    reports = [filter_part(p, tmp_path / f"{p.stem}.f.parquet", tmp_path / f"{p.stem}.json") for p in (part, other)]
    summary = summarize_filter([tmp_path / f"{p.stem}.json" for p in (part, other)], tmp_path / "summary.json")
    assert summary["parts"] == 2 and summary["rows_in"] == 800
    assert summary["rows_kept"] == sum(r["rows_kept"] for r in reports)
    assert sum(summary["licences"].values()) == summary["rows_kept"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_filter_cli(tmp_path, part):
    subprocess.run([sys.executable, REPO / "workflow_scripts/filter_laion_metadata.py", "--in", part, "--out",
                    tmp_path / "f.parquet", "--report", tmp_path / "r.json", "--mode", "cc-by"], check=True)
    assert json.loads((tmp_path / "r.json").read_text())["mode"] == "cc-by"
    assert len(pd.read_parquet(tmp_path / "f.parquet")) > 0


# ---- img2dataset fetch: 20 file:// URLs, 8 per shard; shard 2 (rows 16-19) fails entirely ----

MISSING_ROWS, CORRUPT_ROWS = {3, 16, 18}, {5, 17, 19}


def write_fetch_input(root, rows=20):
    """Images of varied sizes/modes behind file:// URLs; some missing, some corrupt. Returns the parquet."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(7)
    urls = []
    for i in range(rows):
        path = images / f"img{i}.{'png' if i % 4 == 1 else 'jpg'}"
        if i in CORRUPT_ROWS:
            path.write_bytes(b"not an image" * 10)
        elif i not in MISSING_ROWS:
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            mode = "L" if i % 5 == 2 else "RGB"
            pixels = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(path)
        urls.append(path.as_uri())
    table = metadata_table(urls)
    path = root / "filtered.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """One img2dataset run shared by the fetch and latent tests (its start-up takes seconds)."""
    root = tmp_path_factory.mktemp("fetch")
    parquet = write_fetch_input(root)
    out_dir = root / "shards"
    manifest = fetch_images(parquet, out_dir, out_dir / "manifest.json", processes=1, threads=4,
                            samples_per_shard=8, min_success_rate=0.5, timeout=5)
    return parquet, out_dir, manifest


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.slow
def test_fetch_manifest_counts(fetched):
    _, out_dir, manifest = fetched
    assert json.loads((out_dir / "manifest.json").read_text()) == manifest
    assert manifest["shards"] == ["00000.tar", "00001.tar"]
    assert manifest["empty_shards"] == ["00002.tar"]
    assert manifest["samples"] == 14 and manifest["failed"] == 6
    assert manifest["success_rate"] == pytest.approx(14 / 20)
    kinds = manifest["errors"]
    assert sum(kinds.values()) == 6 and kinds.get("Image decoding error") == 3
    assert any("No such file" in k and v == 3 for k, v in kinds.items())


def test_fetched_shards_hold_the_reference_columns(fetched):
    parquet, out_dir, _ = fetched
    meta = pd.read_parquet(parquet)
    stored = 0
    for shard in ("00000.tar", "00001.tar"):
        members = tar_members(out_dir / shard)
        for name, data in members.items():
            if name.endswith(".json"):
                record = json.loads(data)
                row = meta[meta["SAMPLE_ID"] == record["SAMPLE_ID"]].iloc[0]
                assert record["LICENSE"] == row["LICENSE"] and record["url"] == row["URL"]
                assert {"NSFW", "similarity", "WIDTH", "HEIGHT"} <= set(record)
                assert members[name[:-5] + ".txt"].decode() == row["TEXT"]
                stored += 1
    assert stored == 14


def test_fetch_resumes_and_enforces_min_success_rate(fetched, tmp_path):
    parquet, out_dir, _ = fetched
    copy = tmp_path / "shards"
    shutil.copytree(out_dir, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar")}
    with pytest.raises(PrepError, match="below the minimum.*Image decoding error"):
        fetch_images(parquet, copy, copy / "manifest.json", processes=1, threads=2, samples_per_shard=8,
                     min_success_rate=0.9)
    assert not (copy / "manifest.json").exists()
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar")} == before  # incremental: nothing redone


@pytest.mark.slow
def test_every_url_failing_names_the_input(tmp_path):
    parquet = tmp_path / "dead.parquet"
    pq.write_table(metadata_table([(tmp_path / f"gone{i}.jpg").as_uri() for i in range(3)]), parquet)
    with pytest.raises(PrepError, match=re.escape(str(parquet)) + ".*every one of 3 downloads failed"):
        fetch_images(parquet, tmp_path / "out", tmp_path / "out" / "manifest.json", processes=1, threads=2,
                     samples_per_shard=8, min_success_rate=0.0)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_every_stored_image_gets_reference_moments(fetched, tmp_path):
    """encode_laion_latents.py on img2dataset's output: one .npy per stored image, equal to the VAE applied to
    the reference preprocessing (ToTensor, bicubic short-side resize without antialias, centre crop)."""
    import torch
    from torchvision import transforms

    from prep_helpers import tiny_vae_checkpoint

    _, out_dir, manifest = fetched
    vae, ckpt, config, _ = tiny_vae_checkpoint(tmp_path)
    latents = tmp_path / "latents"
    subprocess.run([sys.executable, REPO / "workflow_scripts/encode_laion_latents.py", "--manifest",
                    out_dir / "manifest.json", "--out-dir", latents, "--out-manifest", latents / "manifest.json",
                    "--checkpoint", ckpt, "--config", config, "--image-size", "64", "--batch-size", "4",
                    "--device", "auto"], check=True)
    encoded = json.loads((latents / "manifest.json").read_text())
    assert encoded["shards"] == manifest["shards"] and encoded["samples"] == manifest["samples"] == 14
    assert encoded["failed"] == 0
    preprocess = transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC, antialias=False),
        transforms.CenterCrop(64)])
    checked = 0
    for shard in manifest["shards"]:
        images, moments = tar_members(out_dir / shard), tar_members(latents / shard)
        for name, data in images.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                x = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
                with torch.no_grad():
                    expected = vae.moments(x[None])[0].numpy()
                got = np.load(io.BytesIO(moments[key + ".npy"]))
                assert got.shape == (8, 8, 8)
                np.testing.assert_allclose(got, expected, atol=1e-5)
                assert moments[key + ".json"] == images[key + ".json"]
                checked += 1
    assert checked == 14
