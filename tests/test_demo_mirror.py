"""The demo mirror (workflow_scripts/demo_mirror.py): real formats, planted defects in the intended numbers,
loadable tiny checkpoints, the published-layout stand-in made the reference's way, and byte-identical
regeneration."""

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
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

from sdcore.checkpoint import StableDiffusionCheckpoint, extract_part, load_state_dict_file
from sdcore.fid import InceptionV3Features
from sdcore.prep.coco import select_prompts

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))
import demo_mirror  # noqa: E402
from demo_mirror import COLOURS, LAION_PARTS, Scene, draw_scene, laion_caption, make_mirror  # noqa: E402

# Generating the mirror (every source of the demo) takes a minute: the end-to-end tier.
pytestmark = pytest.mark.slow
SEED = 7
# What the rule demo_mirror hands the generator: rules/common.smk, CONFIG_SLICES["mirror"].
MIRROR_KEYS = ["model.params", "checkpoints.clip.arch", "coco.subset", "coco.image_size", "published.moments.shards",
               "demo_mirror.published_samples_per_shard"]


def config_slice(config, dotted_keys):
    """The sub-tree of ``config`` holding only the given dotted keys (rules/common.smk: config_slice)."""
    sliced = {}
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        source, target = config, sliced
        for key in parents:
            source, target = source[key], target.setdefault(key, {})
        target[leaf] = source[leaf]
    return sliced


@pytest.fixture(scope="module")
def config():
    """The mirror's slice of config.yaml with the demo overrides merged over it, as Snakemake merges
    --configfile files and the rule demo_mirror slices them."""
    merged = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(merged, yaml.safe_load((REPO / "profiles" / "demo" / "demo-config.yaml").read_text()))
    return config_slice(merged, MIRROR_KEYS)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, config):
    """A mirror generated once through the command-line script, as the workflow rule runs it."""
    root = tmp_path_factory.mktemp("demo")
    config_path = root / "mirror.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = root / "mirror"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    process = subprocess.run(
        [sys.executable, str(REPO / "workflow_scripts" / "demo_mirror.py"),
         "--out", str(out), "--seed", str(SEED), "--config", str(config_path)],
        env=env, capture_output=True, text=True,
    )
    assert process.returncode == 0, process.stderr
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
    raw = torch.load(mirror / demo_mirror.SD_CHECKPOINT, weights_only=True, map_location="cpu")
    state = raw["state_dict"]
    assert {name.split(".")[0] + "." for name in state} == {"model.", "first_stage_model.", "cond_stage_model."}
    assert all(name.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."))
               for name in state)
    params = config["model"]["params"]
    checkpoint = StableDiffusionCheckpoint(mirror / demo_mirror.SD_CHECKPOINT)  # strict: every name and shape
    checkpoint.unet(params["unet_config"]["params"])
    checkpoint.vae(params["first_stage_config"]["params"], params["scale_factor"])
    checkpoint.text_encoder(params["cond_stage_config"]["params"])


def test_sd_checkpoint_vae_is_an_autoencoder_of_the_scenes(mirror, config):
    """Not random: through the pipeline's path (the latent job's preprocessing in [0, 1], moments, a latent drawn
    x scale_factor, decode_latents) fresh scenes come back with their colours where they were drawn (a random
    VAE: L1 ~0.5), in SD's [-1, 1] as well, and the latents have about unit scale, as SD's do."""
    from sdcore.autoencoder import sample_from_moments
    from sdcore.prep.latents import reference_transform

    params = config["model"]["params"]
    first_stage = params["first_stage_config"]["params"]
    vae = StableDiffusionCheckpoint(mirror / demo_mirror.SD_CHECKPOINT).vae(first_stage, params["scale_factor"])
    rng = np.random.default_rng(0)
    transform = reference_transform(first_stage["ddconfig"]["resolution"])
    images = torch.stack([transform(draw_scene(demo_mirror.random_scene(rng, *demo_mirror._random_size(rng))))
                          for _ in range(12)])
    with torch.no_grad():
        latents = sample_from_moments(vae.moments(images), params["scale_factor"], torch.Generator().manual_seed(0))
        decoded = vae.decode_latents(latents)
        sd_range = 2 * images - 1
        sd_decoded = vae.decode(vae.moments(sd_range)[:, :first_stage["embed_dim"]])
    assert 0.7 < latents.std().item() < 1.4
    assert latents.shape[1:] == (4, 8, 8)
    assert (decoded - images).abs().mean().item() < 0.06
    assert (sd_decoded - sd_range).abs().mean().item() < 0.13
    corner = (slice(None), slice(None), slice(2, 10), slice(2, 10))  # background in these scenes
    assert (decoded[corner].mean((2, 3)) - images[corner].mean((2, 3))).abs().max().item() < 0.08


def pytorch_fid_inception(weights):
    """pytorch-fid's own InceptionV3 (FID variant, pool3), its weight download replaced by ``weights``."""
    import pytorch_fid.inception as pf_inception

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pf_inception, "load_state_dict_from_url",
                      lambda url, *args, **kwargs: torch.load(weights, map_location="cpu", weights_only=True))
        return pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def test_inception_file_is_pytorch_fid_layout_and_gives_informative_features(mirror):
    weights = mirror / demo_mirror.INCEPTION_CHECKPOINT
    assert weights.name == "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid downloads
    rng = np.random.default_rng(0)
    pictures = [np.asarray(draw_scene(demo_mirror.random_scene(rng, 64, 64))) for _ in range(5)]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception at 299 px: one thread wastes no time waiting on a shared CPU
    try:
        ours = InceptionV3Features(weights)(images).double().numpy()  # strict load of the whole layout
        with torch.no_grad():
            theirs = pytorch_fid_inception(weights)(images)[0].flatten(1).double().numpy()  # strict as well
    finally:
        torch.set_num_threads(threads)
    assert ours.shape == (5, 2048) and np.isfinite(ours).all()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert np.abs(ours).mean() > 1e-2
    centred = ours - ours.mean(axis=0)
    assert np.linalg.matrix_rank(centred) == 4  # the covariance has full rank for 5 samples
    assert centred.std(axis=0).max() > 0.05 * np.abs(ours).max()  # features vary with the picture


def test_clip_file_loads_into_open_clip_and_shares_the_text_tower(mirror, config):
    path = mirror / demo_mirror.CLIP_CHECKPOINT
    arch = config["checkpoints"]["clip"]["arch"]
    model = open_clip.create_model(arch, pretrained=str(path))
    clip_state = load_state_dict_file(path)
    model.load_state_dict(clip_state, strict=True)
    sd_state = load_state_dict_file(mirror / demo_mirror.SD_CHECKPOINT)
    text = extract_part(sd_state, "cond_stage_model.model.")
    assert text and all(torch.equal(clip_state[name], value) for name, value in text.items())
    size = model.visual.image_size
    with torch.no_grad():
        image_features = model.encode_image(torch.rand(2, 3, *size))
        text_features = model.encode_text(open_clip.get_tokenizer(arch)(["a red circle", "two blue squares"]))
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()


# ---- published/: the stand-in for MLCommons' prepared dataset --------------------------------------------


def test_published_coco_prompts_are_the_reference_subset_of_the_mirrors_captions(mirror, config):
    with zipfile.ZipFile(mirror / "coco" / "annotations_trainval2014.zip") as zf:
        annotations = json.loads(zf.read("annotations/captions_val2014.json"))["annotations"]
    subset = config["coco"]["subset"]
    expected = select_prompts(annotations, subset["size"], subset["seed"]).to_csv(sep="\t", index=False)
    published = (mirror / "published" / "coco2014" / "val2014_30k.tsv").read_text()
    assert published == expected
    rows = list(csv.reader(io.StringIO(published), delimiter="\t"))
    assert rows[0] == ["image_id", "id", "caption"] and len(rows) == 1 + subset["size"]


def test_published_fid_stats_are_pytorch_fids_of_the_resized_mirror_images(mirror, config, tmp_path):
    """The reference's way, written out independently: coco-split-resize.py (PIL bicubic, JPEG at PIL's default
    quality under the original name), then pytorch-fid's calculate_activation_statistics on those files."""
    import pytorch_fid.fid_score as pf_score

    size = config["coco"]["image_size"]
    tsv = mirror / "published" / "coco2014" / "val2014_30k.tsv"
    image_ids = [int(row["image_id"]) for row in csv.DictReader(tsv.open(), delimiter="\t")]
    files = []
    with zipfile.ZipFile(mirror / "coco" / "val2014.zip") as zf:
        for image_id in image_ids:
            name = f"COCO_val2014_{image_id:012d}.jpg"
            with Image.open(io.BytesIO(zf.read(f"val2014/{name}"))) as image:
                image.resize((size, size), Image.Resampling.BICUBIC).save(tmp_path / name)
            files.append(str(tmp_path / name))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mu, sigma = pf_score.calculate_activation_statistics(
            files, pytorch_fid_inception(mirror / demo_mirror.INCEPTION_CHECKPOINT), batch_size=50, dims=2048,
            device="cpu", num_workers=0)
    finally:
        torch.set_num_threads(threads)
    with np.load(mirror / "published" / "coco2014" / "val2014_30k_stats.npz") as published:
        assert {"mu", "sigma"} <= set(published.files)
        assert published["mu"].shape == (2048,) and published["sigma"].shape == (2048, 2048)
        assert np.abs(published["mu"] - mu).max() <= 1e-4 * np.abs(mu).max()
        assert np.abs(published["sigma"] - sigma).max() <= 1e-3 * np.abs(sigma).max()
    assert np.abs(sigma).max() > 0


def test_published_moment_shards_carry_the_laion_captions(mirror, config, parts):
    moments = mirror / "published" / "laion-400m" / "moments-webdataset-filtered"
    shards = config["published"]["moments"]["shards"]
    per_shard = config["demo_mirror"]["published_samples_per_shard"]
    names = [f"{i:05d}.tar" for i in range(shards)]
    assert sorted(p.name for p in moments.iterdir()) == sorted(names + ["sha512sums.txt"])
    sums = dict(line.split()[::-1] for line in (moments / "sha512sums.txt").read_text().splitlines())
    laion_captions = set(caption for table in parts for caption in table.column("TEXT").to_pylist())
    latent = config["model"]["params"]["image_size"]
    for name in names:
        assert hashlib.sha512((moments / name).read_bytes()).hexdigest() == sums[name]
        with tarfile.open(moments / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        captions = [data.decode() for member, data in members.items() if member.endswith(".txt")]
        assert len(captions) == per_shard and set(captions) <= laion_captions
        moment = np.load(io.BytesIO(next(data for member, data in members.items() if member.endswith(".npy"))))
        assert moment.dtype == np.float32 and moment.shape == (1, 8, latent, latent)
