"""The MLPerf log of a tiny run: every SPEC section 5 key, and the official compliance checker's verdicts.

The tiny run's scores never reach the target, like the demo's random tiny encoders: the open division
must pass, and in the closed division the quality target must be the one and only failing check.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from train_fixtures import (
    FixedGlobalBatchSource,
    HashedCaptionConditioner,
    ScriptedEvaluator,
    tiny_config,
)

from sdcore.mlperf_log import (
    QUALITY_CHECK,
    MergeError,
    MlperfLogger,
    check_log,
    merge_run_log,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An inline-evaluated tiny run: its trainer writes the whole log (evaluations and run_stop)."""
    from sdcore.training.trainer import Factories, main

    root = tmp_path_factory.mktemp("mlperf")
    config = tiny_config(str(root), checkpoint_every_samples=8, max_samples=24)  # 3 checkpoints
    config["eval"]["mode"] = "inline"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(config, root / "run", factories=Factories(
            data=lambda c, env, plan, inputs: FixedGlobalBatchSource(plan, env.rank),
            conditioner=lambda c, env, inputs: HashedCaptionConditioner(),
            evaluator=lambda c, env, inputs: ScriptedEvaluator([(250.0, 0.02), (240.0, 0.03)])))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    run_dir = root / "run"
    (run_dir / "mlperf.log").write_text((run_dir / "train" / "mlperf.log").read_text())  # inline: the final log
    return run_dir


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


@pytest.mark.slow
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
                           "--run-dir", str(tiny_run), "--out", str(summary_out), "--plot", str(tiny_run / "eval.png"),
                           "--loss", str(tiny_run / "loss.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = summary_out.read_text()
    assert proc.stdout == text
    assert "training aborted after 24 samples" in text and "samples/s" in text and "loss.png" in text
    assert "   250.000   0.0200  not met" in text
    assert "run_stop aborted at 24 samples, time to train" in text
    assert "verdict (closed division): FAIL (quality target" in text
    for plot in ("eval.png", "loss.png"):
        assert (tiny_run / plot).stat().st_size > 10_000, plot


# ---- offline evaluation: merge_run_log ------------------------------------------------------------
# Training logs of the offline mode written with the real mllog through MlperfLogger: run_start, one
# block_start/block_stop per checkpoint, no eval lines and no run_stop. Fake scores.

MLPERF_CFG = {"division": "closed", "org": "test-org", "platform": "cpu-test", "poc_name": "Tester",
              "poc_email": "tester@example.com", "status": "onprem"}
EVERY = 512000   # samples between checkpoints, global batch 512


def offline_training_log(path, checkpoints=3, seed=7, global_batch=512, division="closed", finish=None, every=EVERY):
    """The log of an offline-evaluation training job (a checkpoint every ``every`` samples); ``finish``
    writes more (e.g. a run_stop) at the end."""
    logger = MlperfLogger(path, enabled=True)
    logger.log_init_start(dict(MLPERF_CFG, division=division))
    logger.log_hyperparameters(seed=seed, train_samples=6513144, eval_samples=30000, gradient_accumulation_steps=1,
                               global_batch_size=global_batch, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                               learning_rate=1.25e-7 * global_batch, warmup_steps=1000)
    logger.log_run_start()
    for i in range(1, checkpoints + 1):
        logger.log_block_start((i - 1) * every)
        time.sleep(0.003)   # distinct time_ms per checkpoint, so the run_stop time says which one it is
        logger.log_block_stop(i * every)
        time.sleep(0.003)
    if finish is not None:
        finish(logger)
    logger.close()
    return path


def score(samples, fid, clip):
    return {"step": samples // 512, "samples_seen": samples, "fid": fid, "clip": clip}


def mllog_records(path):
    with open(path) as f:
        return [json.loads(line.split(" ", 1)[1]) for line in f if line.startswith(":::MLLOG")]


def block_stop_ms(path):
    return {r["metadata"]["samples_count"]: r["time_ms"] for r in mllog_records(path) if r["key"] == "block_stop"}


def tail_events(path):
    """(key, metric or status, samples_count) of the lines after the last block line."""
    recs = mllog_records(path)
    last_block = max(i for i, r in enumerate(recs) if r["key"].startswith("block_"))
    return [(r["key"], r["metadata"].get("metric", r["metadata"].get("status")), r["metadata"]["samples_count"])
            for r in recs[last_block + 1:]]


def test_merge_second_checkpoint_passing_is_success_and_passes_the_closed_checker(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=3)
    out = tmp_path / "result.log"
    result = merge_run_log(train_log, [score(EVERY, 120.0, 0.10), score(2 * EVERY, 85.0, 0.16),
                                       score(3 * EVERY, 70.0, 0.18)], out, 90.0, 0.15)
    assert (result.status, result.passing_samples, result.evaluated, result.skipped) == \
        ("success", 2 * EVERY, [EVERY, 2 * EVERY], [])
    assert tail_events(out) == [
        ("eval_start", None, EVERY), ("eval_accuracy", "FID", EVERY), ("eval_accuracy", "CLIP", EVERY),
        ("eval_stop", None, EVERY),
        ("eval_start", None, 2 * EVERY), ("eval_accuracy", "FID", 2 * EVERY), ("eval_accuracy", "CLIP", 2 * EVERY),
        ("eval_stop", None, 2 * EVERY), ("run_stop", "success", 2 * EVERY)]
    recs = mllog_records(out)
    # the training lines after the passing checkpoint are gone, and so is the third evaluation
    assert [r["metadata"]["samples_count"] for r in recs if r["key"] == "block_stop"] == [EVERY, 2 * EVERY]
    assert not any(r["key"] == "block_start" and r["metadata"]["samples_count"] == 2 * EVERY for r in recs)
    assert [r["value"] for r in recs if r["key"] == "eval_accuracy"] == [120.0, 0.10, 85.0, 0.16]
    # run_stop is stamped with the passing checkpoint's time, not the evaluation's nor the last checkpoint's
    stops = block_stop_ms(train_log)
    run_stop = recs[-1]
    assert run_stop["time_ms"] == stops[2 * EVERY] == result.run_stop_ms and run_stop["time_ms"] < stops[3 * EVERY]
    run_start = next(r for r in recs if r["key"] == "run_start")["time_ms"]
    assert result.run_minutes == pytest.approx((stops[2 * EVERY] - run_start) / 60000)
    # without eval times of its own an evaluation is stamped at its checkpoint
    assert [r["time_ms"] for r in recs if r["key"] == "eval_start"] == [stops[EVERY], stops[2 * EVERY]]
    verdict = check_log(out, "closed")
    assert verdict.passed, verdict.output
    assert "closed_stable_diffusion.yaml" in verdict.output


def test_merge_first_checkpoint_passing(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=3)
    out = tmp_path / "result.log"
    result = merge_run_log(train_log, [score(EVERY, 80.0, 0.2), score(2 * EVERY, 70.0, 0.2)], out, 90.0, 0.15)
    assert (result.status, result.evaluated, result.passing_samples) == ("success", [EVERY], EVERY)
    assert tail_events(out) == [("eval_start", None, EVERY), ("eval_accuracy", "FID", EVERY),
                                ("eval_accuracy", "CLIP", EVERY), ("eval_stop", None, EVERY),
                                ("run_stop", "success", EVERY)]
    assert mllog_records(out)[-1]["time_ms"] == block_stop_ms(train_log)[EVERY]
    # The compliance checker wants the scores of at least two checkpoints; there is no "one before" the first.
    verdict = check_log(out, "closed")
    assert verdict.failures == ["Required AT_LEAST(2) occurrence of 'aggregated_eval_accuracy' but found 1"]


def test_merge_no_checkpoint_passing_is_aborted(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=3)
    out = tmp_path / "result.log"
    result = merge_run_log(train_log, [score(s * EVERY, 150.0 - s, 0.1) for s in (1, 2, 3)], out, 90.0, 0.15)
    assert (result.status, result.passing_samples, result.evaluated) == ("aborted", None, [EVERY, 2 * EVERY, 3 * EVERY])
    recs = mllog_records(out)
    assert recs[-1]["key"] == "run_stop" and recs[-1]["metadata"] == {
        "file": recs[-1]["metadata"]["file"], "lineno": recs[-1]["metadata"]["lineno"], "status": "aborted",
        "samples_count": 3 * EVERY}
    assert recs[-1]["time_ms"] == block_stop_ms(train_log)[3 * EVERY]
    assert check_log(out, "open").passed
    closed = check_log(out, "closed")
    assert closed.only_quality_failed, closed.failures


def test_merge_skips_a_checkpoint_without_evaluation(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=4)
    out = tmp_path / "result.log"
    result = merge_run_log(train_log, [score(3 * EVERY, 80.0, 0.2), score(2 * EVERY, 95.0, 0.16)], out)  # any order
    assert (result.status, result.evaluated, result.skipped) == ("success", [2 * EVERY, 3 * EVERY], [EVERY])
    assert [e for e in tail_events(out) if e[0] == "eval_start"] == [("eval_start", None, 2 * EVERY),
                                                                   ("eval_start", None, 3 * EVERY)]
    assert check_log(out, "closed").passed


def test_merge_uses_the_evaluations_own_times_when_given(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=2)
    stops = block_stop_ms(train_log)
    later = stops[2 * EVERY] + 3_600_000
    evals = [dict(score(EVERY, 99.0, 0.1), eval_start_ms=later, eval_stop_ms=later + 60_000),
             dict(score(2 * EVERY, 80.0, 0.2), eval_start_ms=later + 70_000, eval_stop_ms=later + 130_000)]
    merge_run_log(train_log, evals, tmp_path / "result.log")
    recs = mllog_records(tmp_path / "result.log")
    evals_lines = [(r["key"], r["time_ms"]) for r in recs if r["key"] in ("eval_start", "eval_accuracy", "eval_stop")]
    assert evals_lines[:4] == [("eval_start", later), ("eval_accuracy", later + 60_000),
                               ("eval_accuracy", later + 60_000), ("eval_stop", later + 60_000)]
    assert recs[-1]["key"] == "run_stop" and recs[-1]["time_ms"] == stops[2 * EVERY]   # evaluation time not counted


def test_merge_evaluations_as_json_files(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=2)
    paths = []
    for s, fid in ((EVERY, 100.0), (2 * EVERY, 60.0)):
        path = tmp_path / f"eval_{s}.json"
        path.write_text(json.dumps({"checkpoint": "x.pt", "num_prompts": 30000, "targets_met": fid <= 90,
                                    **score(s, fid, 0.3)}))
        paths.append(str(path))
    assert merge_run_log(train_log, paths, tmp_path / "result.log").status == "success"


def test_merge_rejects_a_log_that_already_has_run_stop(tmp_path):
    bad = offline_training_log(tmp_path / "online.log", checkpoints=2,
                               finish=lambda logger: logger.log_run_stop(2 * EVERY, success=False))
    with pytest.raises(MergeError, match=r"online\.log.*'run_stop'"):
        merge_run_log(bad, [score(EVERY, 80.0, 0.2)], tmp_path / "result.log")
    assert not (tmp_path / "result.log").exists()


def test_merge_rejects_eval_lines_and_unknown_checkpoints(tmp_path):
    with_eval = offline_training_log(tmp_path / "with_eval.log", checkpoints=2,
                                     finish=lambda logger: logger.log_eval_start(2 * EVERY))
    with pytest.raises(MergeError, match=r"with_eval\.log.*'eval_start'"):
        merge_run_log(with_eval, [], tmp_path / "result.log")
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=2)
    with pytest.raises(MergeError, match=r"train\.log: evaluation at 700000 samples, but the log has no block_stop"):
        merge_run_log(train_log, [score(700000, 80.0, 0.2)], tmp_path / "result.log")
    with pytest.raises(MergeError, match=r"train\.log: two evaluations at 512000"):
        merge_run_log(train_log, [score(EVERY, 80.0, 0.2), score(EVERY, 81.0, 0.2)], tmp_path / "result.log")
    with pytest.raises(MergeError, match=r"train\.log: .*non-finite"):
        merge_run_log(train_log, [score(EVERY, float("nan"), 0.2)], tmp_path / "result.log")


def test_merge_writes_atomically(tmp_path):
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=2)
    out = tmp_path / "out" / "result.log"
    merge_run_log(train_log, [score(EVERY, 95.0, 0.2), score(2 * EVERY, 85.0, 0.2)], out)
    first = out.read_text()
    with pytest.raises(MergeError):   # a failed merge leaves the previous result in place
        merge_run_log(train_log, [score(3 * EVERY, 80.0, 0.2)], out)
    assert out.read_text() == first
    merge_run_log(train_log, [score(EVERY, 95.0, 0.2), score(2 * EVERY, 95.0, 0.2)], out)
    assert out.read_text() != first and sorted(os.listdir(out.parent)) == ["result.log"]


def test_merge_command_line(tmp_path):
    """workflow_scripts/mlperf_log.py (rule mlperf_log): merges, and leaves out results of checkpoints
    the training never reached (an early stop's skipped evaluations)."""
    train_log = offline_training_log(tmp_path / "train.log", checkpoints=2)
    evals = []
    for samples, fid in ((EVERY, 120.0), (2 * EVERY, 80.0)):
        evals.append(tmp_path / f"eval_{samples}.json")
        evals[-1].write_text(json.dumps(score(samples, fid, 0.2)))
    evals.append(tmp_path / "eval_skipped.json")
    evals[-1].write_text(json.dumps({"step": 99, "skipped": "the training stopped before step 99"}))
    out = tmp_path / "result.log"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "workflow_scripts", "mlperf_log.py"), "--mode", "offline",
                           "--train-log", str(train_log), "--evaluations", *map(str, evals), "--fid-target", "90",
                           "--clip-target", "0.15", "--out", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{out}: success; evaluated at [{EVERY}, {2 * EVERY}] samples" in proc.stdout
    assert f"first passing checkpoint at {2 * EVERY} samples" in proc.stdout
    assert check_log(out, "closed").passed
