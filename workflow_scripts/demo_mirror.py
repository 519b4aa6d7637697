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
import math
import shutil
import time
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
from sdcore.autoencoder import SCALE_FACTOR, AutoencoderKL
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


# ---- The SD checkpoint's VAE: a real autoencoder of the mirror's scenes -----------------------------------
#
# A random VAE decodes every latent to coloured noise, so nothing the demo's UNet learns would show. The
# mirror's VAE is instead built, not trained (training it on this CPU took minutes for an L1 gain of
# ~0.005), as a "thumbnail" autoencoder of the scenes:
#
# * Initialisation (_thumbnail_init): every residual branch and attention output starts at zero, so the
#   network is its linear trunk, and the trunk's weights are set so that the latent's first three channels
#   are the 8x8 block means of the image's colour channels and the decoder upsamples them back. The
#   GroupNorms the trunk must pass are handled exactly: in the 128-wide 4-channel groups each colour
#   travels as a pair (a, -a) next to constants (K, -K), so the group mean is 0 and its variance ~K^2/2
#   whatever the image; silu(n) - silu(-n) = n undoes the SiLU. The decoder's last GroupNorm has one
#   channel per group (32 channels, 32 groups): it removes every channel's image mean. Its input is kept
#   far below the norm's eps (1e-6), where the norm is linear, and the lost image mean is put back from a
#   channel holding the global mean (the mid attention with zero queries and keys averages over all
#   positions) spread by an all-ones 3x3 convolution, whose zero padding makes a border pattern that
#   survives the mean removal; silu ~ relu on the two signs of that pattern gives the interior and the
#   edge pixels. The upsampling convolutions blur (nearest 2x + [1 2 1] = bilinear 2x), so the decoder
#   turns the 8x8 colour means back into smooth blobs of the right colours on the right backgrounds.
# * Calibration (_standardise_latents): an exact reparameterisation of quant_conv/post_quant_conv that
#   centres the latent channels and scales them so that latents x scale_factor have unit standard
#   deviation on the pipeline's inputs, the way SD's 0.18215 was chosen.
#
# The pipeline encodes images in [0, 1] (the reference's ToTensor without rescaling, kept on purpose) and
# maps decoded images from [-1, 1] to [0, 1], so an identity VAE shows the demo's samples with half
# their contrast, as the reference with Stability AI's VAE would.

VAE_CALIBRATION_IMAGES = 64

_REF = 20.0       # the constants (K, -K) beside each colour pair in 4-channel groups; colours stay within +-1.5
_LATENT_GAIN = 4.0   # latent units per unit of colour before calibration
_MEAN_OFFSET = 2.0   # the global mean travels as mean + offset > 0, so silu ~ relu can split its border pattern
_DEC_GAIN, _MEAN_GAIN = 10.0, 50.0   # decoder trunk scales
_TINY, _TINY_MEAN = 1e-4, 2e-5       # decoder level-0 scales: variance << GroupNorm eps
_NORM_GAIN, _MEAN_NORM_GAIN = 10.0, 5000.0
_POSTERIOR_LOGVAR = -8.0


def _check_thumbnail_shape(ddconfig, embed_dim):
    expected = {"ch": 32, "ch_mult": [1, 2, 4, 4], "z_channels": 4, "in_channels": 3, "out_ch": 3, "double_z": True}
    actual = {key: (list(ddconfig[key]) if key == "ch_mult" else ddconfig[key]) for key in expected}
    if actual != expected or embed_dim != 4:
        raise ValueError(f"the demo mirror builds its VAE for {expected} and embed_dim 4 (32-group norms: groups "
                         f"of 1 channel at level 0, 4 at the 128-wide levels); got {actual}, embed_dim {embed_dim}")


@torch.no_grad()
def _thumbnail_init(vae, image_size):
    """Set `vae`'s weights to the exact 8x8 colour-thumbnail autoencoder described above."""
    from sdcore.autoencoder import AttnBlock, ResnetBlock

    def clear(*convs):
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()

    def average_2x2(conv, channels):  # Downsample pads right/bottom; taps [0:2, 0:2] stay inside
        clear(conv)
        for c in channels:
            conv.weight[c, c, :2, :2] = 0.25

    def blur(conv, channels):
        for c in channels:
            conv.weight[c, c] = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16

    def centre_tap(conv, channels):
        clear(conv)
        for c in channels:
            conv.weight[c, c, 1, 1] = 1.0

    for module in vae.modules():
        if isinstance(module, ResnetBlock):
            clear(module.conv2)
        elif isinstance(module, AttnBlock):
            clear(module.proj_out)
    enc, dec = vae.encoder, vae.decoder
    colour_pairs = range(6)  # channels 2j, 2j+1: +-(x_j - 0.5), j = R, G, B
    grouped = [4 * j + k for j in range(3) for k in range(4)]  # group j: (a_j, -a_j, K, -K)
    n_scale = math.sqrt(2.0) / _REF  # a 4-channel group (a, -a, K, -K) normalises a to ~ a * sqrt(2) / K

    # Encoder: colour pairs, three 2x2 means, grouped with constants before norm_out.
    clear(enc.conv_in)
    for j in range(3):
        enc.conv_in.weight[2 * j, j, 1, 1], enc.conv_in.bias[2 * j] = 1.0, -0.5
        enc.conv_in.weight[2 * j + 1, j, 1, 1], enc.conv_in.bias[2 * j + 1] = -1.0, 0.5
    average_2x2(enc.down[0].downsample.conv, colour_pairs)
    nin = enc.down[1].block[0].nin_shortcut
    clear(nin)
    for c in colour_pairs:
        nin.weight[c, c] = 1.0
    average_2x2(enc.down[1].downsample.conv, colour_pairs)
    nin = enc.down[2].block[0].nin_shortcut
    clear(nin)
    for j in range(3):
        nin.weight[4 * j, 2 * j] = nin.weight[4 * j + 1, 2 * j + 1] = 1.0
        nin.bias[4 * j + 2], nin.bias[4 * j + 3] = _REF, -_REF
    average_2x2(enc.down[2].downsample.conv, grouped)
    clear(enc.conv_out, vae.quant_conv, vae.post_quant_conv)
    for j in range(3):
        enc.conv_out.weight[j, 4 * j, 1, 1] = _LATENT_GAIN / n_scale
        enc.conv_out.weight[j, 4 * j + 1, 1, 1] = -_LATENT_GAIN / n_scale
    enc.conv_out.bias[4:] = _POSTERIOR_LOGVAR
    vae.quant_conv.weight[:, :, 0, 0] = torch.eye(8)
    vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(4)

    # Decoder: the same groups at 8x8; the mid attention writes mean + offset into 12..17 (pairs).
    clear(dec.conv_in)
    for j in range(3):
        dec.conv_in.weight[4 * j, j, 1, 1] = _DEC_GAIN / _LATENT_GAIN
        dec.conv_in.weight[4 * j + 1, j, 1, 1] = -_DEC_GAIN / _LATENT_GAIN
        dec.conv_in.bias[4 * j + 2], dec.conv_in.bias[4 * j + 3] = _REF * _DEC_GAIN, -_REF * _DEC_GAIN
    attn = dec.mid.attn_1
    clear(attn.q, attn.k, attn.v, attn.proj_out)  # zero scores: uniform weights, the output is the mean of v
    for j in range(3):
        for c, sign in ((12 + 2 * j, 1.0), (13 + 2 * j, -1.0)):
            attn.v.weight[c, 4 * j, 0, 0] = sign
            attn.proj_out.weight[c, c, 0, 0] = _MEAN_GAIN / n_scale
            attn.proj_out.bias[c] = sign * _MEAN_GAIN * _MEAN_OFFSET
        # the colour pairs become deviations from the mean, so the zero padding of the blurs below pulls
        # the image's edge towards its mean colour (nearly the background's), not towards grey
        attn.proj_out.weight[4 * j, 12 + 2 * j, 0, 0] = -_DEC_GAIN / n_scale
        attn.proj_out.weight[4 * j + 1, 12 + 2 * j, 0, 0] = _DEC_GAIN / n_scale
    pairs = [4 * j + k for j in range(3) for k in range(2)]
    for up in (dec.up[3].upsample.conv, dec.up[2].upsample.conv):  # nearest 2x + this blur = bilinear 2x
        centre_tap(up, range(12, 18))
        blur(up, pairs)
    nin = dec.up[1].block[0].nin_shortcut
    clear(nin)
    for j in range(3):
        nin.weight[2 * j, 4 * j] = nin.weight[2 * j + 1, 4 * j + 1] = 1.0
    for k in range(6):
        nin.weight[6 + k, 12 + k] = 1.0
    up = dec.up[1].upsample.conv
    clear(up)
    blur(up, colour_pairs)
    up.weight[6:12, 6:12] = torch.eye(6)[:, :, None, None]  # all nine taps: the mean times a border pattern
    nin = dec.up[0].block[0].nin_shortcut
    clear(nin)
    for c in range(6):
        nin.weight[c, c] = _TINY / _DEC_GAIN
    for c in range(6, 12):
        nin.weight[c, c] = _TINY_MEAN / _MEAN_GAIN
    dec.norm_out.weight[:6] = _NORM_GAIN
    dec.norm_out.weight[6:12] = _MEAN_NORM_GAIN
    # After the per-channel mean removal the border pattern is d_in > 0 inside and -d_edge on edge pixels.
    taps = torch.nn.functional.conv2d(torch.ones(1, 1, image_size, image_size), torch.ones(1, 1, 3, 3), padding=1)
    d_in, d_edge = 9.0 - taps.mean().item(), taps.mean().item() - 6.0
    linear = 1.0 / (_NORM_GAIN * _TINY * 1e3)  # 1e3 = 1 / sqrt(eps)
    mean_gain = _MEAN_NORM_GAIN * _TINY_MEAN * 1e3
    clear(dec.conv_out)
    for j in range(3):
        dec.conv_out.weight[j, 2 * j, 1, 1], dec.conv_out.weight[j, 2 * j + 1, 1, 1] = linear, -linear
        dec.conv_out.weight[j, 6 + 2 * j, 1, 1] = 1.0 / (mean_gain * d_in)
        dec.conv_out.weight[j, 7 + 2 * j, 1, 1] = 1.0 / (mean_gain * d_edge)
        dec.conv_out.bias[j] = 0.5 - _MEAN_OFFSET


def _scene_tensors(rng, count, image_size):
    """Fresh scenes as the latent job sees LAION images: JPEG, ToTensor in [0, 1], resize and centre crop."""
    from sdcore.prep.latents import reference_transform

    transform = reference_transform(image_size)
    images = []
    for _ in range(count):
        width, height = _random_size(rng)
        with Image.open(io.BytesIO(_jpeg(draw_scene(random_scene(rng, width, height))))) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


@torch.no_grad()
def _standardise_latents(vae, images, scale_factor):
    """Centre the latent means per channel and scale them to std 1 / scale_factor on `images`, exactly:
    quant_conv's mean rows and post_quant_conv absorb the affine map, the log-variance its log-scale."""
    channels = vae.post_quant_conv.in_channels
    mean = vae.moments(images)[:, :channels].double()
    centre = mean.mean(dim=(0, 2, 3))
    gain = 1.0 / (scale_factor * (mean - centre[None, :, None, None]).std().item())
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.bias[:channels] = gain * (quant.bias[:channels] - centre.float())
    quant.weight[:channels] *= gain
    quant.bias[channels:] += 2 * math.log(gain)
    post.bias += (post.weight[:, :, 0, 0].double() @ centre).float()
    post.weight /= gain


def scene_vae(ddconfig, embed_dim, scale_factor, seed):
    """The mirror's VAE: the thumbnail autoencoder, calibrated on fresh scenes (see above). Reproducible
    bytes: seeded and on one thread."""
    _check_thumbnail_shape(ddconfig, embed_dim)
    image_size = ddconfig["resolution"]
    rng = np.random.default_rng(seed)
    with _torch_seeded(seed), _single_thread():
        vae = AutoencoderKL(ddconfig, embed_dim)
        _thumbnail_init(vae, image_size)
        _standardise_latents(vae, _scene_tensors(rng, VAE_CALIBRATION_IMAGES, image_size), scale_factor)
    return vae


def sd_checkpoint_state(model_params, text_state, seed):
    """The `state_dict` of an SD-style checkpoint for the configured (tiny) model.

    `model_params` is the config's `model.params`. The text encoder part is `text_state`, a full
    OpenCLIP state dict without its visual tower, as in Stability AI's file. The UNet is random (the
    demo trains it); the VAE is an autoencoder of the mirror's scenes (scene_vae).
    """
    with _torch_seeded(seed):
        unet = UNetModel(**model_params["unet_config"]["params"])
    vae_params = model_params["first_stage_config"]["params"]
    vae = scene_vae(vae_params["ddconfig"], vae_params["embed_dim"],
                      model_params.get("scale_factor", SCALE_FACTOR), seed)
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
