"""sdcore.prep.coco: zip extraction, the reference prompt subset, resized images, FID statistics."""

import csv
import json
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sdcore.prep import PrepError
from sdcore.prep.coco import (extract_zip, fid_stats, resize_images, resized_image_name, source_image_name,
                              write_subset)

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
    """Six source images (one grayscale, varied aspect), a 4-row subset TSV and its resized PNGs."""
    root = tmp_path_factory.mktemp("coco")
    data = make_annotations(n_images=6)
    (root / "captions.json").write_text(json.dumps(data))
    images = root / "val2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k, image in enumerate(data["images"]):
        shape = (int(rng.integers(30, 80)), int(rng.integers(30, 80))) + (() if k == 0 else (3,))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / image["file_name"])
    subset = write_subset(root / "captions.json", root / "subset.tsv", size=4)
    resize_images(root / "subset.tsv", images, root / "resized", 64, root / "resized" / ".done")
    return root, subset


def test_resized_images_are_bicubic_squares(coco):
    root, subset = coco
    assert (root / "resized" / ".done").exists()
    assert sorted(p.name for p in (root / "resized").glob("*.png")) == sorted(
        resized_image_name(i) for i in subset["image_id"])
    for image_id in subset["image_id"]:
        with Image.open(root / "val2014" / source_image_name(image_id)) as src:
            expected = np.asarray(src.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
        with Image.open(root / "resized" / resized_image_name(image_id)) as out:
            assert out.mode == "RGB" and out.size == (64, 64)
            np.testing.assert_array_equal(np.asarray(out), expected)


def test_missing_source_image_is_named(coco, tmp_path):
    root, subset = coco
    (tmp_path / "val2014").mkdir()
    with pytest.raises(PrepError, match=source_image_name(subset["image_id"].iloc[0])):
        resize_images(root / "subset.tsv", tmp_path / "val2014", tmp_path / "out", 64, tmp_path / "done")
    assert not (tmp_path / "done").exists()


def random_inception_weights(path, monkeypatch):
    """torch-fidelity's Inception-v3 with random weights, saved as a plain state dict (no download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)


def test_fid_stats_equal_torch_fidelity_features(coco, tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    root, subset = coco
    weights = tmp_path / "inception.pth"
    random_inception_weights(weights, monkeypatch)
    mu, sigma = fid_stats(root / "resized", root / "subset.tsv", weights, tmp_path / "stats.npz", batch_size=3,
                          device="cpu")
    with np.load(tmp_path / "stats.npz") as saved:
        assert sorted(saved.files) == ["mu", "sigma"]
        assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048)
        np.testing.assert_array_equal(saved["mu"], mu)
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "resized" / resized_image_name(i))).copy())
                          .permute(2, 0, 1) for i in subset["image_id"]])
    with torch.no_grad():
        (features,) = extractor(images)
    features = features.double().numpy()
    assert np.abs(features).max() > 0
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-6)
