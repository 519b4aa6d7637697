"""The training loop: learning, checkpoint cadence, stopping rules (inline and offline evaluation),
seeds, the run directory's artifacts, real data + text encoder."""

import hashlib
import os

import pytest
import torch
from train_fixtures import (
    HookedConditioner,
    ScriptedEvaluator,
    assert_same_weights,
    checkpoint,
    checkpoint_files,
    deterministic_cpu,
    factories,
    loss_curve,
    losses,
    mlperf_records,
    state,
    step_files,
    summary,
    tiny_config,
    write_latent_shards,
)

from sdcore.checkpoint import load_unet
from sdcore.evaluate import write_eval_result
from sdcore.files import write_json
from sdcore.training import trainer
from sdcore.training.plan import checkpoint_steps, warmup_factor
from sdcore.training.report import run_report


@pytest.fixture(autouse=True)
def one_thread():
    with deterministic_cpu(deterministic=False):
        yield


def run(config, run_dir, evaluator=None, inputs=None, **factory_args):
    """The trainer in this process; ``evaluator`` None: offline (building one fails the test)."""
    return trainer.main(config, run_dir, inputs=inputs or trainer.TrainInputs(),
                        factories=factories(evaluator=evaluator, **factory_args))


def keys(records):
    return [r["key"] for r in records]


@pytest.mark.slow
def test_loss_halves_on_a_fixed_batch(tmp_path):
    """Memorising one batch of 4 latents: the v-loss (random t and noise each step) must at least halve."""
    steps = 200
    config = tiny_config(str(tmp_path), eval_mode="offline", warmup_steps=10, checkpoint_every_samples=10**6,
                         max_samples=4 * steps)
    config["model"]["base_learning_rate"] = 2.5e-4  # x global batch 4 = 1e-3
    assert run(config, tmp_path / "run", fixed=True) == 0
    loss = loss_curve(tmp_path / "run")
    assert len(loss) == steps
    first, last = sum(loss[:5]) / 5, sum(loss[-20:]) / 20
    assert last <= 0.5 * first, (first, last)


def test_checkpoints_evaluations_and_stop_at_first_passing_checkpoint(tmp_path):
    """Inline: every checkpoint is evaluated in the trainer; the run stops at the first one meeting both targets."""
    # checkpoint every ceil(10 / 4) = 3 steps; the sample limit would allow 10 checkpoints
    config = tiny_config(str(tmp_path), checkpoint_every_samples=10, max_samples=120)
    evaluator = ScriptedEvaluator([(300, 0.2), (80, 0.1), (80, 0.2), (10, 0.9)])
    run_dir = tmp_path / "run"
    assert run(config, run_dir, evaluator) == 0

    assert evaluator.calls == [12, 24, 36]  # FID alone or CLIP alone is not enough
    assert evaluator.seeds == [42, 42, 42]  # the evaluation latents derive from the run's seed
    result = summary(run_dir)
    assert (result["status"], result["mode"]) == ("success", "inline")
    assert (result["steps"], result["samples_seen"], result["seed"]) == (9, 36, 42)
    assert [e["step"] for e in result["evaluations"]] == [3, 6, 9]
    assert result["checkpoints"] == ["step_00000003", "step_00000006", "step_00000009"]
    assert checkpoint_files(run_dir) == step_files([3, 6, 9])
    assert sorted(os.listdir(run_dir / "eval")) == [f"step_{s:08d}.json" for s in (3, 6, 9)]
    evaluation = (run_dir / "eval" / "step_00000009.json").read_text()
    assert '"fid": 80' in evaluation and '"targets_met": true' in evaluation and '"fid_target": 90.0' in evaluation
    assert '"targets_met": false' in (run_dir / "eval" / "step_00000006.json").read_text()

    metadata = checkpoint(run_dir, 9)[1]
    assert metadata == {"step": 9, "samples_seen": 36, "seed": 42, "global_batch": 4}
    final = state(run_dir)
    assert (final["step"], final["finished"], final["unet_file"]) == (9, "success", "checkpoints/step_00000009.safetensors")
    assert not list((run_dir / "train").glob("unet_step_*"))  # the state uses the checkpoint's weights file
    assert (run_dir / "train" / "loss.png").stat().st_size > 1000

    records = mlperf_records(run_dir)
    assert [(r["metadata"]["metric"], r["metadata"]["samples_count"], r["value"]) for r in records
            if r["key"] == "eval_accuracy"] == [("FID", 12, 300), ("CLIP", 12, 0.2), ("FID", 24, 80),
                                                ("CLIP", 24, 0.1), ("FID", 36, 80), ("CLIP", 36, 0.2)]
    assert keys(records)[-1] == "run_stop"
    assert (records[-1]["metadata"]["status"], records[-1]["metadata"]["samples_count"]) == ("success", 36)

    # the LR column follows base rate x global batch x warm-up factor of the step
    lr = 2.5e-5 * 4
    assert [float(r["lr"]) for r in losses(run_dir)] == pytest.approx(
        [lr * warmup_factor(n, 5, 1e-6) for n in range(9)], rel=1e-6)
    report = run_report(run_dir)
    assert "success after 36 samples" in report and "80.000" in report and "seed 42" in report


def test_sample_limit_ends_with_an_evaluated_final_checkpoint(tmp_path):
    config = tiny_config(str(tmp_path), checkpoint_every_samples=12, max_samples=28)  # 7 steps, ckpt every 3
    evaluator = ScriptedEvaluator([(300, 0.01)])
    run_dir = tmp_path / "run"
    assert run(config, run_dir, evaluator) == 0
    assert evaluator.calls == [12, 24, 28]
    assert checkpoint_files(run_dir) == step_files([3, 6, 7])
    result = summary(run_dir)
    assert (result["status"], result["steps"], result["samples_seen"]) == ("aborted", 7, 28)
    run_stop = mlperf_records(run_dir)[-1]
    assert run_stop["key"] == "run_stop"
    assert (run_stop["metadata"]["status"], run_stop["metadata"]["samples_count"]) == ("aborted", 28)


def test_offline_run_only_saves_checkpoints(tmp_path):
    """eval.mode offline: no evaluator is built, every planned checkpoint is a safetensors file with its
    position and seed, the training log ends at the last block_stop (no eval line, no run_stop: the
    log merge adds them), and the run ends at the sample budget."""
    config = tiny_config(str(tmp_path), eval_mode="offline", checkpoint_every_samples=12, max_samples=28)
    config["eval"]["stop_on_target"] = False
    run_dir = tmp_path / "run"
    assert run(config, run_dir) == 0  # factories(evaluator=None) fails the run if an evaluator is built

    assert checkpoint_steps(config) == [3, 6, 7]  # what the workflow plans its evaluation jobs from
    assert checkpoint_files(run_dir) == step_files([3, 6, 7])
    for step in (3, 6, 7):
        assert checkpoint(run_dir, step)[1] == {"step": step, "samples_seen": 4 * step, "seed": 42, "global_batch": 4}
    assert not (run_dir / "eval").exists()

    records = mlperf_records(run_dir)
    assert keys(records).count("run_start") == 1
    assert not {"run_stop", "eval_start", "eval_accuracy", "eval_stop"} & set(keys(records))
    assert keys(records)[-1] == "block_stop" and records[-1]["metadata"]["samples_count"] == 28
    assert [(r["key"], r["metadata"]["samples_count"]) for r in records if r["key"].startswith("block_")] == [
        ("block_start", 0), ("block_stop", 12), ("block_start", 12), ("block_stop", 24), ("block_start", 24),
        ("block_stop", 28)]

    result = summary(run_dir)
    assert (result["status"], result["mode"], result["steps"]) == ("sample budget reached", "offline", 7)
    assert result["checkpoints"] == ["step_00000003", "step_00000006", "step_00000007"]
    assert result["evaluations"] == []
    final = state(run_dir)
    assert (final["finished"], final["unet_file"]) == ("sample budget reached", "checkpoints/step_00000007.safetensors")


def test_offline_stop_on_target_stops_once_an_evaluation_meets_it(tmp_path, monkeypatch):
    """Offline + stop_on_target: the trainer polls eval/step_N.json (written here, as the evaluation
    jobs beside the training would) and stops at the first step after a passing result appears; a
    result without scores (a skipped checkpoint) is no result."""
    monkeypatch.setattr(trainer, "TARGET_POLL_SECONDS", 0.0)
    config = tiny_config(str(tmp_path), eval_mode="offline", checkpoint_every_samples=12, max_samples=120)
    run_dir = tmp_path / "run"
    written = []

    def evaluation_jobs(call):  # runs during step `call`, when the previous step's checkpoint exists
        if call == 1:  # what an evaluation job records for a checkpoint the training did not reach: no scores
            write_json(run_dir / "eval" / "step_00000030.json", {"step": 30, "skipped": "the training stopped"})
        for step, fid, clip in ((3, 300.0, 0.01), (6, 80.0, 0.2)):
            ckpt = run_dir / "checkpoints" / f"step_{step:08d}.safetensors"
            if ckpt.exists() and step not in written:
                metadata = load_unet(ckpt)[1]
                write_eval_result(run_dir / "eval" / f"step_{step:08d}.json",
                                  {"step": step, "samples_seen": metadata["samples_seen"], "fid": fid, "clip": clip},
                                  config["eval"])
                written.append(step)

    assert run(config, run_dir, conditioner=HookedConditioner(evaluation_jobs)) == 0
    assert written == [3, 6]
    result = summary(run_dir)
    # checkpoint 6 is written at the end of step 6, its result during step 7, seen after step 7: a
    # failing result (step 3) does not stop the run
    assert (result["status"], result["steps"], result["samples_seen"]) == ("stopped: an evaluation met the target",
                                                                          7, 28)
    assert checkpoint_files(run_dir) == step_files([3, 6])
    assert result["checkpoints"] == ["step_00000003", "step_00000006"]
    records = mlperf_records(run_dir)
    assert not {"run_stop", "eval_accuracy"} & set(keys(records))
    assert max(r["metadata"]["samples_count"] for r in records if r["key"] == "block_stop") == 24
    assert state(run_dir)["finished"] == "stopped: an evaluation met the target"
    assert len(losses(run_dir)) == 7


def test_offline_without_stop_on_target_ignores_passing_results(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "TARGET_POLL_SECONDS", 0.0)
    config = tiny_config(str(tmp_path), eval_mode="offline", checkpoint_every_samples=12, max_samples=36)
    config["eval"]["stop_on_target"] = False
    run_dir = tmp_path / "run"

    def passing_result(call):
        if call == 4:
            write_eval_result(run_dir / "eval" / "step_00000003.json",
                              {"step": 3, "samples_seen": 12, "fid": 1.0, "clip": 0.9}, config["eval"])

    assert run(config, run_dir, conditioner=HookedConditioner(passing_result)) == 0
    assert (summary(run_dir)["status"], summary(run_dir)["steps"]) == ("sample budget reached", 9)


def test_entropy_seed_differs_per_run_and_is_recorded(tmp_path):
    """train.seed null: each run draws its own seed, and logs it (MLPerf log), summarises it and stamps
    it on every checkpoint; the runs differ from the first weights on."""
    config = tiny_config(str(tmp_path), eval_mode="offline", seed=None, checkpoint_every_samples=8, max_samples=8)
    seeds = []
    for name in ("a", "b"):
        assert run(config, tmp_path / name) == 0
        seed = summary(tmp_path / name)["seed"]
        assert isinstance(seed, int) and 0 <= seed < 2**32
        assert [r["value"] for r in mlperf_records(tmp_path / name) if r["key"] == "seed"] == [seed]
        assert checkpoint(tmp_path / name, 2)[1]["seed"] == seed
        assert state(tmp_path / name)["plan"]["seed"] == seed
        seeds.append(seed)
    assert seeds[0] != seeds[1]
    assert loss_curve(tmp_path / "a") != loss_curve(tmp_path / "b")


def test_fixed_seed_gives_identical_runs(tmp_path):
    config = tiny_config(str(tmp_path), eval_mode="offline", seed=1234, checkpoint_every_samples=8, max_samples=16)
    with deterministic_cpu():
        for name in ("a", "b"):
            assert run(config, tmp_path / name) == 0
    assert (tmp_path / "a" / "train" / "loss.csv").read_text() == (tmp_path / "b" / "train" / "loss.csv").read_text()
    for step in (2, 4):
        (wa, ma), (wb, mb) = checkpoint(tmp_path / "a", step), checkpoint(tmp_path / "b", step)
        assert ma == mb and ma["seed"] == 1234
        assert_same_weights(wa, wb)
    assert [r["value"] for r in mlperf_records(tmp_path / "a") if r["key"] == "seed"] == [1234]


def test_fused_optimizer_trains_like_the_default(tmp_path):
    """train.fast_paths.fused_optimizer reaches the optimizer (the weights differ in the last bits)
    and keeps the run within rounding of foreach AdamW."""
    configs = {name: tiny_config(str(tmp_path), eval_mode="offline", seed=7, checkpoint_every_samples=16,
                                 max_samples=16) for name in ("foreach", "fused")}
    configs["fused"]["train"]["fast_paths"]["fused_optimizer"] = True
    with deterministic_cpu():
        for name, config in configs.items():
            assert run(config, tmp_path / name) == 0
    assert loss_curve(tmp_path / "fused") == pytest.approx(loss_curve(tmp_path / "foreach"), rel=1e-5)
    (w_foreach, _), (w_fused, _) = checkpoint(tmp_path / "foreach", 4), checkpoint(tmp_path / "fused", 4)
    assert max((w_fused[k] - w_foreach[k]).abs().max().item() for k in w_foreach) < 1e-6
    assert any(not torch.equal(w_fused[k], w_foreach[k]) for k in w_foreach)


def test_loss_curve_is_drawn_while_training(tmp_path):
    """train.plot_every_steps: loss.png appears after that many steps and is redrawn every that many,
    long before the run ends (checked from inside the run, by the conditioner of each step)."""
    config = tiny_config(str(tmp_path), eval_mode="offline", plot_every_steps=2, checkpoint_every_samples=10**6,
                         max_samples=4 * 6)
    png = tmp_path / "run" / "train" / "loss.png"
    seen = {}

    def look(call):
        seen[call] = hashlib.sha256(png.read_bytes()).hexdigest() if png.exists() else None

    assert run(config, tmp_path / "run", conditioner=HookedConditioner(look)) == 0
    assert [seen[call] is not None for call in range(1, 7)] == [False, False, True, True, True, True]
    assert seen[3] == seen[4] != seen[5] == seen[6]  # drawn after steps 2 and 4, not after 3 or 5
    assert png.read_bytes().startswith(b"\x89PNG")


def sd_checkpoint_with_text_encoder(path, arch="sdcore-tiny-clip"):
    """An SD-layout checkpoint holding only the frozen text encoder (``cond_stage_model.*``)."""
    from safetensors.torch import save_file

    from sdcore.text_encoder import FrozenOpenCLIPText

    torch.manual_seed(0)
    encoder = FrozenOpenCLIPText(arch)
    save_file({f"cond_stage_model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    return encoder


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_real_shards_text_encoder_and_mixed_precision(tmp_path, precision):
    """The product's data path (latent index, webdataset shards, per-rank stream) and its conditioner
    (the frozen text encoder of the SD checkpoint), in fp16 autocast with a GradScaler on the CPU
    (torch.amp.GradScaler("cpu")) or in bf16 autocast without one."""
    config = tiny_config(str(tmp_path), eval_mode="offline", precision=precision, checkpoint_every_samples=8,
                         max_samples=16)
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 48  # width of sdcore-tiny-clip
    inputs = trainer.TrainInputs(latents=write_latent_shards(config), sd_checkpoint=tmp_path / "sd.safetensors")
    sd_checkpoint_with_text_encoder(inputs.sd_checkpoint)
    run_dir = tmp_path / "run"
    product = trainer.Factories(data=trainer.latent_source, conditioner=trainer.text_conditioner,
                                evaluator=factories().evaluator)
    assert trainer.main(config, run_dir, inputs=inputs, factories=product) == 0
    rows = losses(run_dir)
    assert len(rows) == 4 and all(0 < float(r["loss"]) < 10 for r in rows)
    final = state(run_dir)
    if precision == "fp16":  # the reference's (Lightning 16-mixed) scaler settings
        assert final["scaler"]["scale"] > 0 and final["scaler"]["growth_interval"] == 2000
    else:
        assert final["scaler"] == {}  # disabled: bf16 needs no loss scaling
    assert summary(run_dir)["precision"] == precision
    weights, _ = checkpoint(run_dir, 4)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 master weights
