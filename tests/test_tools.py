"""The small command-line tools of the workflow and their messages: checkpoint verification before use,
progress lines, third-party logging, an evaluation that waits beside a running training, and the
one-line errors of a launch that is not the configured one."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdcore.logs import QUIET_LIBRARIES, ProgressLog, format_duration, setup_logging

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"


def run(script, *args, env=None):
    environment = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        environment.pop(name, None)
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


@pytest.mark.slow
def test_a_checkpoint_is_verified_when_a_rule_reads_it(tmp_path):
    """Finding 4 of issue 13: checksums were only checked at download time."""
    weights = tmp_path / "512-base-ema.ckpt"
    weights.write_bytes(b"real weights")
    good = run("verify_file.py", "--file", weights, "--out", tmp_path / "recorded.json")
    assert good.returncode == 0 and "(recorded)" in good.stdout
    digest = json.loads((tmp_path / "recorded.json").read_text())["sha256"]
    assert run("verify_file.py", "--file", weights, "--sha256", digest, "--out", tmp_path / "ok.json").returncode == 0
    weights.write_bytes(b"demo weights")  # swapped after the download
    bad = run("verify_file.py", "--file", weights, "--sha256", digest, "--out", tmp_path / "bad.json")
    assert bad.returncode != 0 and str(weights) in bad.stderr and "does not match the config" in bad.stderr
    assert not (tmp_path / "bad.json").exists()


def test_progress_lines_give_done_total_rate_and_eta(caplog):
    """Finding 10: long steps printed nothing until they finished."""
    progress = ProgressLog("resize", 4, "images", every_seconds=0)
    with caplog.at_level(logging.INFO, logger="sdcore.progress"):
        for _ in range(4):
            progress.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[-1].startswith("resize: 4/4 images (100%)") and "ETA 0m00s" in lines[-1]
    assert "images/s" in lines[0] and "1/4" in lines[0]
    assert format_duration(3725) == "1h02m" and format_duration(float("nan")) == "?"


def test_resize_job_logs_progress(tmp_path, caplog):
    """coco_resize prints progress while it works, and its last line at the end."""
    from PIL import Image

    from sdcore.prep.coco import resize_images, source_image_name

    tsv = tmp_path / "subset.tsv"
    tsv.write_text("image_id\tid\tcaption\n1\t10\ta\n2\t20\tb\n")
    for image_id in (1, 2):
        Image.new("RGB", (40, 30), "red").save(tmp_path / source_image_name(image_id))
    with caplog.at_level(logging.INFO, logger="sdcore.progress"):
        resize_images(tsv, tmp_path, tmp_path / "out", 16, tmp_path / "out" / ".done")
    assert any("resize: 2/2 images (100%)" in r.getMessage() for r in caplog.records)
    with Image.open(tmp_path / "out" / source_image_name(1)) as resized:
        assert resized.size == (16, 16) and resized.format == "JPEG"


def test_third_party_loggers_are_kept_to_warnings():
    """Finding 10: half of the demo's training log was open_clip's own lines."""
    setup_logging()
    for name in QUIET_LIBRARIES:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name
    assert "open_clip" in QUIET_LIBRARIES
    assert logging.getLogger("sdcore.training").getEffectiveLevel() <= logging.INFO


def test_evaluation_beside_training_records_a_checkpoint_never_reached(tmp_path):
    """eval.stop_on_target: an evaluation job whose checkpoint the stopped training never wrote says so."""
    config = tmp_path / "eval_config.yaml"
    config.write_text(yaml.safe_dump({"launch": {"nodes": 1, "nproc_per_node": 1, "gpus_per_node": 0}}))
    summary = tmp_path / "train" / "summary.json"
    summary.parent.mkdir()
    summary.write_text("{}")
    out = tmp_path / "eval" / "step_00000192.json"
    done = run("evaluate.py", "--config", config, "--checkpoint", tmp_path / "checkpoints/step_00000192.safetensors",
               "--prompts", "p", "--fid-stats", "f", "--inception", "i", "--clip", "c", "--sd-checkpoint", "s",
               "--wait-for-training", summary, "--out", out, env={"SDCORE_POLL_SECONDS": "0.1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == {"step": 192, "skipped": "the training stopped before step 192"}


def test_a_launch_of_the_wrong_shape_fails_with_one_line(tmp_path):
    """An evaluation configured for 2 ranks but started as one process: one line, no traceback."""
    config = tmp_path / "eval_config.yaml"
    config.write_text(yaml.safe_dump({"launch": {"nodes": 1, "nproc_per_node": 2, "gpus_per_node": 0}}))
    done = run("evaluate.py", "--config", config, "--checkpoint", "x", "--prompts", "p", "--fid-stats", "f",
               "--inception", "i", "--clip", "c", "--sd-checkpoint", "s", "--out", tmp_path / "out.json")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("evaluate: rank 0 (single): launched 1 ranks, but launch.nodes "
                                                    "x launch.nproc_per_node = 1 x 2 = 2")
    assert "Traceback" not in done.stderr
