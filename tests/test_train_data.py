"""The training data stream, the latent index, launcher environment, conditioner, the plan (LR warm-up,
checkpoint steps) and per-sample noise."""

import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import yaml
from train_fixtures import LATENT_HW, launch_shape, tiny_config, write_latent_shards

from sdcore.data import RING_SLOTS, FrozenTextConditioner, LatentShardSource, read_latent_index
from sdcore.distributed import first_slurm_host, launcher_env
from sdcore.training.plan import TrainPlan, checkpoint_steps, lr_schedule, warmup_factor
from sdcore.training.trainer import training_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    config = tiny_config(str(tmp_path_factory.mktemp("shards")))
    return read_latent_index(write_latent_shards(config))[0]


def source(shards, rank=0, num_workers=0, block_steps=3, accumulation=2, batch_size=2):
    return LatentShardSource(shards, batch_size=batch_size, micro_batches_per_step=accumulation,
                             block_steps=block_steps, shuffle_buffer=8, seed=42, rank=rank,
                             num_samples=60, num_workers=num_workers)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_latent_index_names_shards_relative_to_itself(tmp_path):
    index = write_latent_shards(tiny_config(str(tmp_path)), num_shards=2, per_shard=5)
    shards, samples = read_latent_index(index)
    assert samples == 10
    assert shards == [os.path.join(os.path.dirname(index), name) for name in ("00000.tar", "00001.tar")]
    assert all(os.path.isabs(s) and os.path.exists(s) for s in shards)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"shards": [], "samples": 0}))
    with pytest.raises(ValueError, match="lists no latent shards"):
        read_latent_index(empty)


def test_batches_are_full_and_decoded(shards):
    batches = take(source(shards, batch_size=5).micro_batches(0), 13)  # 65 samples > one pass over 60
    for batch in batches:
        assert batch.moments.shape == (5, 8, LATENT_HW, LATENT_HW)
        assert batch.moments.dtype == torch.float32
        assert all(c.startswith("caption ") for c in batch.captions)
    # logvar channels were written in [-8, -2]: decoded in the right order
    assert all(b.moments[:, 4:].max() <= -2 and b.moments[:, 4:].min() >= -8 for b in batches)


def test_published_shard_layout_reads_the_same(shards, tmp_path):
    """The MLCommons-published shards hold (1, 8, h, w) moments: the same batches as (8, h, w) ones."""
    published = read_latent_index(write_latent_shards(tiny_config(str(tmp_path)), published_layout=True))[0]
    ours, theirs = take(source(shards).micro_batches(0), 6), take(source(published).micro_batches(0), 6)
    assert [b.captions for b in ours] == [b.captions for b in theirs]
    assert all(a.moments.shape == (2, 8, LATENT_HW, LATENT_HW) and torch.equal(a.moments, b.moments)
               for a, b in zip(ours, theirs))


def test_moments_of_another_shape_are_an_error_naming_the_sample(tmp_path):
    import io
    import tarfile

    import numpy as np

    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            np.save(buf, np.zeros((4, LATENT_HW, LATENT_HW), np.float32))  # latents, not moments
            for ext, payload in (("npy", buf.getvalue()), ("txt", b"caption")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match=r"k\d\.npy has shape \(4, 8, 8\), expected VAE moments"):
        take(source([str(shard)]).micro_batches(0), 1)


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


@pytest.mark.parametrize("block_steps", [3, 100])
def test_worker_batches_hold_each_samples_own_moments(shards, block_steps):
    """Workers hand their moments over through a ring of reused shared-memory slots: every sample that
    leaves the loader still holds its own moments after the slot it came through was overwritten (blocks
    of 3 steps start new workers every 6 micro-batches; one block of 100 wraps each ring several times)."""
    written = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".npy"):
                    written[member.name.removesuffix(".npy")] = np.load(io.BytesIO(tar.extractfile(member).read()))
    batches = take(source(shards, num_workers=2, block_steps=block_steps).micro_batches(0), 40)
    assert 40 // 2 > RING_SLOTS  # each worker's ring is reused
    for batch in batches:
        for key, moments in zip(batch.keys, batch.moments):
            assert np.array_equal(moments.numpy(), written[key]), key
    assert len({b.moments.data_ptr() for b in batches}) == len(batches)  # each its own copy


def test_stream_depends_on_the_number_of_workers(shards):
    """One stream role per worker: another train.num_workers is another trajectory, which is why it is a
    run setting (the plan holds it; changing it on resume is refused like any other training key)."""
    single = take(source(shards, num_workers=0).micro_batches(2), 6)
    workers = take(source(shards, num_workers=2).micro_batches(2), 6)
    assert [b.captions for b in single] != [b.captions for b in workers]
    assert all(len(b) == 2 and b.moments.shape[0] == 2 for b in workers)  # full batches either way


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
                        "SLURM_JOB_NODELIST": "dgx[12-13]", "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "8"})
    assert env["LAUNCHER"] == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "16", "3", "dgx12")
    assert env["LOCAL_WORLD_SIZE"] == "8"
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


def test_warmup_matches_lambda_linear_scheduler(tmp_path):
    """f(n) = (f_max - f_start) / W * n + f_start for n < W, then f_min + (f_max - f_min) * ... = 1."""
    assert warmup_factor(0, 1000, 1e-6) == 1e-6
    assert warmup_factor(500, 1000, 1e-6) == (1.0 - 1e-6) / 1000 * 500 + 1e-6
    assert warmup_factor(999, 1000, 1e-6) < 1.0
    assert warmup_factor(1000, 1000, 1e-6) == warmup_factor(10**7, 1000, 1e-6) == 1.0
    # through the trainer's schedule: optimizer step n runs with base x global batch x f(n)
    plan = TrainPlan.from_config(tiny_config(str(tmp_path), warmup_steps=4), world_size=2, seed=0)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=plan.learning_rate)
    sched = lr_schedule(opt, plan)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [2.5e-5 * 8 * warmup_factor(n, 4, 1e-6) for n in range(6)]


def test_plan_scales_learning_rate_and_checkpoint_interval(tmp_path):
    config = tiny_config(str(tmp_path), batch_size=8, gradient_accumulation_steps=2,
                         checkpoint_every_samples=512000, max_samples=6000000)
    config["model"]["base_learning_rate"] = 1.25e-7
    config["launch"] = launch_shape(4, nodes=2)
    plan = TrainPlan.from_config(config, world_size=8, seed=42)
    assert plan.global_batch == 128
    assert plan.learning_rate == pytest.approx(1.25e-7 * 128)
    assert plan.checkpoint_every_steps == 4000
    assert plan.max_steps == 46875
    # a checkpoint every 4000 steps and one at the end of the budget; the workflow's list is the same
    assert plan.checkpoint_steps == list(range(4000, 46875, 4000)) + [46875]
    assert checkpoint_steps(config) == plan.checkpoint_steps
    assert plan.is_checkpoint(46875) and not plan.is_checkpoint(46874)


def test_tiny_config_follows_the_schema(tmp_path):
    """The tests' config blocks are the product's: validated by the workflow's schema."""
    import jsonschema

    with open(os.path.join(REPO, "rules", "schemas", "config.schema.yaml")) as f:
        schema = yaml.safe_load(f)
    config = tiny_config(str(tmp_path))
    for block in ("train", "eval", "launch"):
        jsonschema.validate(config[block], {"$defs": schema["$defs"], **schema["properties"][block]})
    config["train"]["seed"] = None  # an entropy seed is a valid setting
    jsonschema.validate(config["train"], {"$defs": schema["$defs"], **schema["properties"]["train"]})


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
    other_seed = training_inputs(moments, 43, step=3, micro=1, first_index=0, scale_factor=0.18215,
                                 num_timesteps=1000)
    assert not torch.equal(whole[2], other_seed[2])
    assert whole[1].min() >= 0 and whole[1].max() < 1000
