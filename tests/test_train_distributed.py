"""2 gloo ranks (started as SLURM tasks would be) follow the same trajectory as 1 rank with the same global batch.

The data come from ``FixedGlobalBatchSource``: the global batch of step s is a fixed function of s and
rank r holds rows [r*B, (r+1)*B), so both runs see the same global batches. The per-sample latent,
timestep and noise draws are seeded by the sample's global index (sdcore.train.training_inputs), so
they match too. What differs is only floating-point summation order: DDP averages two half-batch
gradients instead of one full-batch mean. Tolerance: loss per step within 1e-5 relative (observed
~1e-7); final weights within 5e-5 absolute, a quarter of the learning rate 2e-4 (observed ~6e-6:
AdamW normalises each update to about the learning rate, so for parameters whose gradient is near
zero a rounding-level gradient difference can move the weight by a visible fraction of the LR).
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from sdcore import train
from train_fixtures import (FixedGlobalBatchSource, HashedCaptionConditioner, ScriptedEvaluator, free_port,
                            tiny_config)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def launch(config, run_dir, world_size, tmp_path):
    """Start ``world_size`` trainer processes (train_fixtures.py, as the 1-rank run in this process) with
    the environment srun gives its tasks; wait for all."""
    config_path = tmp_path / f"config_{world_size}.json"
    config_path.write_text(json.dumps(config))
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=TESTS_DIR, SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size),
                   SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, SLURM_JOB_ID="1", SLURM_CPUS_PER_TASK="1",
                   # what Snakemake exports to a 2-thread job: each rank must still take 1 thread
                   OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(name, None)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(TESTS_DIR, "train_fixtures.py"), "--config", str(config_path),
             "--run-dir", str(run_dir), "--source", "fixed"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, stderr in results:
        assert code == 0, stderr
    return [stderr for _, stderr in results]


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    steps = 8
    common = dict(gradient_accumulation_steps=2, checkpoint_every_samples=4 * 8, max_samples=steps * 8)
    one = tiny_config(str(tmp_path), batch_size=4, **common)   # 1 rank x 4 x 2 micro-batches = 8
    two = tiny_config(str(tmp_path), batch_size=2, **common)   # 2 ranks x 2 x 2 micro-batches = 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        code = train.main(one, str(tmp_path / "one"), device="cpu",
                          make_data_source=lambda c, env, plan: FixedGlobalBatchSource(plan, env.rank),
                          make_conditioner=lambda c, env: HashedCaptionConditioner(),
                          make_evaluator=lambda c, env: ScriptedEvaluator([(300, 0.01)]))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert code == 0
    logs = launch(two, tmp_path / "two", 2, tmp_path)
    assert "rank 0 of 2" in logs[0] and "launcher slurm" in logs[0] and "rank 1 of 2" in logs[1]
    assert all("device cpu, 1 CPU threads)" in log for log in logs), logs

    assert len(loss_curve(tmp_path / "one")) == steps
    assert loss_curve(tmp_path / "two") == pytest.approx(loss_curve(tmp_path / "one"), rel=1e-5)
    final = f"checkpoints/step_{steps:08d}.pt"
    w1 = torch.load(tmp_path / "one" / final, weights_only=True)["unet"]
    w2 = torch.load(tmp_path / "two" / final, weights_only=True)["unet"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-5
    for run in ("one", "two"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["global_batch_size"] == 8 and summary["samples_seen"] == steps * 8


def loss_curve(run_dir) -> list[float]:
    with open(run_dir / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_persistent_weight_casts_under_ddp_equal_plain_autocast(tmp_path):
    """bf16 training on 2 DDP ranks with persistent weight casts gives bitwise the losses and
    weights of plain bf16 autocast: the wrapper keeps DDP's gradient hooks and the same values."""
    steps = 4
    common = dict(batch_size=2, precision="bf16", checkpoint_every_samples=4 * steps, max_samples=4 * steps)
    plain = tiny_config(str(tmp_path), **common)
    persistent = tiny_config(str(tmp_path), **common)
    persistent["train"]["fast_paths"]["persistent_weight_casts"] = True
    launch(plain, tmp_path / "plain", 2, tmp_path)
    launch(persistent, tmp_path / "persistent", 2, tmp_path)
    assert len(loss_curve(tmp_path / "plain")) == steps
    assert loss_curve(tmp_path / "persistent") == loss_curve(tmp_path / "plain")
    final = f"checkpoints/step_{steps:08d}.pt"
    w_plain = torch.load(tmp_path / "plain" / final, weights_only=True)["unet"]
    w_persistent = torch.load(tmp_path / "persistent" / final, weights_only=True)["unet"]
    assert w_persistent.keys() == w_plain.keys()
    for name in w_plain:
        assert torch.equal(w_persistent[name], w_plain[name]), name
