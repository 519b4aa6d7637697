"""Several ranks: 2 gloo ranks (started as SLURM tasks would be) follow the same trajectory as 1 rank
with the same global batch; the launch shape is checked before any collective; SLURM host lists.

The data come from ``FixedGlobalBatchSource``: the global batch of step s is a fixed function of s and
rank r holds rows [r*B, (r+1)*B), so both runs see the same global batches. The per-sample latent,
timestep and noise draws are seeded by the sample's global index (sdcore.training.trainer.training_inputs),
so they match too. What differs is only floating-point summation order: DDP averages two half-batch
gradients instead of one full-batch mean. Tolerance: loss per step within 1e-5 relative (observed
~1e-7); final weights within 5e-5 absolute, a quarter of the learning rate 2e-4 (observed ~6e-6:
AdamW normalises each update to about the learning rate, so for parameters whose gradient is near
zero a rounding-level gradient difference can move the weight by a visible fraction of the LR).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from train_fixtures import (
    TIMEOUT_MINUTES,
    ScriptedEvaluator,
    assert_same_weights,
    checkpoint,
    deterministic_cpu,
    factories,
    free_port,
    launch_shape,
    loss_curve,
    summary,
    tiny_config,
)

from sdcore.distributed import (
    LaunchShapeError,
    check_launch_shape,
    gpus_bound_to_task,
    expand_hostlist,
    first_slurm_host,
    launcher_env,
    select_device,
)
from sdcore.training import trainer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def launch(config, run_dir, world_size, tmp_path):
    """Start ``world_size`` trainer processes (train_fixtures.py, as the 1-rank run in this process) with
    the environment srun gives its tasks; wait for all."""
    config_path = tmp_path / f"config_{run_dir.name}.json"
    config_path.write_text(json.dumps(config))
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=TESTS_DIR, SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size),
                   SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, SLURM_JOB_ID="1", SLURM_CPUS_PER_TASK="1",
                   SDCORE_COLLECTIVE_TIMEOUT_MINUTES=TIMEOUT_MINUTES,
                   # what Snakemake exports to a 2-thread job: each rank must still take 1 thread
                   OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
                     "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"):
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
    """Also: an entropy seed (train.seed null) drawn by rank 0 is the seed of every rank. The 2-rank run
    draws it; the 1-rank run is then started with that seed fixed and must follow the same trajectory,
    which it could not if rank 1 had drawn its own (its half of every batch would get other noise)."""
    steps = 8
    common = {"gradient_accumulation_steps": 2, "checkpoint_every_samples": 4 * 8, "max_samples": steps * 8}
    two = tiny_config(str(tmp_path), nproc_per_node=2, batch_size=2, seed=None, **common)  # 2 ranks x 2 x 2 = 8
    two["eval"]["stop_on_target"] = False
    logs = launch(two, tmp_path / "two", 2, tmp_path)
    assert "rank 0 of 2" in logs[0] and "launcher slurm" in logs[0] and "rank 1 of 2" in logs[1]
    assert all("device cpu, 1 CPU threads)" in log for log in logs), logs
    seed = summary(tmp_path / "two")["seed"]
    assert [re.findall(r"rank \d trains with seed (\d+)", log) for log in logs] == [[str(seed)], [str(seed)]]

    one = tiny_config(str(tmp_path), batch_size=4, seed=seed, **common)  # 1 rank x 4 x 2 micro-batches = 8
    one["eval"]["stop_on_target"] = False
    evaluator = ScriptedEvaluator([(300, 0.01)])
    with deterministic_cpu():
        assert trainer.main(one, tmp_path / "one", factories=factories(evaluator=evaluator)) == 0
    assert evaluator.calls == [32, 64] and evaluator.seeds == [seed, seed]

    assert len(loss_curve(tmp_path / "one")) == steps
    assert loss_curve(tmp_path / "two") == pytest.approx(loss_curve(tmp_path / "one"), rel=1e-5)
    (w1, m1), (w2, m2) = checkpoint(tmp_path / "one", steps), checkpoint(tmp_path / "two", steps)
    assert m1 == m2 == {"step": steps, "samples_seen": steps * 8, "seed": seed, "global_batch": 8}
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-5
    for run in ("one", "two"):
        result = summary(tmp_path / run)
        assert result["global_batch_size"] == 8 and result["samples_seen"] == steps * 8
        assert [e["samples_seen"] for e in result["evaluations"]] == [32, 64]
    assert (summary(tmp_path / "one")["world_size"], summary(tmp_path / "two")["world_size"]) == (1, 2)


@pytest.mark.slow
def test_persistent_weight_casts_under_ddp_equal_plain_autocast(tmp_path):
    """bf16 training on 2 DDP ranks with persistent weight casts gives bitwise the losses and
    weights of plain bf16 autocast: the wrapper keeps DDP's gradient hooks and the same values."""
    steps = 4
    common = {"batch_size": 2, "precision": "bf16", "checkpoint_every_samples": 4 * steps, "max_samples": 4 * steps}
    plain = tiny_config(str(tmp_path), eval_mode="offline", nproc_per_node=2, **common)
    persistent = tiny_config(str(tmp_path), eval_mode="offline", nproc_per_node=2, **common)
    persistent["train"]["fast_paths"]["persistent_weight_casts"] = True
    launch(plain, tmp_path / "plain", 2, tmp_path)
    launch(persistent, tmp_path / "persistent", 2, tmp_path)
    assert len(loss_curve(tmp_path / "plain")) == steps
    assert loss_curve(tmp_path / "persistent") == loss_curve(tmp_path / "plain")
    w_plain, w_persistent = checkpoint(tmp_path / "plain", steps)[0], checkpoint(tmp_path / "persistent", steps)[0]
    assert_same_weights(w_persistent, w_plain)


def test_config_of_two_ranks_started_as_one_process_fails_before_any_collective(tmp_path):
    config = tiny_config(str(tmp_path), nproc_per_node=2)
    with pytest.raises(LaunchShapeError, match=re.escape("launched 1 ranks, but launch.nodes x "
                                                         "launch.nproc_per_node = 1 x 2 = 2")) as error:
        trainer.main(config, tmp_path / "run", factories=factories(evaluator=ScriptedEvaluator([(300, 0.01)])))
    assert str(error.value).startswith("rank 0 (single): ")
    assert not torch.distributed.is_initialized()  # failed before joining a process group
    assert not (tmp_path / "run").exists()          # and before touching the run directory


def test_launch_shape_check():
    check_launch_shape(launch_shape(2, nodes=2), world_size=4, local_world_size=2, gpus_visible=0)
    check_launch_shape({"nodes": 1, "nproc_per_node": 8, "gpus_per_node": 8}, 8, 8, gpus_visible=8)
    check_launch_shape({"nodes": 1, "nproc_per_node": 8, "gpus_per_node": 8}, 8, 8, gpus_visible=1,
                       bound_to_task=True)  # srun --gpus-per-task: each rank its own GPU
    check_launch_shape({"nodes": 1, "nproc_per_node": 1, "gpus_per_node": 1}, 1, 1, gpus_visible=1)
    # finding 5 of issue 13: 8 ranks on a one-GPU machine (profiles/local) would all land on cuda:0
    with pytest.raises(LaunchShapeError, match="8 ranks per node need one GPU each: this rank sees 1 GPUs"):
        check_launch_shape({"nodes": 1, "nproc_per_node": 8, "gpus_per_node": 8}, 8, 8, gpus_visible=1)
    assert gpus_bound_to_task({"CUDA_VISIBLE_DEVICES": "3"}) and not gpus_bound_to_task({"CUDA_VISIBLE_DEVICES": "0,1"})
    assert not gpus_bound_to_task({})
    for shape, args, message in (
            (launch_shape(2, nodes=2), (4, 4, 0), "launched 4 ranks on this node, but launch.nproc_per_node = 2"),
            (launch_shape(2, nodes=2), (2, 2, 0), "launched 2 ranks, but launch.nodes x launch.nproc_per_node = 2 x 2"),
            ({"nodes": 1, "nproc_per_node": 2, "gpus_per_node": 2}, (2, 2, 0), "this rank sees no GPU"),
            ({"nodes": 1, "nproc_per_node": 4, "gpus_per_node": 4}, (4, 4, 2), "this rank sees 2 GPUs")):
        with pytest.raises(LaunchShapeError, match=re.escape(message)):
            check_launch_shape(shape, *args)


def test_device_selection():
    assert select_device(launch_shape(4), local_rank=3, gpus_visible=0) == torch.device("cpu")
    assert select_device(launch_shape(4), local_rank=3, gpus_visible=8) == torch.device("cpu")  # gpus_per_node 0
    gpus = {"nodes": 1, "nproc_per_node": 4, "gpus_per_node": 4}
    assert select_device(gpus, local_rank=3, gpus_visible=4) == torch.device("cuda", 3)
    assert select_device(gpus, local_rank=3, gpus_visible=1) == torch.device("cuda", 0)  # the task's bound GPU


def test_slurm_host_lists():
    assert expand_hostlist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]
    assert expand_hostlist("gpu[003-005,010],login1") == ["gpu003", "gpu004", "gpu005", "gpu010", "login1"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("n[8-11]") == ["n8", "n9", "n10", "n11"]
    assert expand_hostlist("gpu[08-10]") == ["gpu08", "gpu09", "gpu10"]
    assert expand_hostlist("rack[1-2]-node[01,03],head") == ["rack1-node01", "rack1-node03", "rack2-node01",
                                                              "rack2-node03", "head"]
    for bad in ("gpu[1-3", "gpu[a-b]", "", "gpu[3-]"):
        with pytest.raises(ValueError):
            expand_hostlist(bad)
    assert first_slurm_host("dgx[12-13]") == "dgx12"


def test_slurm_tasks_per_node():
    base = {"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[1-4]"}
    assert launcher_env({**base, "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"})["LOCAL_WORLD_SIZE"] == "2"
    assert launcher_env({**base, "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"})["LOCAL_WORLD_SIZE"] == "1"
    # srun's step variables win over the job's
    step = launcher_env({**base, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4",
                         "SLURM_TASKS_PER_NODE": "8", "SLURM_STEP_NODELIST": "m7"})
    assert (step["WORLD_SIZE"], step["LOCAL_WORLD_SIZE"], step["MASTER_ADDR"]) == ("4", "4", "m7")
