"""LAION-400M metadata: licence filter, filter summary, and image fetch with img2dataset.

The reference keeps every row whose LICENSE is not '?' (pandas `df[df['LICENSE'] != '?']`,
which also keeps rows with a null licence) although its README calls the result CC-BY; that is
the default mode here. Mode "cc-by" keeps only licence URLs under creativecommons.org/licenses/by/.
"""

import collections
import json
import logging
import math
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdcore.files import atomic_path, read_json, write_json
from . import PrepError

log = logging.getLogger(__name__)

FILTER_MODES = ("reference", "cc-by")
CC_BY_PATTERN = r"^\s*https?://(www\.)?creativecommons\.org/licenses/by/"
NULL_LICENCE = "<null>"

# img2dataset parameters of the reference's laion400m-download-dataset.sh (one call per part here).
IMG2DATASET_FIXED = dict(
    input_format="parquet",
    url_col="URL",
    caption_col="TEXT",
    output_format="webdataset",
    resize_mode="no",
    # "overwrite" deletes the folder it is about to write into in img2dataset 1.47;
    # "incremental" skips shards whose NNNNN_stats.json exists, so a re-run resumes.
    incremental_mode="incremental",
    enable_wandb=False,
    distributor="multiprocessing",
)
EXTRA_COLUMNS = ("SAMPLE_ID", "LICENSE", "NSFW", "similarity", "WIDTH", "HEIGHT")


def read_parquet(path, columns=None):
    """Read a parquet file with pyarrow; a truncated or corrupt file raises PrepError naming it."""
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise PrepError(f"{path}: cannot read parquet (truncated or corrupt?): {err}") from err
    return table


def _require_columns(path, table, columns):
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PrepError(f"{path}: missing column(s) {missing}; has {table.column_names}")


def licence_mask(licences, mode):
    """Boolean keep-mask over a LICENSE column for the given filter mode (nulls: see module doc)."""
    if mode == "reference":
        return pc.fill_null(pc.not_equal(licences, "?"), True)
    if mode == "cc-by":
        return pc.fill_null(pc.match_substring_regex(licences, CC_BY_PATTERN, ignore_case=True), False)
    raise ValueError(f"unknown filter mode {mode!r}; expected one of {FILTER_MODES}")


def licence_counts(licences):
    """{licence: rows} with null licences under NULL_LICENCE."""
    counts = collections.Counter(NULL_LICENCE if v is None else v for v in licences.to_pylist())
    return dict(counts.most_common())


def filter_part(in_path, out_path, report_path, mode="reference"):
    """Filter one metadata part by licence; write the kept rows (same schema) and a JSON report."""
    table = read_parquet(in_path)
    _require_columns(in_path, table, ["LICENSE"])
    kept = table.filter(licence_mask(table["LICENSE"], mode))
    with atomic_path(out_path) as tmp:
        pq.write_table(kept, tmp)
    report = {
        "file": Path(in_path).name,
        "mode": mode,
        "rows_in": table.num_rows,
        "rows_kept": kept.num_rows,
        "licences": licence_counts(kept["LICENSE"]),
    }
    write_json(report_path, report)
    log.info("%s: kept %d of %d rows (mode %s)", in_path, kept.num_rows, table.num_rows, mode)
    return report


def summarize_filter(report_paths, out_path):
    """Aggregate per-part filter reports into one summary (totals and per-licence counts)."""
    reports = [read_json(p) for p in report_paths]
    licences = collections.Counter()
    for r in reports:
        licences.update(r["licences"])
    summary = {
        "parts": len(reports),
        "modes": sorted({r["mode"] for r in reports}),
        "rows_in": sum(r["rows_in"] for r in reports),
        "rows_kept": sum(r["rows_kept"] for r in reports),
        "licences": dict(licences.most_common()),
        "per_part": {r["file"]: {"rows_in": r["rows_in"], "rows_kept": r["rows_kept"]} for r in reports},
    }
    write_json(out_path, summary)
    return summary


def error_kind(message):
    """Collapse an img2dataset error message to its kind: quoted names and URLs removed."""
    message = re.sub(r"\w+://\S+", "<url>", message)
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "<name>", message)
    return message.strip()


def summarize_fetch(out_dir, expected_shards, input_path):
    """Manifest dict from img2dataset's NNNNN_stats.json files in `out_dir`.

    A shard without stats crashed inside img2dataset (a re-run redoes only such shards), which is
    an error; a shard whose downloads all failed is recorded under "empty_shards" and left out of
    "shards".
    """
    shards, empty, errors = [], [], collections.Counter()
    samples = failed = 0
    missing = []
    for shard_id in range(expected_shards):
        stats_path = Path(out_dir) / f"{shard_id:05d}_stats.json"
        if not stats_path.exists():
            missing.append(stats_path.name)
            continue
        stats = read_json(stats_path)
        samples += stats["successes"]
        failed += stats["count"] - stats["successes"]
        for message, count in stats["status_dict"].items():
            if message != "success":
                errors[error_kind(message)] += count
        (shards if stats["successes"] > 0 else empty).append(f"{shard_id:05d}.tar")
    if missing:
        raise PrepError(f"{input_path}: img2dataset wrote no stats for {missing} in {out_dir}; "
                        "see the log, re-running resumes the missing shards")
    total = samples + failed
    return {
        "input": Path(input_path).name,
        "shards": shards,
        "empty_shards": empty,
        "samples": samples,
        "failed": failed,
        "success_rate": samples / total if total else 0.0,
        "errors": dict(errors.most_common()),
    }


def fetch_images(in_path, out_dir, manifest_path, processes, threads, samples_per_shard,
                 min_success_rate=0.0, timeout=10, retries=0):
    """Download the images of one filtered part into webdataset shards, then write the manifest.

    The manifest is written last and only when the success rate reaches `min_success_rate`;
    otherwise PrepError gives the rate and the error kinds. Every URL failing is always an error.
    """
    import img2dataset  # slow import (spawns wandb, albumentations); only the fetch rule needs it

    rows = read_parquet(in_path, columns=["URL"]).num_rows
    if rows == 0:
        raise PrepError(f"{in_path}: no rows to fetch")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # img2dataset's incremental mode parses every top-level *.json as "<shard>_stats.json".
    Path(manifest_path).unlink(missing_ok=True)
    img2dataset.download(
        url_list=os.fspath(in_path),
        output_folder=os.fspath(out_dir),
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=samples_per_shard,
        timeout=timeout,
        retries=retries,
        save_additional_columns=list(EXTRA_COLUMNS),  # a fresh list: img2dataset may append to it
        **IMG2DATASET_FIXED,
    )
    manifest = summarize_fetch(out_dir, math.ceil(rows / samples_per_shard), in_path)
    kinds = json.dumps(manifest["errors"])
    if manifest["samples"] == 0:
        raise PrepError(f"{in_path}: every one of {rows} downloads failed; error kinds: {kinds}")
    for shard in manifest["empty_shards"]:
        log.warning("%s: every download of shard %s failed", in_path, shard)
    if manifest["success_rate"] < min_success_rate:
        raise PrepError(f"{in_path}: success rate {manifest['success_rate']:.4f} is below the minimum "
                        f"{min_success_rate}; error kinds: {kinds}")
    write_json(manifest_path, manifest)
    log.info("%s: %d images in %d shards, %d failed (%.1f %%)", in_path, manifest["samples"],
             len(manifest["shards"]), manifest["failed"], 100 * manifest["success_rate"])
    return manifest
