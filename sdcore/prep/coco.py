"""COCO-2014 validation: safe extraction, the 30k prompt subset, resized images, FID statistics.

The resize and the statistics are sdcore.fid's (the reference's coco-split-resize.py and pytorch-fid).

The subset follows the reference's COCO script (SPEC section 1): captions with newlines removed
(and surrounding blanks stripped, as the reference's `x.replace('\\n', '').strip()`), a shuffle
with `sample(frac=1, random_state=seed)`, the first caption per image, the first `size` rows,
sorted by annotation id, written as a tab-separated file with a header and no index.
"""

import concurrent.futures
import logging
import shutil
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd

from sdcore.files import atomic_path, read_json
from . import PrepError, resolve_device

log = logging.getLogger(__name__)

TSV_COLUMNS = ["image_id", "id", "caption"]


def source_image_name(image_id):
    """File name of a val2014 image, as in val2014.zip."""
    return f"COCO_val2014_{int(image_id):012d}.jpg"


def _safe_relative(zip_path, name):
    """Reject member paths that would escape the output directory (absolute, '..', drive letters)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name or not path.parts:
        raise PrepError(f"{zip_path}: unsafe member path {name!r}")
    return Path(*path.parts)


def extract_zip(zip_path, member_prefix, out_dir, marker):
    """Extract the members whose names start with `member_prefix` into `out_dir`; return their count.

    A member keeps its path below the directory part of the prefix: with prefix "val2014/" the
    file "val2014/x.jpg" becomes out_dir/x.jpg; with "annotations/captions_val2014.json" it
    becomes out_dir/captions_val2014.json. Each file is written under a temporary name and
    renamed; the marker file (removed first) is written last. CRC errors name the member.
    """
    out_dir = Path(out_dir)
    Path(marker).unlink(missing_ok=True)
    strip = member_prefix.rpartition("/")[0]
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(member_prefix) and not m.is_dir()]
            if not members:
                raise PrepError(f"{zip_path}: no member starts with {member_prefix!r}")
            # Every path is checked before anything is written.
            targets = [out_dir / _safe_relative(zip_path, m.filename[len(strip):].lstrip("/")) for m in members]
            for member, target in zip(members, targets):
                with zf.open(member) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise PrepError(f"{zip_path}: corrupt or unreadable zip: {err}") from err
    with atomic_path(marker) as tmp:
        tmp.write_text(f"{len(members)} files from {Path(zip_path).name} ({member_prefix})\n")
    log.info("%s: %d members under %r extracted to %s", zip_path, len(members), member_prefix, out_dir)
    return len(members)


def select_prompts(annotations, size, seed=2023):
    """The reference's prompt subset of a COCO captions `annotations` list, as a DataFrame."""
    df = pd.DataFrame(annotations)[TSV_COLUMNS]
    df["caption"] = df["caption"].str.replace("\n", "", regex=False).str.strip()
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    df = df.drop_duplicates("image_id", keep="first")
    return df.head(size).sort_values("id")


def write_subset(annotations_path, out_tsv, size, seed=2023):
    """Write val2014_30k.tsv (or a smaller subset); fewer distinct images than `size` is an error."""
    data = read_json(annotations_path)
    if "annotations" not in data:
        raise PrepError(f"{annotations_path}: no 'annotations' list (not a COCO captions file?)")
    subset = select_prompts(data["annotations"], size, seed)
    if len(subset) < size:
        raise PrepError(f"{annotations_path}: only {len(subset)} distinct images, {size} requested")
    with atomic_path(out_tsv) as tmp:
        subset.to_csv(tmp, sep="\t", index=False)
    log.info("%s: %d prompts written to %s", annotations_path, len(subset), out_tsv)
    return subset


def read_subset(tsv_path):
    """The prompt subset TSV as written by write_subset."""
    try:
        return pd.read_csv(tsv_path, sep="\t", dtype={"image_id": "int64", "id": "int64", "caption": str},
                           keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise PrepError(f"{tsv_path}: cannot read the prompt TSV: {err}") from err


def _resize_one(args):
    from sdcore.fid import FidError, resize_coco_image

    src, dst, size = args
    try:
        resize_coco_image(src, dst, (size, size))
    except FidError as error:  # a missing or undecodable source image, named in the message
        raise PrepError(str(error)) from error


def resize_images(tsv_path, images_dir, out_dir, size, marker, workers=1):
    """Resize the subset's images as the reference's coco-split-resize.py (size x size bicubic, aspect
    not kept, the original .jpg name, so JPEG at PIL's default quality); marker last."""
    from sdcore.logs import ProgressLog

    Path(marker).unlink(missing_ok=True)
    image_ids = read_subset(tsv_path)["image_id"].tolist()
    jobs = [(Path(images_dir) / source_image_name(i), Path(out_dir) / source_image_name(i), size) for i in image_ids]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    progress = ProgressLog("resize", len(jobs), "images")
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_resize_one, jobs, chunksize=64):
                progress.update()
    else:
        for job in jobs:
            _resize_one(job)
            progress.update()
    with atomic_path(marker) as tmp:
        tmp.write_text(f"{len(jobs)} images at {size}x{size}\n")
    log.info("%d images resized to %dx%d in %s", len(jobs), size, size, out_dir)
    return len(jobs)


def fid_stats(images_dir, tsv_path, inception, out_npz, batch_size=50, device="auto"):
    """Save ``mu`` and ``sigma`` of the resized images' Inception features, read as pytorch-fid reads
    image files (sdcore.fid), in TSV order."""
    from sdcore.fid import FidError, InceptionV3Features, gaussian_stats, image_file_features, save_stats

    extractor = InceptionV3Features(inception, resolve_device(device))
    paths = [Path(images_dir) / source_image_name(i) for i in read_subset(tsv_path)["image_id"]]
    try:
        features = image_file_features(paths, extractor, batch_size)
    except FidError as error:  # an unreadable image, or one of another size, named in the message
        raise PrepError(str(error)) from error
    mu, sigma = gaussian_stats(features)
    save_stats(out_npz, mu, sigma)
    log.info("FID statistics of %d images written to %s", len(features), out_npz)
    return mu, sigma
