"""The MLPerf log of a tiny run: every SPEC section 5 key, and the official compliance checker's verdicts.

The tiny run's scores never reach the target, like the demo's random tiny encoders: the open division
must pass, and in the closed division the quality target must be the one and only failing check.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sdcore import train
from sdcore.mlperf_log import QUALITY_CHECK, check_log
from train_fixtures import FixedGlobalBatchSource, HashedCaptionConditioner, ScriptedEvaluator, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlperf")
    config = tiny_config(str(root), checkpoint_every_samples=8, max_samples=24)  # 3 checkpoints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = train.main(config, str(root / "run"), device="cpu",
                          make_data_source=lambda c, env, plan: FixedGlobalBatchSource(plan, env.rank),
                          make_conditioner=lambda c, env: HashedCaptionConditioner(),
                          make_evaluator=lambda c, env: ScriptedEvaluator([(250.0, 0.02), (240.0, 0.03)]))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root / "run"


def records(run_dir):
    with open(run_dir / "mlperf.log") as f:
        return [json.loads(line.split(" ", 1)[1]) for line in f if line.startswith(":::MLLOG")]


def test_log_has_every_key_of_the_spec(tiny_run):
    recs = records(tiny_run)
    values = {r["key"]: r["value"] for r in recs}
    for key in ("cache_clear", "submission_org", "submission_platform", "submission_poc_name",
                "submission_poc_email", "submission_status", "init_start", "init_stop", "run_start",
                "block_start", "block_stop", "eval_start", "eval_stop", "run_stop"):
        assert key in values, key
    assert values["submission_benchmark"] == "stable_diffusion"
    assert values["submission_division"] == "closed"
    assert (values["seed"], values["train_samples"], values["eval_samples"]) == (42, 1000, 30000)
    assert (values["gradient_accumulation_steps"], values["global_batch_size"]) == (1, 4)
    assert values["opt_name"] == "adamw"
    assert (values["opt_adamw_beta_1"], values["opt_adamw_beta_2"]) == (0.9, 0.999)
    assert (values["opt_adamw_epsilon"], values["opt_adamw_weight_decay"]) == (1e-8, 0.01)
    assert values["opt_base_learning_rate"] == pytest.approx(2.5e-5 * 4)  # the scaled rate
    assert values["opt_learning_rate_warmup_steps"] == 5
    accuracy = [(r["metadata"]["metric"], r["metadata"]["samples_count"], r["value"])
                for r in recs if r["key"] == "eval_accuracy"]
    assert accuracy == [("FID", 8, 250.0), ("CLIP", 8, 0.02), ("FID", 16, 240.0), ("CLIP", 16, 0.03),
                        ("FID", 24, 240.0), ("CLIP", 24, 0.03)]
    blocks = [(r["key"], r["metadata"]["samples_count"]) for r in recs if r["key"].startswith("block_")]
    assert blocks == [("block_start", 0), ("block_stop", 8), ("block_start", 8), ("block_stop", 16),
                      ("block_start", 16), ("block_stop", 24)]
    run_stop = [r for r in recs if r["key"] == "run_stop"]
    assert len(run_stop) == 1 and run_stop[0]["metadata"]["status"] == "aborted"
    assert recs[-1]["key"] == "run_stop"


def test_open_division_passes(tiny_run):
    result = check_log(tiny_run / "mlperf.log", "open")
    assert result.passed, result.output
    assert "open_stable_diffusion.yaml" in result.output and "SUCCESS" in result.output


def test_closed_division_fails_only_on_the_quality_target(tiny_run):
    result = check_log(tiny_run / "mlperf.log", "closed")
    assert not result.passed
    assert "closed_stable_diffusion.yaml" in result.output
    assert result.failures == [
        f"{QUALITY_CHECK} : (0.0 <= v['value']['FID'] <= 90.0) and (0.15 <= v['value']['CLIP'] <= 1.0)"]
    assert result.only_quality_failed


def test_a_broken_log_is_not_mistaken_for_a_quality_failure(tiny_run, tmp_path):
    broken = tmp_path / "broken.log"
    broken.write_text("".join(line for line in (tiny_run / "mlperf.log").read_text().splitlines(True)
                              if '"key": "opt_adamw_epsilon"' not in line))
    result = check_log(broken, "closed")
    assert not result.passed and not result.only_quality_failed
    assert any("opt_adamw_epsilon" in f for f in result.failures)


def test_check_script_writes_verdict_and_summary_script_reports(tiny_run):
    out = tiny_run / "mlperf_check.txt"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "workflow_scripts", "check_mlperf_log.py"),
                           "--log", str(tiny_run / "mlperf.log"), "--division", "closed", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # a quality-only failure is a result, not a broken log
    assert out.read_text().rstrip().endswith(
        "verdict (closed division): FAIL (quality target not reached; every other check passed)")
    summary_out = tiny_run / "summary.txt"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "workflow_scripts", "summarize_run.py"),
                           "--run-dir", str(tiny_run), "--out", str(summary_out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = summary_out.read_text()
    assert proc.stdout == text
    assert "aborted after 24 samples" in text and "samples/s" in text and "loss.png" in text
    assert "   250.000   0.0200  not met" in text
    assert "mlperf_check.txt: verdict (closed division): FAIL (quality target" in text
