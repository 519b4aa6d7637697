"""The demo mirror: a tiny, deterministic stand-in for every external input of the benchmark.

    python workflow_scripts/demo_mirror.py --out demo/mirror --seed 2023 --config MIRROR_SLICE.yaml   (rule demo_mirror)

The real pipeline downloads LAION parquet parts, fetches their images by URL, reads the COCO-2014
archives and loads three published checkpoints. The demo points those same sources at a local
directory written here from nothing but a seed, in the same file formats, so every rule runs
unchanged at toy scale. The mirror plants the defects the real data has (unknown licences, dead
URLs, undecodable images, captions with trailing newlines) so that their handling is exercised.

Pictures are coloured shapes at named positions and the captions describe them, so a model
trained on the mirror has something learnable. Every file is produced in memory and written
atomically; `MANIFEST.json` (every file with its sha256) is written last and marks completion.
The same seed and output directory give byte-identical files (URLs in the parquet parts are
absolute `file://` paths, so they depend on the directory).
"""

import contextlib
import hashlib
import io
import json
import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

import sdcore.text_encoder  # noqa: F401  (registers the tiny OpenCLIP configs with open_clip)
from sdcore.autoencoder import AutoencoderKL
from sdcore.fid import InceptionV3Features, gaussian_stats, image_file_features, resize_coco_image
from sdcore.prep.coco import select_prompts, source_image_name
from sdcore.prep.published import write_published_mirror
from sdcore.unet import UNetModel

from sdcore.files import atomic_path

log = logging.getLogger(__name__)

LAION_PARTS = tuple(f"part-{n:05d}-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet" for n in range(3))
ROWS_PER_PART = 100
UNKNOWN_LICENCE_ROWS_PER_PART = 20
MISSING_IMAGE_ROWS_PER_PART = 5
CORRUPT_IMAGE_ROWS_PER_PART = 6
COCO_IMAGES = 48

SD_CHECKPOINT = "checkpoints/512-base-ema.ckpt"
INCEPTION_CHECKPOINT = "checkpoints/pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
CLIP_CHECKPOINT = "checkpoints/open_clip_pytorch_model.bin"
MANIFEST = "MANIFEST.json"

LAION_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int32()),
        ("WIDTH", pa.int32()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
    ]
)
# Known licences as LAION spells them; http/https both occur in the real metadata.
KNOWN_LICENCES = (
    "https://creativecommons.org/licenses/by/4.0/",
    "https://creativecommons.org/licenses/by/2.0/",
    "http://creativecommons.org/licenses/by/3.0/",
    "https://creativecommons.org/licenses/by-sa/4.0/",
    "https://creativecommons.org/licenses/by-nc-sa/2.0/",
    "https://creativecommons.org/licenses/by-nc/3.0/",
    "https://creativecommons.org/licenses/by-nd/4.0/",
)
# The licence table of COCO-2014's annotation files; images refer to it by id (1-8).
COCO_LICENCES = (
    ("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
    ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/"),
    ("Attribution-NonCommercial-NoDerivs License", "http://creativecommons.org/licenses/by-nc-nd/2.0/"),
    ("Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
    ("Attribution-ShareAlike License", "http://creativecommons.org/licenses/by-sa/2.0/"),
    ("Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/"),
    ("No known copyright restrictions", "http://flickr.com/commons/usage/"),
    ("United States Government Work", "http://www.usa.gov/copyright.shtml"),
)
NSFW_LABELS = ("UNLIKELY", "UNSURE", "NSFW")
NSFW_WEIGHTS = (0.8, 0.15, 0.05)

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (240, 210, 40),
    "purple": (135, 55, 170),
    "orange": (245, 135, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (225, 212, 185), "pale blue": (195, 215, 240), "pink": (240, 190, 205)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {  # name -> (phrase, centre as fractions of width and height)
    "left": ("on the left", (0.27, 0.5)),
    "right": ("on the right", (0.73, 0.5)),
    "top": ("at the top", (0.5, 0.27)),
    "bottom": ("at the bottom", (0.5, 0.73)),
    "middle": ("in the middle", (0.5, 0.5)),
}
RELATIONS = ("alone", "left_of", "above", "row")
NUMBER_WORDS = {2: "two", 3: "three"}

ZIP_TIMESTAMP = (2014, 1, 1, 0, 0, 0)  # fixed, so archives are byte-identical across runs


@dataclass(frozen=True)
class Scene:
    """What a picture shows: shapes on a background, and the relation the captions describe.

    `place` is a PLACES key for a lone shape; for `row`, `count` identical shapes stand side by side;
    for `left_of`/`above`, the first shape is left of / above the second.
    """

    width: int
    height: int
    background: str
    relation: str
    shapes: tuple  # ((colour, shape), ...)
    place: str = "middle"
    count: int = 1


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _named(colour, shape):
    return f"{_article(colour)} {colour} {shape}"


def random_scene(rng, width, height):
    """Draw a random scene of the given size from the shape grammar."""
    background = str(rng.choice(list(BACKGROUNDS)))
    relation = str(rng.choice(RELATIONS))

    def random_shape():
        return (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))

    if relation == "alone":
        return Scene(width, height, background, relation, (random_shape(),), place=str(rng.choice(list(PLACES))))
    if relation == "row":
        return Scene(width, height, background, relation, (random_shape(),), count=int(rng.integers(2, 4)))
    first = random_shape()
    second = random_shape()
    while second == first:
        second = random_shape()
    return Scene(width, height, background, relation, (first, second))


def _shape_boxes(scene):
    """(colour, shape, (x0, y0, x1, y1)) for every shape drawn in the scene."""
    w, h = scene.width, scene.height
    if scene.relation == "row":
        size = 0.8 * min(w / (scene.count + 1), h * 0.45)
        centres = [((i + 1) / (scene.count + 1), 0.5) for i in range(scene.count)]
        shapes = scene.shapes * scene.count
    else:
        size = min(w, h) * 0.38
        if scene.relation == "alone":
            centres = [PLACES[scene.place][1]]
        elif scene.relation == "left_of":
            centres = [(0.27, 0.5), (0.73, 0.5)]
        else:
            centres = [(0.5, 0.27), (0.5, 0.73)]
        shapes = scene.shapes
    half = size / 2
    return [
        (colour, shape, (round(cx * w - half), round(cy * h - half), round(cx * w + half), round(cy * h + half)))
        for (colour, shape), (cx, cy) in zip(shapes, centres)
    ]


def draw_scene(scene):
    """Render the scene as an RGB PIL image."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for colour, shape, (x0, y0, x1, y1) in _shape_boxes(scene):
        fill = COLOURS[colour]
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    return image


def laion_caption(scene, rng):
    """A lower-case, web-style caption of the scene (LAION's TEXT column)."""
    if scene.relation == "alone":
        text = f"{_named(*scene.shapes[0])} {PLACES[scene.place][0]}"
    elif scene.relation == "row":
        colour, shape = scene.shapes[0]
        text = f"{NUMBER_WORDS[scene.count]} {colour} {shape}s"
    else:
        link = "on the left of" if scene.relation == "left_of" else "above"
        text = f"{_named(*scene.shapes[0])} {link} {_named(*scene.shapes[1])}"
    if rng.random() < 0.5:
        text += f" on {_named(scene.background, 'background')}"
    return text


def coco_captions(scene):
    """Six differently phrased sentences describing the scene, COCO style."""
    bg = scene.background
    if scene.relation == "alone":
        one, place = _named(*scene.shapes[0]), PLACES[scene.place][0]
        sentences = [
            f"{one} {place}.",
            f"{one} {place} of the picture.",
            f"A single {scene.shapes[0][0]} {scene.shapes[0][1]} on {_named(bg, 'background')}.",
            f"There is {one} {place}.",
            f"{_named(bg, 'background')} with {one} {place}.",
            f"An image of {one}.",
        ]
    elif scene.relation == "row":
        (colour, shape), n = scene.shapes[0], NUMBER_WORDS[scene.count]
        sentences = [
            f"{n} {colour} {shape}s in a row.",
            f"A row of {n} {colour} {shape}s.",
            f"{n} {colour} {shape}s on {_named(bg, 'background')}.",
            f"Some {colour} {shape}s side by side.",
            f"{n} identical {colour} {shape}s next to each other.",
            f"There are {n} {shape}s, all of them {colour}.",
        ]
    else:
        first, second = _named(*scene.shapes[0]), _named(*scene.shapes[1])
        if scene.relation == "left_of":
            sentences = [
                f"{first} on the left of {second}.",
                f"{second} on the right of {first}.",
                f"{first} next to {second}.",
                f"Two shapes, {first} and {second}, on {_named(bg, 'background')}.",
                f"There is {first} to the left of {second}.",
                f"{second} beside {first}.",
            ]
        else:
            sentences = [
                f"{first} above {second}.",
                f"{second} below {first}.",
                f"{first} over {second} on {_named(bg, 'background')}.",
                f"Two shapes stacked: {first} on top and {second} underneath.",
                f"There is {second} under {first}.",
                f"{first} and {second} one above the other.",
            ]
    return [s[0].upper() + s[1:] for s in sentences]


def _jpeg(image):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _corrupt(jpeg_bytes, rng, kind):
    """Bytes under a .jpg name that no decoder accepts: a header cut short, or magic plus noise."""
    if kind == 0:
        return jpeg_bytes[:160]
    return jpeg_bytes[:4] + rng.bytes(len(jpeg_bytes) // 2)


def _random_size(rng):
    """Width and height in 48..128 px, including tall and wide aspect ratios."""
    return int(rng.integers(48, 129)), int(rng.integers(48, 129))


def laion_part(rng, part_index, images_dir):
    """One LAION-style metadata part and its image files.

    Returns (parquet bytes, {file name: bytes}, counts). Rows are assigned roles at random: unknown
    licence ('?'), image missing (URL points at a file never written), image corrupt, or normal.
    Broken images only occur on rows with a known licence, so they reach the image fetcher.
    """
    n = ROWS_PER_PART
    ids = 1_000_000_000 + part_index * 1_000_000 + np.sort(rng.choice(1_000_000, n, replace=False))
    roles = np.array(
        ["unknown"] * UNKNOWN_LICENCE_ROWS_PER_PART
        + ["missing"] * MISSING_IMAGE_ROWS_PER_PART
        + ["corrupt"] * CORRUPT_IMAGE_ROWS_PER_PART
        + ["ok"] * (n - UNKNOWN_LICENCE_ROWS_PER_PART - MISSING_IMAGE_ROWS_PER_PART - CORRUPT_IMAGE_ROWS_PER_PART)
    )
    rng.shuffle(roles)
    columns = {name: [] for name in LAION_SCHEMA.names}
    files = {}
    corrupt_seen = 0
    for sample_id, role in zip(ids.tolist(), roles.tolist()):
        width, height = _random_size(rng)
        scene = random_scene(rng, width, height)
        name = f"{sample_id}.jpg"
        data = _jpeg(draw_scene(scene))
        if role == "corrupt":
            data = _corrupt(data, rng, corrupt_seen % 2)
            corrupt_seen += 1
        if role != "missing":
            files[name] = data
        columns["SAMPLE_ID"].append(sample_id)
        columns["URL"].append((images_dir / name).as_uri())
        columns["TEXT"].append(laion_caption(scene, rng))
        columns["HEIGHT"].append(height)
        columns["WIDTH"].append(width)
        columns["LICENSE"].append("?" if role == "unknown" else str(rng.choice(KNOWN_LICENCES)))
        columns["NSFW"].append(str(rng.choice(NSFW_LABELS, p=NSFW_WEIGHTS)))
        columns["similarity"].append(round(float(rng.uniform(0.3, 0.45)), 6))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns, schema=LAION_SCHEMA), sink, compression="snappy")
    counts = {role: int((roles == role).sum()) for role in ("unknown", "missing", "corrupt", "ok")}
    return sink.getvalue().to_pybytes(), files, counts


def _zip(members, directory):
    """A zip archive holding `directory/` and the given (name, bytes) members, with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        folder = zipfile.ZipInfo(f"{directory}/", date_time=ZIP_TIMESTAMP)
        folder.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(folder, b"")
        for name, data in members:
            info = zipfile.ZipInfo(f"{directory}/{name}", date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".jpg") else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def coco_archives(rng):
    """`val2014.zip` and `annotations_trainval2014.zip` bytes in COCO-2014's layout and JSON format.

    Each image gets 5 or 6 captions (real COCO has 5 to 7); about one caption in ten ends with a
    newline, as some real ones do. Annotations are listed in random order, as in the real file.
    """
    image_ids = np.sort(rng.choice(np.arange(1, 581930), COCO_IMAGES, replace=False)).tolist()
    images, members, captions = [], [], []
    for image_id in image_ids:
        width, height = _random_size(rng)
        scene = random_scene(rng, width, height)
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        members.append((file_name, _jpeg(draw_scene(scene))))
        images.append(
            {
                "license": int(rng.integers(1, len(COCO_LICENCES) + 1)),
                "file_name": file_name,
                "height": height,
                "width": width,
                "date_captured": "2013-11-14 11:18:45",
                "id": image_id,
            }
        )
        sentences = coco_captions(scene)
        for sentence in sentences[: int(rng.integers(5, 7))]:
            captions.append((image_id, sentence + "\n" if rng.random() < 0.1 else sentence))
    annotation_ids = rng.choice(np.arange(1, 830000), len(captions), replace=False).tolist()
    order = rng.permutation(len(captions)).tolist()
    annotations = [
        {"image_id": captions[i][0], "id": annotation_ids[i], "caption": captions[i][1]} for i in order
    ]
    document = {
        "info": {
            "description": "Demo mirror of the 2014 MS COCO captions (generated shapes)",
            "url": "http://mscoco.org",
            "version": "1.0",
            "year": 2014,
            "contributor": "sdcore demo mirror",
            "date_created": "2015-01-27 09:11:52.357475",
        },
        "images": images,
        "licenses": [{"url": url, "id": i + 1, "name": name} for i, (name, url) in enumerate(COCO_LICENCES)],
        "type": "captions",
        "annotations": annotations,
    }
    annotations_zip = _zip([("captions_val2014.json", json.dumps(document).encode())], "annotations")
    counts = {"images": len(images), "captions": len(annotations)}
    return _zip(members, "val2014"), annotations_zip, counts


@contextlib.contextmanager
def _torch_seeded(seed):
    """Seed torch's global generator for a block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _single_thread():
    """Run a block on one thread so float reductions, and hence the saved bytes, are reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _torch_bytes(obj):
    """torch.save into memory: the zip's inner folder is then named 'archive', not after a temp file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _open_clip_state(arch, seed):
    with _torch_seeded(seed):
        return open_clip.create_model(arch).state_dict()


def sd_checkpoint_state(model_params, text_state, seed):
    """The `state_dict` of an SD-style checkpoint for the configured (tiny) model.

    `model_params` is the config's `model.params`. The text encoder part is `text_state`, a full
    OpenCLIP state dict without its visual tower, as in Stability AI's file.
    """
    with _torch_seeded(seed):
        unet = UNetModel(**model_params["unet_config"]["params"])
        vae_params = model_params["first_stage_config"]["params"]
        vae = AutoencoderKL(vae_params["ddconfig"], vae_params["embed_dim"])
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state.update({f"cond_stage_model.model.{k}": v for k, v in text_state.items() if not k.startswith("visual.")})
    return state


def inception_state(calibration_images, seed):
    """A random state dict for the FID Inception-v3 (pytorch-fid's layout) whose 2048-d features stay
    informative.

    Convolutions get He initialisation; each BatchNorm's running statistics are then set from one
    pass over `calibration_images` (float in [0, 1], N x 3 x H x W), so every layer sees unit-scale
    inputs and the pool features neither vanish nor overflow after ~50 layers.
    """
    with _torch_seeded(seed):
        net = InceptionV3Features(None)
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # running stats = exact statistics of the calibration pass
    torch.nn.Module.train(net, True)  # the extractor keeps itself in eval mode; calibrate in train mode
    with torch.no_grad(), _single_thread():
        net(calibration_images)
    torch.nn.Module.train(net, False)
    return net.state_dict()


def _calibration_images(rng, count=4, size=96):
    images = [np.asarray(draw_scene(random_scene(rng, size, size))) for _ in range(count)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def checkpoint_files(config, rng):
    """The three checkpoint files' bytes, from the (merged) pipeline config.

    The SD checkpoint's text encoder and the CLIP-score model share weights when they share an
    architecture, as SD2's text encoder and the benchmark's ViT-H-14 scorer do.
    """
    model_params = config["model"]["params"]
    text_arch = model_params["cond_stage_config"]["params"]["arch"]
    clip_arch = config["checkpoints"]["clip"]["arch"]
    seeds = rng.integers(0, 2**31, 3).tolist()
    text_state = _open_clip_state(text_arch, seeds[0])
    clip_state = _open_clip_state(clip_arch, seeds[0])
    return {
        SD_CHECKPOINT: _torch_bytes({"state_dict": sd_checkpoint_state(model_params, text_state, seeds[1])}),
        INCEPTION_CHECKPOINT: _torch_bytes(inception_state(_calibration_images(rng), seeds[2])),
        CLIP_CHECKPOINT: _torch_bytes(clip_state),
    }


def _write(out_dir, relative, data, manifest):
    with atomic_path(out_dir / relative) as tmp:
        tmp.write_bytes(data)
    manifest[relative] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def published_layout(out_dir, files, config, laion_captions, seed):
    """The mirror's stand-in for the dataset MLCommons publishes (data_source: published), under
    `out_dir`: moment shards with the LAION parts' captions, the COCO prompt subset of the mirror's
    annotations, and its FID statistics, made the reference's way from the mirror's COCO images and
    Inception weights. Returns {relative path: bytes} of what it wrote."""
    import tempfile

    subset = config["coco"]["subset"]
    with zipfile.ZipFile(io.BytesIO(files["coco/annotations_trainval2014.zip"])) as zf:
        annotations = json.loads(zf.read("annotations/captions_val2014.json"))["annotations"]
    prompts = select_prompts(annotations, subset["size"], subset["seed"])
    size = config["coco"]["image_size"]
    with tempfile.TemporaryDirectory() as tmp, _single_thread():
        tmp = Path(tmp)
        weights = tmp / "inception.pth"
        weights.write_bytes(files[INCEPTION_CHECKPOINT])
        with zipfile.ZipFile(io.BytesIO(files["coco/val2014.zip"])) as zf:
            zf.extractall(tmp)
        resized = []
        for image_id in prompts["image_id"]:
            resized.append(tmp / "resized" / source_image_name(image_id))
            resize_coco_image(tmp / "val2014" / source_image_name(image_id), resized[-1], (size, size))
        mu, sigma = gaussian_stats(image_file_features(resized, InceptionV3Features(weights)))
    shards, latent = config["published"]["moments"]["shards"], config["model"]["params"]["image_size"]
    per_shard = config["demo_mirror"]["published_samples_per_shard"]
    captions = [[laion_captions[(shard * per_shard + i) % len(laion_captions)] for i in range(per_shard)]
                for shard in range(shards)]
    mirror = write_published_mirror(out_dir, prompts.to_csv(sep="\t", index=False), {"mu": mu, "sigma": sigma},
                                    shards=shards, samples_per_shard=per_shard, latent_size=(latent, latent),
                                    seed=seed, captions=captions)
    return {relative: (mirror.root / relative).read_bytes() for relative in mirror.files}


def make_mirror(out_dir, seed, config):
    """Write the whole mirror under `out_dir`; return the manifest written to MANIFEST.json.

    `config` is the merged pipeline config (its mirror slice): the checkpoints are built for its
    `model.params` and `checkpoints.clip.arch`. A previous mirror in `out_dir` is replaced, its
    manifest first, so an interrupted run never looks complete.
    """
    out_dir = Path(out_dir).resolve()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    images_dir = out_dir / "laion" / "images"
    shutil.rmtree(images_dir, ignore_errors=True)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(LAION_PARTS) + 2)]
    files = {}
    counts = {"laion": {}}
    captions = []
    for index, part in enumerate(LAION_PARTS):
        parquet, images, part_counts = laion_part(streams[index], index, images_dir)
        files[f"laion/{part}"] = parquet
        files.update({f"laion/images/{name}": data for name, data in images.items()})
        counts["laion"][part] = part_counts
        captions += pq.read_table(pa.BufferReader(parquet), columns=["TEXT"])["TEXT"].to_pylist()
    val_zip, annotations_zip, counts["coco"] = coco_archives(streams[len(LAION_PARTS)])
    files["coco/val2014.zip"] = val_zip
    files["coco/annotations_trainval2014.zip"] = annotations_zip
    log.info("building checkpoints")
    files.update(checkpoint_files(config, streams[len(LAION_PARTS) + 1]))
    manifest_files = {}
    for relative in sorted(files):
        _write(out_dir, relative, files[relative], manifest_files)
    log.info("building the published layout")
    for relative, data in published_layout(out_dir / "published", files, config, captions, seed).items():
        manifest_files[f"published/{relative}"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    counts["published"] = {"shards": config["published"]["moments"]["shards"],
                           "samples_per_shard": config["demo_mirror"]["published_samples_per_shard"]}
    manifest = {"seed": seed, "counts": counts, "files": manifest_files}
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("wrote %d files under %s", len(manifest_files), out_dir)
    return manifest


def main():
    import argparse
    import time

    import yaml

    from sdcore.logs import setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="mirror directory; MANIFEST.json is written there last")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--config", required=True, help="the mirror's config slice (model.params, checkpoints.clip.arch, ...)")
    args = parser.parse_args()
    setup_logging()
    with open(args.config) as f:
        config = yaml.safe_load(f)
    start = time.perf_counter()
    manifest = make_mirror(args.out, args.seed, config)
    log.info("mirror of %d files in %.1f s: %s", len(manifest["files"]), time.perf_counter() - start, manifest["counts"])


if __name__ == "__main__":
    main()
