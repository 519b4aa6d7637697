"""The faults benchmarks/faults.py injects, each fixed, in seconds: writes cut short, a full disk, a run
killed after its final state, two trainers in one run directory, ranks whose launcher or peer is gone,
bad training samples (skipped deterministically, bounded by train.max_bad_samples).

CPU, one thread, ``torch.use_deterministic_algorithms(True)``; the tiny trainer of train_fixtures with
real webdataset shards (3 shards x 20 samples), 12 steps, a checkpoint every 3.
"""

import csv
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import (
    HookedConditioner,
    ScriptedEvaluator,
    assert_same_weights,
    checkpoint,
    deterministic_cpu,
    factories,
    free_port,
    loss_curve,
    state,
    summary,
    tiny_config,
    write_latent_shards,
)

from sdcore import files
from sdcore.data import BadSampleError, LatentShardSource, ShardReadError, read_latent_index
from sdcore.distributed import collective_timeout
from sdcore.training import trainer
from sdcore.training.history import LossHistory

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"checkpoint_every_samples": 12, "max_samples": 48}  # 12 steps, checkpoints at 3, 6, 9, 12
FINAL = 12


@pytest.fixture(autouse=True)
def deterministic():
    with deterministic_cpu():
        yield


@pytest.fixture
def config(tmp_path):
    return tiny_config(str(tmp_path), **SETTINGS)


@pytest.fixture
def latents(config):
    return write_latent_shards(config)


def run(config, run_dir, latents, conditioner=None):
    return trainer.main(config, run_dir, inputs=trainer.TrainInputs(latents=latents),
                        factories=factories("shards", conditioner=conditioner, evaluator=ScriptedEvaluator([(300, 0.01)])))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run on clean shards."""
    root = tmp_path_factory.mktemp("reference")
    config = tiny_config(str(root), **SETTINGS)
    with deterministic_cpu():
        assert run(config, root / "run", write_latent_shards(config)) == 0
    return root / "run"


def assert_same_run(run_dir, reference_dir):
    for step in (3, 6, 9, 12):
        assert_same_weights(checkpoint(run_dir, step)[0], checkpoint(reference_dir, step)[0])
    assert (run_dir / "train" / "loss.csv").read_text() == (reference_dir / "train" / "loss.csv").read_text()
    ours, theirs = state(run_dir), state(reference_dir)
    for key in ("optimizer", "lr_schedule", "scaler", "rng", "step"):
        assert_same_tree(ours[key], theirs[key], key)


def assert_same_tree(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class SignalAtCall(HookedConditioner):
    def __init__(self, n, signum=signal.SIGUSR1):
        super().__init__(lambda call: call == n and os.kill(os.getpid(), signum))


def damage(shard: Path, index: int, kind: str) -> str:
    """Damage sample ``index`` of a shard in place (same member order); returns its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    key = sorted({m.name.split(".")[0] for m, _ in members})[index]
    with tarfile.open(shard, "w") as out:
        for member, data in members:
            if member.name.split(".")[0] == key:
                if kind == "caption" and member.name.endswith(".txt"):
                    data = b"caption \xff\xfe not UTF-8"
                elif kind == "shape" and member.name.endswith(".npy"):
                    buf = io.BytesIO()
                    np.save(buf, np.zeros((8, 4, 4), np.float32))
                    data = buf.getvalue()
                elif kind == "missing" and member.name.endswith(".txt"):
                    continue
                member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return key


def clean_stream(config, latents, steps=FINAL):
    """The first ``steps`` micro-batches of the run's (single rank's) stream, as the trainer reads them."""
    source = trainer.latent_source(config, rank0(), trainer.TrainPlan.from_config(config, 1, config["train"]["seed"]),
                                   trainer.TrainInputs(latents=latents))
    batches = source.micro_batches(0)
    return [next(batches) for _ in range(steps)]


def first_drawn_shard(config, latents) -> Path:
    """The shard the stream reads first (all its samples pass the decoder before the first step)."""
    return Path(clean_stream(config, latents, 1)[0].shards[0])


def last_drawn_shard(config, latents) -> tuple[Path, int]:
    """The shard whose first sample appears latest in the run's batches, and that batch's index."""
    first_seen = {}
    for i, batch in enumerate(clean_stream(config, latents)):
        for shard in batch.shards:
            first_seen.setdefault(shard, i)
    shard = max(first_seen, key=first_seen.get)
    return Path(shard), first_seen[shard]


def rank0():
    from sdcore.distributed import DistEnv

    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), launcher="single")


# ---- atomic writes ---------------------------------------------------------------------------------

def test_a_library_error_of_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    """safetensors reports ENOSPC as SafetensorError("... No space left on device (os error 28)"), which
    named no file: atomic_path turns it into OSError "cannot write <path>"; the previous file stays."""
    target = tmp_path / "step_00000006.safetensors"
    target.write_bytes(b"the previous, complete file")

    class SafetensorError(Exception):
        pass

    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device") as error:
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert error.value.errno == 28
    assert target.read_bytes() == b"the previous, complete file"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the temporary is gone
    with pytest.raises(ValueError, match="bad value") as other:
        with files.atomic_path(target):
            raise ValueError("bad value")
    assert f"while writing {target}" in str(other.value.__notes__)


def test_torch_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """torch.save's zip writer, on ENOSPC, raises RuntimeError("... unexpected pos ...") while closing,
    the OSError only its context: the error named neither the file nor the full disk."""
    target = tmp_path / "state.pt"

    def full_disk(obj, f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2033280 vs 2033168")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device") as error:
        files.save_torch({"step": 1}, target)
    assert error.value.errno == 28 and not list(tmp_path.iterdir())


def test_loss_history_is_rewritten_atomically_and_must_be_whole(tmp_path, monkeypatch):
    path = tmp_path / "loss.csv"
    history = LossHistory(path, True, None)
    for step in range(1, 6):
        history.append(step, step * 4, 1.0 / step, 1e-4)
    good = path.read_text()

    def killed(self, rows):  # the process dies in the middle of the resume's rewrite
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        LossHistory(path, True, 4)
    monkeypatch.undo()
    assert path.read_text() == good  # before: the file was cut to its header, the history lost
    LossHistory(path, True, 4)
    assert [r.split(",")[0] for r in path.read_text().splitlines()[1:]] == ["1", "2", "3", "4"]

    with open(path, "a") as f:
        f.write("5,20,0.2")  # a torn row after the resume step is dropped
    LossHistory(path, True, 4)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")  # rows 3 and 4 lost
    with pytest.raises(ValueError, match=f"{path}: the loss history ends at step 2, but the run resumes at step 4"):
        LossHistory(path, True, 4)


# ---- the trainer: one per run directory, killed after its last state, stale temporaries ----------------

def test_a_second_trainer_in_the_run_directory_is_refused_before_it_writes(config, latents, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / trainer.LOCK_FILE, "w") as holder:  # the ranks of a killed attempt, still running
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("pid 4242 on elsewhere since then\n")
        holder.flush()
        with pytest.raises(trainer.RunError, match="is being trained by pid 4242 on elsewhere"):
            run(config, run_dir, latents)
    assert sorted(p.name for p in run_dir.iterdir()) == [trainer.LOCK_FILE]  # nothing written


def test_temporaries_of_killed_writes_are_removed_when_the_run_resumes(config, latents, tmp_path, reference_run):
    run_dir = tmp_path / "run"
    assert run(config, run_dir, latents, conditioner=SignalAtCall(5)) == trainer.PREEMPTED_EXIT_CODE
    stale = [run_dir / "train" / ".state.999.tmp.pt", run_dir / "checkpoints" / ".step_00000006.999.tmp.safetensors"]
    for path in stale:
        path.write_bytes(b"half")
    assert run(config, run_dir, latents) == 0
    assert not any(path.exists() for path in stale)
    assert_same_run(run_dir, reference_run)


def test_killed_after_its_final_state_the_run_writes_its_summary_again(config, latents, tmp_path, reference_run):
    """Killed between the finished state and its exit, the job counts as failed and the workflow deletes
    summary.json, its declared output; the retry used to refuse the finished run for good."""
    run_dir = tmp_path / "run"
    assert run(config, run_dir, latents) == 0
    written = summary(run_dir)
    (run_dir / "train" / "summary.json").unlink()
    assert run(config, run_dir, latents) == 0
    assert summary(run_dir) == written
    assert_same_run(run_dir, reference_run)
    with pytest.raises(trainer.RunError, match="has finished"):  # with its summary, never reopened
        run(config, run_dir, latents)


def test_a_log_shorter_than_the_state_says_is_refused(config, latents, tmp_path):
    run_dir = tmp_path / "run"
    assert run(config, run_dir, latents, conditioner=SignalAtCall(5)) == trainer.PREEMPTED_EXIT_CODE
    log_path = run_dir / "train" / "mlperf.log"
    log_path.write_bytes(log_path.read_bytes()[:100])
    with pytest.raises(trainer.RunError, match="100 bytes, but the state of step 5 was saved after"):
        run(config, run_dir, latents)


# ---- bad training samples ----------------------------------------------------------------------------

def test_bad_samples_name_their_shard_or_are_reported_deterministically(config, latents):
    shards, _ = read_latent_index(latents)
    shard = Path(shards[1])
    caption = damage(shard, 2, "caption")
    shape = damage(shard, 5, "shape")
    missing = damage(shard, 9, "missing")

    def stream(**kwargs):
        return LatentShardSource([str(shard)], batch_size=4, micro_batches_per_step=1, block_steps=3, shuffle_buffer=8,
                                 seed=1, rank=0, num_samples=20, **kwargs).micro_batches(0)

    with pytest.raises(BadSampleError, match=f"{shard}: {caption}.txt is not valid UTF-8"):
        next(stream())
    batches = [next(it) for it in [stream(latent_shape=(8, 8, 8), skip_bad_samples=True)] for _ in range(8)]
    reported = [(s, k) for b in batches for s, k, _ in b.skipped]
    assert sorted({k for _, k in reported}) == sorted([caption, shape, missing])
    assert all(s == str(shard) for s, _ in reported)
    assert not {caption, shape, missing} & {k for b in batches for k in b.keys}
    reasons = " ".join(r for b in batches for _, _, r in b.skipped)
    assert "has shape (8, 4, 4), expected VAE moments (8, 8, 8)" in reasons and "has no .txt" in reasons
    again = [next(it) for it in [stream(latent_shape=(8, 8, 8), skip_bad_samples=True)] for _ in range(8)]
    assert [b.keys for b in again] == [b.keys for b in batches] and [b.skipped for b in again] == \
        [b.skipped for b in batches]
    resumed = list(zip(range(6), LatentShardSource([str(shard)], batch_size=4, micro_batches_per_step=1, block_steps=3,
                                                   shuffle_buffer=8, seed=1, rank=0, num_samples=20,
                                                   latent_shape=(8, 8, 8), skip_bad_samples=True).micro_batches(2)))
    assert [b.keys for _, b in resumed] == [b.keys for b in batches[2:]]  # the resumed stream skips the same


def test_a_shard_cut_at_a_member_boundary_is_truncated_not_shorter(config, latents):
    shards, _ = read_latent_index(latents)
    shard = Path(shards[0])
    with tarfile.open(shard) as tar:
        cut = [m for m in tar][12].offset  # the header of the 7th sample: a cut between members
    shard.write_bytes(shard.read_bytes()[:cut])

    def stream(**kwargs):
        return LatentShardSource([str(shard)], batch_size=4, micro_batches_per_step=1, block_steps=3, shuffle_buffer=8,
                                 seed=1, rank=0, num_samples=20, **kwargs).micro_batches(0)

    with pytest.raises(ShardReadError, match=f"{shard}: truncated: ends without the tar end-of-archive blocks"):
        next(stream())  # before: read as a shard of 10 samples, silently
    batch = next(stream(skip_bad_samples=True))
    assert [(s, k) for s, k, _ in batch.skipped] == [(str(shard), "<truncated>")]


def test_limit_zero_stops_before_a_skip_is_trained_and_the_mended_run_resumes_bitwise(config, latents, tmp_path,
                                                                                       reference_run):
    shard, first_batch = last_drawn_shard(config, latents)
    assert first_batch >= 3  # a shard first read mid-run, so the stop comes after some steps
    original = shard.read_bytes()
    key = damage(shard, 19, "caption")
    run_dir = tmp_path / "run"
    with pytest.raises(trainer.BadDataError) as error:
        run(config, run_dir, latents)
    message = str(error.value)
    assert f"{shard}: {key}.txt is not valid UTF-8" in message and "train.max_bad_samples = 0" in message
    stopped = state(run_dir)
    assert 0 < stopped["step"] < FINAL and stopped["bad_samples"] == []  # the set kept within the limit
    shard.write_bytes(original)
    assert run(config, run_dir, latents) == 0
    assert_same_run(run_dir, reference_run)


def test_skipped_samples_are_counted_and_a_resumed_run_skips_them_bitwise(config, latents, tmp_path):
    shard = first_drawn_shard(config, latents)
    keys = sorted([damage(shard, 4, "caption"), damage(shard, 15, "shape")])
    config["train"]["max_bad_samples"] = 2
    assert run(config, tmp_path / "uninterrupted", latents) == 0
    counted = summary(tmp_path / "uninterrupted")["bad_samples_skipped"]
    assert sorted(entry["key"] for entry in counted) == keys
    assert all(entry["shard"] == str(shard) for entry in counted)

    resumed = tmp_path / "resumed"
    config["train"]["max_bad_samples"] = 1  # over the limit: stops naming the shard
    with pytest.raises(trainer.BadDataError, match="more than train.max_bad_samples = 1"):
        run(config, resumed, latents)
    config["train"]["max_bad_samples"] = 2  # raised: the run resumes (a change this key may make)
    assert run(config, resumed, latents, conditioner=SignalAtCall(4)) == trainer.PREEMPTED_EXIT_CODE
    assert len(state(resumed)["bad_samples"]) == 2
    assert run(config, resumed, latents) == 0
    assert_same_run(resumed, tmp_path / "uninterrupted")
    assert summary(resumed)["bad_samples_skipped"] == counted
    assert loss_curve(resumed) == loss_curve(tmp_path / "uninterrupted")


# ---- processes: a dead launcher, a dead or hung peer -------------------------------------------------

def test_collective_timeout_takes_fractions_of_a_minute():
    assert collective_timeout({}).total_seconds() == 1800
    assert collective_timeout({"SDCORE_COLLECTIVE_TIMEOUT_MINUTES": "0.25"}).total_seconds() == 15
    for bad in ("soon", "0", "-1"):
        with pytest.raises(ValueError, match="SDCORE_COLLECTIVE_TIMEOUT_MINUTES"):
            collective_timeout({"SDCORE_COLLECTIVE_TIMEOUT_MINUTES": bad})


def test_a_rank_whose_launcher_is_killed_exits(tmp_path):
    """torchrun starts its ranks in sessions of their own: SIGKILL of torchrun left them training on."""
    pid_file = tmp_path / "rank.pid"
    rank = textwrap.dedent(f"""
        import os, time
        from sdcore.distributed import watch_parent
        watch_parent(poll_seconds=0.05)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {rank!r}], start_new_session=True)
        time.sleep(60)
    """)])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    launcher.kill()
    launcher.wait()
    killed = time.monotonic()
    while running(pid):
        if time.monotonic() - killed > 10:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the rank outlived its launcher")
        time.sleep(0.05)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_rank_whose_peer_hangs_gives_up_after_the_collective_timeout(config, latents, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-training: rank 0 ends by the collective timeout (6 s here), instead
    of waiting forever; both started as srun starts its tasks."""
    config["train"].update(max_samples=4 * 2 * 200, checkpoint_every_samples=4 * 2 * 100)
    config["launch"]["nproc_per_node"] = 2
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=TESTS_DIR, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SLURM_JOB_ID="1",
                   SLURM_CPUS_PER_TASK="1", SDCORE_COLLECTIVE_TIMEOUT_MINUTES="0.1")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
                     "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"):
            env.pop(name, None)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(TESTS_DIR, "train_fixtures.py"), "--config", str(config_path),
             "--run-dir", str(tmp_path / "run"), "--source", "shards", "--latents", latents],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    loss_csv = tmp_path / "run" / "train" / "loss.csv"
    deadline = time.monotonic() + 120
    try:
        while not (loss_csv.exists() and len(loss_csv.read_text().splitlines()) > 5):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = procs[0].communicate(timeout=60)
        waited = time.monotonic() - stopped
        assert procs[0].returncode != 0
        assert 5 < waited < 40, waited
        assert "timed out" in stderr.lower() or "timeout" in stderr.lower(), stderr[-2000:]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_offline_run_resumed_from_a_checkpoint_state_logs_its_block_start(tmp_path):
    """Offline mode: the state of a checkpoint is saved between block_stop and the next block_start; a
    run resumed from it (killed before its next state) lost that block_start from its MLPerf log."""
    from train_fixtures import mlperf_records

    config = tiny_config(str(tmp_path), eval_mode="offline", **SETTINGS)
    latents = write_latent_shards(config)

    def offline(run_dir, conditioner=None):
        return trainer.main(config, run_dir, inputs=trainer.TrainInputs(latents=latents),
                            factories=factories("shards", conditioner=conditioner))

    assert offline(tmp_path / "uninterrupted") == 0

    class CrashAtCall(HookedConditioner):
        def __init__(self, n):
            super().__init__(lambda call: (_ for _ in ()).throw(RuntimeError("node lost")) if call == n else None)

    with pytest.raises(RuntimeError, match="node lost"):
        offline(tmp_path / "crashed", conditioner=CrashAtCall(5))  # the state of checkpoint 3 is the last
    assert state(tmp_path / "crashed")["step"] == 3
    assert offline(tmp_path / "crashed") == 0

    def keys(run_dir):
        return [(r["key"], r["metadata"].get("samples_count")) for r in mlperf_records(run_dir)
                if r["key"] != "sdcore_resume"]

    assert keys(tmp_path / "crashed") == keys(tmp_path / "uninterrupted")
    assert ("block_start", 12) in keys(tmp_path / "crashed")
    assert_same_run(tmp_path / "crashed", tmp_path / "uninterrupted")
