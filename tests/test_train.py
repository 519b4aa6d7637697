"""The training loop: learning, checkpoint cadence, stopping rules, artifacts, real data + text encoder."""

import csv
import json
import os

import pytest
import torch

from sdcore import train
from sdcore.data import FrozenTextConditioner
from sdcore.train import warmup_factor
from train_fixtures import (FixedGlobalBatchSource, HashedCaptionConditioner, ScriptedEvaluator, tiny_config,
                            write_latent_shards)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(config, run_dir, evaluator, fixed=False, make_conditioner=None, make_data_source=None):
    return train.main(
        config, str(run_dir), device="cpu",
        make_data_source=make_data_source or (lambda c, env, plan: FixedGlobalBatchSource(plan, env.rank, fixed)),
        make_conditioner=make_conditioner or (lambda c, env: HashedCaptionConditioner()),
        make_evaluator=lambda c, env: evaluator,
    )


def losses(run_dir):
    with open(os.path.join(run_dir, "loss.csv")) as f:
        return list(csv.DictReader(f))


def test_loss_halves_on_a_fixed_batch(tmp_path):
    """Memorising one batch of 4 latents: the v-loss (random t and noise each step) must at least halve."""
    steps = 200
    config = tiny_config(str(tmp_path), warmup_steps=10, checkpoint_every_samples=10**6, max_samples=4 * steps)
    config["model"]["base_learning_rate"] = 2.5e-4  # x global batch 4 = 1e-3
    assert run(config, tmp_path / "run", ScriptedEvaluator([(300, 0.01)]), fixed=True) == 0
    loss = [float(r["loss"]) for r in losses(tmp_path / "run")]
    assert len(loss) == steps
    first, last = sum(loss[:5]) / 5, sum(loss[-20:]) / 20
    assert last <= 0.5 * first, (first, last)


def test_checkpoints_evaluations_and_stop_at_first_passing_checkpoint(tmp_path):
    # checkpoint every ceil(10 / 4) = 3 steps; the sample limit would allow 10 checkpoints
    config = tiny_config(str(tmp_path), checkpoint_every_samples=10, max_samples=120)
    evaluator = ScriptedEvaluator([(300, 0.2), (80, 0.1), (80, 0.2), (10, 0.9)])
    run_dir = tmp_path / "run"
    assert run(config, run_dir, evaluator) == 0

    assert evaluator.calls == [12, 24, 36]  # FID alone or CLIP alone is not enough
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "success"
    assert (summary["steps"], summary["samples_seen"]) == (9, 36)
    assert [e["step"] for e in summary["evaluations"]] == [3, 6, 9]
    assert sorted(os.listdir(run_dir / "checkpoints")) == [f"step_{s:08d}.pt" for s in (3, 6, 9)]
    assert json.loads((run_dir / "eval" / "step_00000009.json").read_text())["fid"] == 80
    weights = torch.load(run_dir / "checkpoints" / "step_00000009.pt", weights_only=True)
    assert weights["samples_seen"] == 36
    state = torch.load(run_dir / "resume.pt", weights_only=True)
    assert all(torch.equal(weights["unet"][k], v) for k, v in state["unet"].items())
    assert (run_dir / "loss.png").stat().st_size > 1000

    # the LR column follows base rate x global batch x warm-up factor of the step
    lr = 2.5e-5 * 4
    assert [float(r["lr"]) for r in losses(run_dir)] == pytest.approx(
        [lr * warmup_factor(n, 5, 1e-6) for n in range(9)], rel=1e-6)
    report = train.run_report(str(run_dir))
    assert "success after 36 samples" in report and "80.000" in report


def test_sample_limit_ends_with_an_evaluated_final_checkpoint(tmp_path):
    config = tiny_config(str(tmp_path), checkpoint_every_samples=12, max_samples=28)  # 7 steps, ckpt every 3
    evaluator = ScriptedEvaluator([(300, 0.01)])
    run_dir = tmp_path / "run"
    assert run(config, run_dir, evaluator) == 0
    assert evaluator.calls == [12, 24, 28]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("aborted", 7)
    assert '"status": "aborted"' in (run_dir / "mlperf.log").read_text()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_real_shards_text_encoder_and_mixed_precision(tmp_path, precision):
    """The product's data path (webdataset shards, per-rank stream) and the frozen text encoder, in fp16
    autocast with a GradScaler on the CPU (torch.amp.GradScaler("cpu")) or in bf16 autocast without one."""
    from sdcore.text_encoder import FrozenOpenCLIPText

    config = tiny_config(str(tmp_path), precision=precision, checkpoint_every_samples=8, max_samples=16)
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 48  # width of sdcore-tiny-clip
    write_latent_shards(config)
    encoder = FrozenOpenCLIPText("sdcore-tiny-clip")
    run_dir = tmp_path / "run"
    code = run(config, run_dir, ScriptedEvaluator([(300, 0.01)]),
               make_conditioner=lambda c, env: FrozenTextConditioner(encoder),
               make_data_source=train.latent_source)
    assert code == 0
    rows = losses(run_dir)
    assert len(rows) == 4 and all(0 < float(r["loss"]) < 10 for r in rows)
    state = torch.load(run_dir / "resume.pt", weights_only=True)
    if precision == "fp16":  # the reference's (Lightning 16-mixed) scaler settings
        assert state["scaler"]["scale"] > 0 and state["scaler"]["growth_interval"] == 2000
    else:
        assert state["scaler"] == {}  # disabled: bf16 needs no loss scaling
    assert json.loads((run_dir / "summary.json").read_text())["precision"] == precision
