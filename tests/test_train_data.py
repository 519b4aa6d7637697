"""The training data stream, launcher environment, conditioner, LR warm-up and per-sample noise."""

import itertools

import pytest
import torch

from sdcore.data import FrozenTextConditioner, LatentShardSource, shard_paths
from sdcore.distributed import first_slurm_host, launcher_env
from sdcore.train import TrainPlan, training_inputs, warmup_factor
from train_fixtures import LATENT_HW, tiny_config, write_latent_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    config = tiny_config(str(tmp_path_factory.mktemp("shards")))
    return shard_paths([write_latent_shards(config)])


def source(shards, rank=0, num_workers=0, block_steps=3, accumulation=2, batch_size=2):
    return LatentShardSource(shards, batch_size=batch_size, micro_batches_per_step=accumulation,
                             block_steps=block_steps, shuffle_buffer=8, seed=42, rank=rank,
                             num_samples=60, num_workers=num_workers)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_batches_are_full_and_decoded(shards):
    batches = take(source(shards, batch_size=5).micro_batches(0), 13)  # 65 samples > one pass over 60
    for batch in batches:
        assert batch.moments.shape == (5, 8, LATENT_HW, LATENT_HW)
        assert batch.moments.dtype == torch.float32
        assert all(c.startswith("caption ") for c in batch.captions)
    # logvar channels were written in [-8, -2]: decoded in the right order
    assert all(b.moments[:, 4:].max() <= -2 and b.moments[:, 4:].min() >= -8 for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_exactly(shards, num_workers):
    """Micro-batches from step k equal the tail of the stream from step 0, across block boundaries."""
    accumulation = 2
    full = take(source(shards, num_workers=num_workers).micro_batches(0), 8 * accumulation)
    for start_step in (1, 4):  # inside block 0 and inside block 1 (blocks of 3 steps)
        resumed = take(source(shards, num_workers=num_workers).micro_batches(start_step),
                       (8 - start_step) * accumulation)
        expected = full[start_step * accumulation:]
        assert [b.captions for b in resumed] == [b.captions for b in expected]
        assert all(torch.equal(a.moments, b.moments) for a, b in zip(resumed, expected))


def test_ranks_draw_different_streams(shards):
    rank0 = [c for b in take(source(shards, rank=0).micro_batches(0), 4) for c in b.captions]
    rank1 = [c for b in take(source(shards, rank=1).micro_batches(0), 4) for c in b.captions]
    assert rank0 != rank1
    again = [c for b in take(source(shards, rank=0).micro_batches(0), 4) for c in b.captions]
    assert rank0 == again


def test_slurm_environment_gives_ranks_and_rendezvous():
    assert first_slurm_host("gpu[003-005,010],login1") == "gpu003"
    assert first_slurm_host("node7") == "node7"
    env = launcher_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
                        "SLURM_JOB_NODELIST": "dgx[12-13]", "SLURM_JOB_ID": "4242"})
    assert env["LAUNCHER"] == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "16", "3", "dgx12")
    assert env["MASTER_PORT"] == str(15000 + 4242)
    torchrun = launcher_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                             "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (torchrun["LAUNCHER"], torchrun["RANK"], torchrun["MASTER_PORT"]) == ("torchrun", "1", "1234")
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})["LAUNCHER"] == "single"


def test_text_conditioner_runs_the_frozen_encoder():
    from sdcore.text_encoder import FrozenOpenCLIPText

    encoder = FrozenOpenCLIPText("sdcore-tiny-clip")
    context = FrozenTextConditioner(encoder)(["a red square", ""], torch.device("cpu"))
    assert context.shape == (2, 77, 48)
    assert torch.equal(context, encoder.encode(["a red square", ""]))
    assert not any(p.requires_grad for p in encoder.parameters())


def test_warmup_matches_lambda_linear_scheduler():
    """f(n) = (f_max - f_start) / W * n + f_start for n < W, then f_min + (f_max - f_min) * ... = 1."""
    assert warmup_factor(0, 1000, 1e-6) == 1e-6
    assert warmup_factor(500, 1000, 1e-6) == (1.0 - 1e-6) / 1000 * 500 + 1e-6
    assert warmup_factor(999, 1000, 1e-6) < 1.0
    assert warmup_factor(1000, 1000, 1e-6) == warmup_factor(10**7, 1000, 1e-6) == 1.0
    # through LambdaLR as the trainer uses it: optimizer step n runs with base * f(n)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: warmup_factor(n, 4, 1e-6))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.5 * warmup_factor(n, 4, 1e-6) for n in range(6)]


def test_plan_scales_learning_rate_and_checkpoint_interval(tmp_path):
    config = tiny_config(str(tmp_path), batch_size=8, gradient_accumulation_steps=2,
                         checkpoint_every_samples=512000, max_samples=6000000)
    config["model"]["base_learning_rate"] = 1.25e-7
    plan = TrainPlan.from_config(config, world_size=8)
    assert plan.global_batch == 128
    assert plan.learning_rate == pytest.approx(1.25e-7 * 128)
    assert plan.checkpoint_every_steps == 4000
    assert plan.max_steps == 46875


def test_noise_depends_on_the_global_sample_not_the_rank():
    moments = torch.randn(4, 8, LATENT_HW, LATENT_HW)
    whole = training_inputs(moments, 42, step=3, micro=1, first_index=0, scale_factor=0.18215, num_timesteps=1000)
    second_rank = training_inputs(moments[2:], 42, step=3, micro=1, first_index=2, scale_factor=0.18215,
                                  num_timesteps=1000)
    for a, b in zip(whole, second_rank):
        assert torch.equal(a[2:], b)
    other_step = training_inputs(moments, 42, step=4, micro=1, first_index=0, scale_factor=0.18215,
                                 num_timesteps=1000)
    assert not torch.equal(whole[2], other_step[2])
    assert whole[1].min() >= 0 and whole[1].max() < 1000
