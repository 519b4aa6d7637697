"""The submission package of merged run logs, and the official checkers' verdicts on it (real subprocesses).

Logs are written with the real mllog through MlperfLogger (offline-evaluation training logs), the
scores are fake, and merge_run_log makes the result logs.
"""

import json
import os

import pytest

from test_mlperf_log import offline_training_log

from sdcore.mlperf_log import merge_run_log
from sdcore.submission import (
    MODE_ALL,
    MODE_LAST_TWO,
    MODE_UNTIL_PASS,
    RESULT_FILES,
    SYSTEM_DESC_FIELDS,
    SubmissionConfig,
    build_submission,
    evaluation_mode,
    layout_submission,
    plan_evaluations,
)

EVERY = 512000
CKPTS = [EVERY * i for i in range(1, 7)]   # 512k .. 3.072M samples


def training_log(path, seed, division, global_batch, checkpoints, every):
    return str(offline_training_log(path, checkpoints, seed, global_batch, division, every=every))


def fake_score(samples, converge_at):
    """Passing (FID 85, CLIP 0.17) from ``converge_at`` samples on, failing before."""
    return {"fid": 85.0, "clip": 0.17} if samples >= converge_at else {"fid": 130.0 - samples / 1e5, "clip": 0.12}


def evaluate_as_planned(checkpoints, mode, converge_at, start=None):
    """Ask plan_evaluations what to evaluate until it is complete; the order of the evaluations done."""
    scores, order = {}, []
    for _ in range(len(checkpoints) + 1):
        plan = plan_evaluations(checkpoints, scores, mode, start=start)
        if plan.complete:
            return plan, scores, order
        for samples in plan.needed:
            scores[samples] = fake_score(samples, converge_at)
            order.append(samples)
    raise AssertionError("plan_evaluations never completed")


# ---- the selection rule ----------------------------------------------------------------------------

def test_evaluation_mode():
    assert [evaluation_mode(i) for i in range(3)] == [MODE_UNTIL_PASS, MODE_LAST_TWO, MODE_LAST_TWO]
    assert evaluation_mode(4, evaluate_all=True) == MODE_ALL


def test_plan_run_zero_scores_every_checkpoint_up_to_the_first_pass():
    plan = plan_evaluations(CKPTS, {}, MODE_UNTIL_PASS)
    assert plan.needed == CKPTS and not plan.complete and plan.status == "pending"
    # a pass known at 2.048M: everything before it is still needed, nothing after it
    plan = plan_evaluations(CKPTS, {4 * EVERY: (85.0, 0.2)}, MODE_UNTIL_PASS)
    assert plan.needed == [EVERY, 2 * EVERY, 3 * EVERY] and plan.first_pass is None
    plan, scores, _ = evaluate_as_planned(CKPTS, MODE_UNTIL_PASS, converge_at=3 * EVERY)
    assert plan.complete and plan.first_pass == 3 * EVERY and plan.required == [EVERY, 2 * EVERY, 3 * EVERY]
    assert sorted(scores) == CKPTS   # the first batch asks for all of them (they may run in parallel)
    # an earlier checkpoint that passes too becomes the first pass
    plan = plan_evaluations(CKPTS, {s: fake_score(s, 2 * EVERY) for s in CKPTS}, MODE_UNTIL_PASS)
    assert plan.first_pass == 2 * EVERY and plan.required == [EVERY, 2 * EVERY]


def test_plan_other_runs_score_the_first_pass_and_the_one_before():
    plan, _, order = evaluate_as_planned(CKPTS, MODE_LAST_TWO, converge_at=4 * EVERY, start=3 * EVERY)
    assert order == [3 * EVERY, 4 * EVERY]          # forward from start; 512k and 1.024M are skipped
    assert (plan.first_pass, plan.required, plan.status) == (4 * EVERY, [3 * EVERY, 4 * EVERY], "success")
    # the first try passes: the one before it is needed, and the search moves back while it passes
    plan, _, order = evaluate_as_planned(CKPTS, MODE_LAST_TWO, converge_at=2 * EVERY, start=4 * EVERY)
    assert order == [4 * EVERY, 3 * EVERY, 2 * EVERY, EVERY]
    assert (plan.first_pass, plan.required) == (2 * EVERY, [EVERY, 2 * EVERY])
    # never passing: every checkpoint from start on is tried, then aborted
    plan, _, order = evaluate_as_planned(CKPTS, MODE_LAST_TWO, converge_at=10 ** 9, start=5 * EVERY)
    assert order == [5 * EVERY, 6 * EVERY] and plan.status == "aborted" and plan.first_pass is None
    # the run's very first checkpoint passing has no "one before"
    plan = plan_evaluations(CKPTS, {EVERY: (80.0, 0.2)}, MODE_LAST_TWO)
    assert (plan.complete, plan.first_pass, plan.required) == (True, EVERY, [EVERY])


def test_plan_all_and_bad_input():
    plan = plan_evaluations(CKPTS, {EVERY: (80.0, 0.2)}, MODE_ALL)
    assert plan.needed == CKPTS[1:] and plan.first_pass == EVERY and not plan.complete
    assert plan_evaluations(CKPTS, [{"samples_seen": s, "fid": 99.0, "clip": 0.3} for s in CKPTS], MODE_ALL).status == "aborted"
    with pytest.raises(ValueError, match="no checkpoint"):
        plan_evaluations(CKPTS, {700000: (80.0, 0.2)}, MODE_UNTIL_PASS)
    with pytest.raises(ValueError, match="mode"):
        plan_evaluations(CKPTS, {}, "some")


# ---- the package and the checkers ------------------------------------------------------------------

@pytest.mark.slow
def test_three_tiny_open_runs(tmp_path, monkeypatch):
    """Relative folders, as the rule passes them (the tools run inside the reports folder), and numbers in
    the system fields, as YAML reads them."""
    monkeypatch.chdir(tmp_path)
    logs = []
    for run in range(3):
        train = training_log(tmp_path / f"train_{run}.log", seed=run, division="open", global_batch=4,
                             checkpoints=3, every=8)
        scores = [{"step": 2 * i, "samples_seen": 8 * i, "fid": 250.0 - i, "clip": 0.02} for i in (1, 2, 3)]
        logs.append(merge_run_log(train, scores, tmp_path / f"result_{run}.log").out_path)
    config = SubmissionConfig(submitter="sdcore", system_name="cpu_test", division="open",
                              system={"number_of_nodes": 1, "host_processor_core_count": 2, "accelerators_per_node": 0})
    check = build_submission(logs, "package/sdcore", config, reports_dir="checks")

    layout = check.layout
    assert sorted(os.listdir(layout.benchmark_dir)) == ["result_0.txt", "result_1.txt", "result_2.txt"]
    with open(layout.system_json) as f:
        desc = json.load(f)
    assert set(SYSTEM_DESC_FIELDS) <= set(desc) and desc["division"] == "open"
    assert all(isinstance(value, str) for value in desc.values()) and desc["number_of_nodes"] == "1"
    assert desc["status"] == "Available on-premise" and "host_processor_model_name" in layout.defaulted_fields
    # package checker: the system description and the three logs pass, but stable_diffusion needs 10 runs
    assert check.package.passed is False and check.package.verdict.startswith("FAIL")
    assert check.package.messages == [
        (f"Incorrect number of files in dir, or wrong file names in directory {os.path.abspath(layout.benchmark_dir)}, "
         f"found 3, expected {RESULT_FILES}")]
    assert "System description checker passed for cpu_test" in check.package.output
    assert "open_stable_diffusion.yaml" in check.package.output
    # RCP checker: no run converged
    assert check.rcp.passed is False and check.rcp.returncode == 1
    assert check.rcp.verdict == "FAIL (Insufficient convergence)"
    assert check.rcp.messages.count("Run incomplete or did not converge. Marking as infinite.") == 3
    # result summarizer: the open division has no convergence requirement, the run times are scored
    row = check.summary.data["rows"][0]
    assert (row["system"], row["division"], row["submitter"]) == ("cpu_test", "open", "sdcore")
    assert row["stable_diffusion"] is not None and row["stable_diffusion"] >= 0
    assert check.summary.verdict.startswith("cpu_test: ") and " min" in check.summary.verdict
    with open(os.path.join(check.reports_dir, "report.txt")) as f:
        report = f.read()
    assert "== rcp_checker: FAIL (Insufficient convergence)" in report


def closed_runs(tmp_path, converge_at, start=3 * EVERY):
    """Ten closed-division runs at global batch 512, evaluated as the rules ask (run 0 all, the others the last two)."""
    logs, evaluated = [], []
    for run, converge in enumerate(converge_at):
        train = training_log(tmp_path / f"train_{run}.log", seed=1000 + run, division="closed", global_batch=512,
                             checkpoints=len(CKPTS), every=EVERY)
        plan, scores, _ = evaluate_as_planned(CKPTS, evaluation_mode(run), converge, start=start)
        evaluations = [{"step": s // 512, "samples_seen": s, **scores[s]} for s in scores]
        result = merge_run_log(train, evaluations, tmp_path / f"result_{run}.log")
        assert result.passing_samples == plan.first_pass
        logs.append(result.out_path)
        evaluated.append(result.evaluated)
    return logs, evaluated


@pytest.mark.slow
def test_ten_closed_runs_at_global_batch_512_pass(tmp_path):
    # converging at 1.5M-2.5M samples, as the reference does at batch 512 (RCP mean 2.1M)
    converge_at = [3 * EVERY, 4 * EVERY, 4 * EVERY, 5 * EVERY, 4 * EVERY, 3 * EVERY, 4 * EVERY, 4 * EVERY,
                   5 * EVERY, 4 * EVERY]
    logs, evaluated = closed_runs(tmp_path, converge_at)
    assert evaluated[0] == [EVERY, 2 * EVERY, 3 * EVERY]        # run 0: everything up to the first pass
    assert evaluated[1] == [3 * EVERY, 4 * EVERY]               # the others: the first pass and the one before
    config = SubmissionConfig(submitter="sdcore", system_name="cpu_x2", division="closed",
                              system={"number_of_nodes": "1", "host_processors_per_node": "2",
                                      "host_processor_model_name": "test CPU", "framework": "PyTorch"})
    check = build_submission(logs, tmp_path / "package" / "sdcore", config)
    assert check.package.passed, check.package.report()
    assert check.package.verdict == "PASS" and check.package.messages == []
    assert "Running Seed Checker" in check.package.output and "RCP Test Passed: RCP Interpolation" in check.package.output
    # batch 512 is pruned from the RCP set: interpolated between the 256 and 2048 RCPs
    assert check.rcp.passed and check.rcp.verdict == "PASS (RCP Interpolation)"
    assert "Submission mean epochs: 2048000.0000" in check.rcp.messages
    detailed = check.summary.data["detailed"][0]
    assert detailed["stable_diffusion:samples_to_converge"] == 2048000.0
    assert (detailed["stable_diffusion:RCP"], detailed["stable_diffusion:GBS"]) == ("Pass", 512.0)
    assert check.summary.data["rows"][0]["host_processors_count"] == 2


@pytest.mark.slow
def test_closed_runs_converging_too_fast_fail_the_rcp_check(tmp_path):
    logs, _ = closed_runs(tmp_path, [2 * EVERY] * 9 + [3 * EVERY], start=EVERY)   # 1.024M: faster than allowed
    check = build_submission(logs, tmp_path / "package" / "sdcore",
                             SubmissionConfig(submitter="sdcore", system_name="cpu_test", division="closed"))
    assert check.rcp.verdict == "FAIL (RCP Interpolation)" and check.rcp.passed is False
    assert "Submission mean epochs: 1024000.0000" in check.rcp.messages
    assert check.package.passed is False and "RCP Test Failed: RCP Interpolation" in check.package.messages


def test_layout_rejects_logs_that_do_not_fit(tmp_path):
    train = training_log(tmp_path / "train.log", seed=1, division="open", global_batch=4, checkpoints=2, every=8)
    config = SubmissionConfig(submitter="sdcore", system_name="cpu_test", division="closed")
    with pytest.raises(ValueError, match=r"train\.log: submission_division is 'open'"):
        layout_submission([train], tmp_path / "package", config)
    with pytest.raises(ValueError, match=r"train\.log: no run_stop"):
        layout_submission([train], tmp_path / "package", SubmissionConfig("sdcore", "cpu_test", "open"))
    with pytest.raises(ValueError, match="status"):
        SubmissionConfig("sdcore", "cpu_test", "open", status="onprem")
