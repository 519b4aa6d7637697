"""sdcore.prep.coco: zip extraction, the reference prompt subset, resized images, FID statistics."""

import csv
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcore.prep import PrepError
from sdcore.prep.coco import extract_zip, fid_stats, resize_images, source_image_name, write_subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow_scripts"))  # demo_mirror
torch.set_num_threads(1)


def make_annotations(n_images=40, seed=3):
    """A captions_val2014-like dict: 1-6 captions per image, some with newlines and blanks."""
    rng = np.random.default_rng(seed)
    image_ids = rng.choice(600000, n_images, replace=False)
    annotations, next_id = [], 1
    for image_id in image_ids:
        for _ in range(int(rng.integers(1, 7))):
            next_id += int(rng.integers(1, 50))
            caption = f"A photo {next_id}" + rng.choice(["", "\n", " \n", "  "]) + rng.choice(["", " of a cat\n"])
            annotations.append({"image_id": int(image_id), "id": next_id, "caption": caption})
    rng.shuffle(annotations)
    return {"images": [{"id": int(i), "file_name": source_image_name(i)} for i in image_ids],
            "annotations": annotations}


def independent_subset(annotations, size, seed):
    """SPEC's algorithm without pandas: pandas' sample(frac=1, random_state=s) is
    RandomState(s).permutation(n); then first caption per image, first `size`, sorted by id."""
    order = np.random.RandomState(seed).permutation(len(annotations))
    seen, rows = set(), []
    for i in order:
        a = annotations[i]
        if a["image_id"] not in seen:
            seen.add(a["image_id"])
            rows.append((a["image_id"], a["id"], a["caption"].replace("\n", "").strip()))
    return sorted(rows[:size], key=lambda r: r[1])


def test_subset_matches_independent_implementation(tmp_path):
    data = make_annotations()
    (tmp_path / "captions.json").write_text(json.dumps(data))
    write_subset(tmp_path / "captions.json", tmp_path / "subset.tsv", size=25, seed=2023)
    with open(tmp_path / "subset.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["image_id", "id", "caption"]
    assert [(int(a), int(b), c) for a, b, c in rows[1:]] == independent_subset(data["annotations"], 25, 2023)


def test_subset_larger_than_the_images_is_an_error(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(make_annotations(n_images=5)))
    with pytest.raises(PrepError, match="only 5 distinct images, 6 requested"):
        write_subset(tmp_path / "captions.json", tmp_path / "subset.tsv", size=6)
    assert not (tmp_path / "subset.tsv").exists()


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_extract_members_under_prefix(tmp_path):
    write_zip(tmp_path / "a.zip", {"val2014/x.jpg": b"x", "val2014/sub/y.jpg": b"y", "other/z": b"z",
                                   "annotations/captions_val2014.json": b"{}"})
    count = extract_zip(tmp_path / "a.zip", "val2014/", tmp_path / "out", tmp_path / "out" / ".extracted")
    assert count == 2 and (tmp_path / "out" / "x.jpg").read_bytes() == b"x"
    assert (tmp_path / "out" / "sub" / "y.jpg").read_bytes() == b"y"
    assert (tmp_path / "out" / ".extracted").exists() and not (tmp_path / "out" / "z").exists()
    extract_zip(tmp_path / "a.zip", "annotations/captions_val2014.json", tmp_path / "ann", tmp_path / "ann.done")
    assert (tmp_path / "ann" / "captions_val2014.json").read_bytes() == b"{}"


def test_extract_refuses_path_traversal(tmp_path):
    write_zip(tmp_path / "evil.zip", {"val2014/ok.jpg": b"1", "val2014/../../escape.txt": b"2"})
    with pytest.raises(PrepError, match="unsafe member path"):
        extract_zip(tmp_path / "evil.zip", "val2014/", tmp_path / "out", tmp_path / "marker")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "marker").exists()
    assert not (tmp_path / "out").exists()  # checked before anything was written


def test_extract_corrupt_zip_names_it(tmp_path):
    write_zip(tmp_path / "c.zip", {"val2014/a.bin": bytes(range(256)) * 64})
    data = bytearray((tmp_path / "c.zip").read_bytes())
    data[100:110] = b"\x00" * 10  # inside the stored data: CRC failure on read
    (tmp_path / "c.zip").write_bytes(bytes(data))
    with pytest.raises(PrepError, match=re.escape(str(tmp_path / "c.zip"))):
        extract_zip(tmp_path / "c.zip", "val2014/", tmp_path / "out", tmp_path / "marker")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out" / "a.bin").exists()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Six source JPEGs (one grayscale, varied aspect), a 4-row subset TSV and its resized copies."""
    root = tmp_path_factory.mktemp("coco")
    data = make_annotations(n_images=6)
    (root / "captions.json").write_text(json.dumps(data))
    images = root / "val2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k, image in enumerate(data["images"]):
        shape = (int(rng.integers(30, 80)), int(rng.integers(30, 80))) + (() if k == 0 else (3,))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / image["file_name"], quality=95)
    subset = write_subset(root / "captions.json", root / "subset.tsv", size=4)
    grayscale = source_image_name(data["images"][0]["id"])
    assert grayscale in {source_image_name(i) for i in subset["image_id"]}, "the grayscale image must be resized"
    resize_images(root / "subset.tsv", images, root / "resized", 64, root / "resized" / ".done")
    return root, subset


def test_resized_images_are_the_references_bicubic_jpegs(coco, tmp_path):
    """coco-split-resize.py: Image.open(src).resize((s, s), BICUBIC) with no mode conversion, saved under the
    source's .jpg name, so as JPEG at PIL's default quality (75)."""
    root, subset = coco
    assert (root / "resized" / ".done").exists()
    assert sorted(p.name for p in (root / "resized").iterdir()) == sorted(
        [".done"] + [source_image_name(i) for i in subset["image_id"]])  # no temporary file left
    modes = set()
    for image_id in subset["image_id"]:
        name = source_image_name(image_id)
        with Image.open(root / "val2014" / name) as src:
            src.resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / name, quality=75)
        assert (root / "resized" / name).read_bytes() == (tmp_path / name).read_bytes()
        with Image.open(root / "resized" / name) as out:
            assert out.format == "JPEG" and out.size == (64, 64)
            modes.add(out.mode)
    assert modes == {"L", "RGB"}  # grayscale stays grayscale, as in the reference


def test_parallel_resize_writes_the_same_files(coco, tmp_path):
    root, subset = coco
    resize_images(root / "subset.tsv", root / "val2014", tmp_path / "out", 64, tmp_path / "done", workers=2)
    for image_id in subset["image_id"]:
        name = source_image_name(image_id)
        assert (tmp_path / "out" / name).read_bytes() == (root / "resized" / name).read_bytes()


def test_missing_source_image_is_named(coco, tmp_path):
    root, subset = coco
    (tmp_path / "val2014").mkdir()
    with pytest.raises(PrepError, match=source_image_name(subset["image_id"].iloc[0])):
        resize_images(root / "subset.tsv", tmp_path / "val2014", tmp_path / "out", 64, tmp_path / "done")
    assert not (tmp_path / "done").exists()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random FID-Inception weights in pytorch-fid's layout (the demo mirror's recipe: He init, BatchNorm
    calibrated on a few images, so that the features vary with the input)."""
    from demo_mirror import inception_state

    calibration = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(inception_state(calibration, seed=0), path)
    return path


def pytorch_fid_model(weights, monkeypatch):
    """pytorch-fid's own InceptionV3 (FID variant, pool3), its weight download replaced by our file."""
    import pytorch_fid.inception as pf_inception

    monkeypatch.setattr(pf_inception, "load_state_dict_from_url",
                        lambda url, *args, **kwargs: torch.load(weights, map_location="cpu", weights_only=True))
    return pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


@pytest.mark.slow
def test_fid_stats_equal_pytorch_fid_on_the_resized_files(coco, tmp_path, inception_weights, monkeypatch):
    import pytorch_fid.fid_score as pf_score

    from sdcore.fid import FRONT_END, load_stats

    root, subset = coco
    mu, sigma = fid_stats(root / "resized", root / "subset.tsv", inception_weights, tmp_path / "stats.npz",
                          batch_size=3, device="cpu")  # batches of 3 and 1
    saved = load_stats(tmp_path / "stats.npz", front_end=FRONT_END)
    np.testing.assert_array_equal(saved.mu, mu)
    np.testing.assert_array_equal(saved.sigma, sigma)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    with np.load(tmp_path / "stats.npz") as data:  # the reference's reader takes the file as it is
        assert {"mu", "sigma"} <= set(data.files)
    files = [str(root / "resized" / source_image_name(i)) for i in subset["image_id"]]
    ref_mu, ref_sigma = pf_score.calculate_activation_statistics(
        files, pytorch_fid_model(inception_weights, monkeypatch), batch_size=4, dims=2048, device="cpu",
        num_workers=0)
    assert np.abs(ref_mu).max() > 0 and np.abs(ref_sigma).max() > 0
    # The two networks compute the same float32 operations: agreement to float32 rounding, scaled by the
    # largest value (as tests/test_fid.py), whatever the thread count.
    assert np.abs(mu - ref_mu).max() <= 1e-4 * np.abs(ref_mu).max()
    assert np.abs(sigma - ref_sigma).max() <= 1e-3 * np.abs(ref_sigma).max()


def test_fid_stats_name_an_unreadable_image(coco, tmp_path, inception_weights):
    root, subset = coco
    broken = tmp_path / "resized"
    broken.mkdir()
    for image_id in subset["image_id"]:
        name = source_image_name(image_id)
        (broken / name).write_bytes((root / "resized" / name).read_bytes())
    victim = source_image_name(subset["image_id"].iloc[1])
    (broken / victim).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(PrepError, match=victim):
        fid_stats(broken, root / "subset.tsv", inception_weights, tmp_path / "stats.npz", device="cpu")
    assert not (tmp_path / "stats.npz").exists()
