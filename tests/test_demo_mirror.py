"""The demo mirror: real formats, planted defects in the intended numbers, loadable tiny checkpoints,
and byte-identical regeneration."""

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from snakemake.utils import update_config
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from sdcore.autoencoder import AutoencoderKL
from sdcore.checkpoint import (TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, extract_part, load_part,
                               load_state_dict_file)
from sdcore.prep import demo_mirror
from sdcore.prep.demo_mirror import COLOURS, LAION_PARTS, Scene, draw_scene, laion_caption, make_mirror
from sdcore.text_encoder import FrozenOpenCLIPText
from sdcore.unet import UNetModel

REPO = Path(__file__).resolve().parents[1]
SEED = 7


@pytest.fixture(scope="module")
def config():
    """config.yaml with the demo overrides merged over it, as Snakemake merges --configfile files."""
    merged = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(merged, yaml.safe_load((REPO / "profiles" / "demo" / "demo-config.yaml").read_text()))
    return merged


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, config):
    """A mirror generated once through the command-line script, as the workflow rule runs it."""
    root = tmp_path_factory.mktemp("demo")
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = root / "mirror"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(REPO / "workflow_scripts" / "make_demo_mirror.py"),
         "--out", str(out), "--seed", str(SEED), "--config", str(config_path)],
        check=True, env=env, capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def parts(mirror):
    return [pq.read_table(mirror / "laion" / name) for name in LAION_PARTS]


def _file_hashes(root):
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_manifest_lists_every_file_with_its_hash(mirror):
    manifest = json.loads((mirror / "MANIFEST.json").read_text())
    hashes = _file_hashes(mirror)
    assert hashes.pop("MANIFEST.json")
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == hashes
    assert manifest["seed"] == SEED


def test_regeneration_in_place_is_byte_identical(mirror, config):
    before = _file_hashes(mirror)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the caller's RNG state must not matter
        make_mirror(mirror, SEED, config)
    assert _file_hashes(mirror) == before


def test_a_different_seed_gives_different_data(tmp_path):
    first, _, _ = demo_mirror.laion_part(np.random.default_rng(1), 0, tmp_path)
    again, _, _ = demo_mirror.laion_part(np.random.default_rng(1), 0, tmp_path)
    other, _, _ = demo_mirror.laion_part(np.random.default_rng(2), 0, tmp_path)
    assert first == again
    assert first != other


def test_laion_parts_have_the_real_columns_and_types(parts, mirror):
    expected = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
                          ("HEIGHT", pa.int32()), ("WIDTH", pa.int32()), ("LICENSE", pa.string()),
                          ("NSFW", pa.string()), ("similarity", pa.float64())])
    ids = []
    for name, table in zip(LAION_PARTS, parts):
        assert table.schema.remove_metadata().equals(expected)
        assert table.num_rows == demo_mirror.ROWS_PER_PART
        assert pq.ParquetFile(mirror / "laion" / name).metadata.row_group(0).column(0).compression == "SNAPPY"
        ids += table.column("SAMPLE_ID").to_pylist()
        urls = table.column("URL").to_pylist()
        assert all(url.startswith((mirror / "laion" / "images").resolve().as_uri() + "/") for url in urls)
        assert set(table.column("NSFW").to_pylist()) <= {"UNLIKELY", "UNSURE", "NSFW"}
        assert all(0.3 <= s <= 0.45 for s in table.column("similarity").to_pylist())
    assert len(set(ids)) == len(ids)


def _decodes(path):
    """Whether img2dataset's decoder (OpenCV) and PIL both accept the file."""
    data = path.read_bytes()
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
        return False
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
    except OSError:
        return False
    return True


def test_planted_defects_come_in_the_intended_numbers(parts):
    licences = set()
    for table in parts:
        rows = table.to_pylist()
        unknown = [r for r in rows if r["LICENSE"] == "?"]
        known = [r for r in rows if r["LICENSE"] != "?"]
        paths = [Path(r["URL"].removeprefix("file://")) for r in known]
        missing = [p for p in paths if not p.exists()]
        corrupt = [p for p in paths if p.exists() and not _decodes(p)]
        assert len(unknown) == demo_mirror.UNKNOWN_LICENCE_ROWS_PER_PART
        assert len(missing) == demo_mirror.MISSING_IMAGE_ROWS_PER_PART
        assert len(corrupt) == demo_mirror.CORRUPT_IMAGE_ROWS_PER_PART
        assert all(_decodes(Path(r["URL"].removeprefix("file://"))) for r in unknown)
        licences |= {r["LICENSE"] for r in known}
    cc_by = {lic for lic in licences if "creativecommons.org/licenses/by/" in lic}
    assert cc_by and licences - cc_by  # both strict CC-BY rows and other known licences


def test_images_are_jpegs_of_the_listed_size(parts):
    for table in parts:
        for row in table.to_pylist():
            path = Path(row["URL"].removeprefix("file://"))
            if path.exists() and _decodes(path):
                with Image.open(path) as image:
                    assert image.format == "JPEG"
                    assert image.size == (row["WIDTH"], row["HEIGHT"])
                    assert 48 <= min(image.size) and max(image.size) <= 128


def test_captions_name_the_colours_drawn_where_they_are_drawn():
    scene = Scene(100, 60, "gray", "left_of", (("red", "square"), ("blue", "circle")))
    image = np.asarray(draw_scene(scene))
    assert tuple(image[30, 27]) == COLOURS["red"]
    assert tuple(image[30, 73]) == COLOURS["blue"]
    caption = laion_caption(scene, np.random.default_rng(0))
    assert caption.startswith("a red square on the left of a blue circle")
    alone = Scene(64, 64, "beige", "alone", (("orange", "triangle"),), place="bottom")
    assert tuple(np.asarray(draw_scene(alone))[50, 32]) == COLOURS["orange"]
    assert laion_caption(alone, np.random.default_rng(0)).startswith("an orange triangle at the bottom")


def test_coco_archives_follow_the_coco_2014_layout(mirror):
    with zipfile.ZipFile(mirror / "coco" / "annotations_trainval2014.zip") as zf:
        document = json.loads(zf.read("annotations/captions_val2014.json"))
    assert set(document) >= {"info", "licenses", "images", "annotations"}
    images = {image["id"]: image for image in document["images"]}
    assert len(images) == demo_mirror.COCO_IMAGES
    with zipfile.ZipFile(mirror / "coco" / "val2014.zip") as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        assert sorted(names) == sorted(f"val2014/{image['file_name']}" for image in images.values())
        for image_id, image in images.items():
            assert image["file_name"] == f"COCO_val2014_{image_id:012d}.jpg"
            with Image.open(io.BytesIO(zf.read(f"val2014/{image['file_name']}"))) as picture:
                assert picture.size == (image["width"], image["height"])
    annotations = document["annotations"]
    assert len({a["id"] for a in annotations}) == len(annotations)
    per_image = {image_id: 0 for image_id in images}
    for annotation in annotations:
        per_image[annotation["image_id"]] += 1
    assert min(per_image.values()) >= 5
    assert any(a["caption"].endswith("\n") for a in annotations)
    assert {image["license"] for image in images.values()} <= {lic["id"] for lic in document["licenses"]}


def test_sd_checkpoint_loads_strictly_into_the_configured_tiny_models(mirror, config):
    raw = torch.load(mirror / "checkpoints" / "512-base-ema.ckpt", weights_only=True, map_location="cpu")
    state = raw["state_dict"]
    assert {name.split(".")[0] + "." for name in state} == {"model.", "first_stage_model.", "cond_stage_model."}
    assert all(name.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.model.")) for name in state)
    params = config["model"]["params"]
    vae_params = params["first_stage_config"]["params"]
    load_part(UNetModel(**params["unet_config"]["params"]), state, UNET_PREFIX, "UNet")
    load_part(AutoencoderKL(vae_params["ddconfig"], vae_params["embed_dim"]), state, VAE_PREFIX, "VAE")
    load_part(FrozenOpenCLIPText(params["cond_stage_config"]["params"]["arch"]), state, TEXT_ENCODER_PREFIX, "text")


def test_inception_file_loads_in_torch_fidelity_and_gives_informative_features(mirror):
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"],
        feature_extractor_weights_path=str(mirror / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"),
    )
    rng = np.random.default_rng(0)
    pictures = [np.asarray(draw_scene(demo_mirror.random_scene(rng, 64, 64))) for _ in range(5)]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception at 299 px: one thread wastes no time waiting on a shared CPU
    try:
        (features,) = extractor(images)
    finally:
        torch.set_num_threads(threads)
    assert features.shape == (5, 2048)
    assert torch.isfinite(features).all()
    assert features.abs().mean() > 1e-2
    centred = features.double().numpy() - features.double().numpy().mean(axis=0)
    assert np.linalg.matrix_rank(centred) == 4  # the covariance has full rank for 5 samples


def test_clip_file_loads_into_open_clip_and_shares_the_text_tower(mirror, config):
    path = mirror / "checkpoints" / "open_clip_pytorch_model.bin"
    arch = config["checkpoints"]["clip"]["arch"]
    model = open_clip.create_model(arch, pretrained=str(path))
    clip_state = load_state_dict_file(path)
    model.load_state_dict(clip_state, strict=True)
    sd_state = load_state_dict_file(mirror / "checkpoints" / "512-base-ema.ckpt")
    text = extract_part(sd_state, "cond_stage_model.model.")
    assert text and all(torch.equal(clip_state[name], value) for name, value in text.items())
    size = model.visual.image_size
    with torch.no_grad():
        image_features = model.encode_image(torch.rand(2, 3, *size))
        text_features = model.encode_text(open_clip.get_tokenizer(arch)(["a red circle", "two blue squares"]))
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
