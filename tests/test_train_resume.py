"""Exact resumption: a run interrupted (crash, SIGTERM, SIGUSR1) and resumed ends bitwise equal to one
that never stopped; the state files; what may and may not be resumed.

CPU, one thread, ``torch.use_deterministic_algorithms(True)``, real webdataset shards (so the data
stream's fast-forward inside a block is exercised), inline evaluation (ScriptedEvaluator).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_fixtures import (
    TIMEOUT_MINUTES,
    HookedConditioner,
    ScriptedEvaluator,
    assert_same_weights,
    checkpoint,
    checkpoint_files,
    deterministic_cpu,
    factories,
    loss_curve,
    mlperf_records,
    state,
    step_files,
    summary,
    tiny_config,
    write_latent_shards,
)

from sdcore.mlperf_log import RESUME_KEY
from sdcore.training import trainer
from sdcore.training.state import load_state

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# 12 steps of 4 samples, a checkpoint every 3 steps (4 evaluations), never reaching the target
SETTINGS = {"checkpoint_every_samples": 12, "max_samples": 48}
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


def run(config, run_dir, latents, evaluator=None, conditioner=None):
    return trainer.main(config, run_dir, inputs=trainer.TrainInputs(latents=latents),
                        factories=factories("shards", conditioner=conditioner,
                                            evaluator=evaluator or ScriptedEvaluator([(300, 0.01)])))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run of SETTINGS (its own copy of the shards: same bytes, same stream)."""
    root = tmp_path_factory.mktemp("reference")
    config = tiny_config(str(root), **SETTINGS)
    with deterministic_cpu():
        assert run(config, root / "run", write_latent_shards(config)) == 0
    return root / "run"


def mlperf_keys(run_dir):
    return [r["key"] for r in mlperf_records(run_dir)]


def assert_same_run(run_dir, reference_dir, final=FINAL, resumed=True):
    assert_same_weights(checkpoint(run_dir, final)[0], checkpoint(reference_dir, final)[0])
    assert (run_dir / "train" / "loss.csv").read_text() == (reference_dir / "train" / "loss.csv").read_text()
    keys, reference_keys = mlperf_keys(run_dir), mlperf_keys(reference_dir)
    resumes = [r for r in mlperf_records(run_dir) if r["key"] == RESUME_KEY]
    assert [k for k in keys if k != RESUME_KEY] == reference_keys  # one init_start ... run_stop, nothing duplicated
    assert keys.count("run_start") == 1 and keys.count("eval_accuracy") == 8
    # a restart from a saved state says so in the log: attempt 2 (or more), with its downtime
    assert bool(resumes) == resumed
    if resumed:
        assert resumes[0]["value"]["attempt"] >= 2 and resumes[0]["value"]["downtime_seconds"] >= 0
        assert summary(run_dir)["attempts"] == resumes[-1]["value"]["attempt"]
    assert not list((run_dir / "train").glob("unet_step_*"))  # the final state uses the final checkpoint
    assert summary(run_dir)["evaluations"] == summary(reference_dir)["evaluations"]


class SignalAtCall(HookedConditioner):
    """Sends this process a signal during the n-th conditioning call (i.e. in the middle of a step)."""

    def __init__(self, n, signum):
        super().__init__(lambda call: call == n and os.kill(os.getpid(), signum))


class CrashAtCall(HookedConditioner):
    """Raises during the n-th conditioning call: a crash in the middle of a step, no state saved for it."""

    def __init__(self, n):
        def crash(call):
            if call == n:
                raise RuntimeError("node lost during training")
        super().__init__(crash)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_block_saves_state_exits_and_resumes_bitwise(config, latents, tmp_path, reference_run, signum):
    run_dir = tmp_path / "preempted"
    assert run(config, run_dir, latents, conditioner=SignalAtCall(5, signum)) == trainer.PREEMPTED_EXIT_CODE
    saved = state(run_dir)
    assert saved["step"] == 5 and not saved["pending_eval"]  # the step in flight finished, then stop
    assert saved["unet_file"] == "train/unet_step_00000005.safetensors"
    assert checkpoint_files(run_dir) == step_files([3])
    assert not (run_dir / "train" / "summary.json").exists()
    assert signal.getsignal(signum) is signal.SIG_DFL  # the trainer's handler is gone after main returns
    assert run(config, run_dir, latents) == 0
    assert_same_run(run_dir, reference_run)
    assert summary(run_dir)["attempts"] == 2


class CrashingEvaluator(ScriptedEvaluator):
    def evaluate(self, unet, samples_seen, seed, samples_png=None):
        if len(self.calls) == 1:
            raise RuntimeError("node lost during evaluation")
        return super().evaluate(unet, samples_seen, seed, samples_png)


def test_crash_during_an_evaluation_resumes_with_the_evaluation_and_bitwise(config, latents, tmp_path, reference_run):
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="node lost"):
        run(config, run_dir, latents, evaluator=CrashingEvaluator([(300, 0.01)]))
    saved = state(run_dir)
    assert saved["pending_eval"] and saved["step"] == 6
    assert saved["unet_file"] == "checkpoints/step_00000006.safetensors"
    assert not (run_dir / "eval" / "step_00000006.json").exists()
    evaluator = ScriptedEvaluator([(300, 0.01)])
    assert run(config, run_dir, latents, evaluator=evaluator) == 0
    assert evaluator.calls == [24, 36, 48]  # the checkpoint at 24 samples is evaluated after the restart
    assert_same_run(run_dir, reference_run)


def test_crash_mid_block_resumes_from_the_last_checkpoint_with_tensorboard(config, latents, tmp_path, reference_run):
    """A crash (no chance to save) during step 5 resumes from the state of checkpoint 3: steps 4-5 are
    trained again, and the history (loss.csv, TensorBoard) holds each step once, as the reference."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config["train"]["tensorboard"] = True
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="node lost"):
        run(config, run_dir, latents, conditioner=CrashAtCall(5))
    assert state(run_dir)["step"] == 3
    assert len(loss_curve(run_dir)) == 4  # steps 1-4 were recorded before the crash
    time.sleep(1.1)  # event files are named by the second they were opened in: keep the attempts apart
    assert run(config, run_dir, latents) == 0
    assert_same_run(run_dir, reference_run)

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert len(os.listdir(run_dir / "tb")) == 2  # one event file per attempt
    assert {"train/loss", "train/lr", "eval/FID", "eval/CLIP"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, FINAL + 1))  # nothing duplicated by the restart
    assert [e.value for e in loss] == pytest.approx(loss_curve(reference_run), rel=1e-6)
    assert [e.step for e in events.Scalars("train/lr")] == list(range(1, FINAL + 1))
    assert [e.step for e in events.Scalars("eval/FID")] == [3, 6, 9, 12]


def test_crash_before_the_first_state_starts_over(config, latents, tmp_path, reference_run):
    """A crash before the first checkpoint leaves no state: the retry is a fresh start, whose history
    (loss.csv, MLPerf log, TensorBoard) replaces the dead attempt's instead of adding to it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config["train"]["tensorboard"] = True
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="node lost"):
        run(config, run_dir, latents, conditioner=CrashAtCall(3))
    assert load_state(run_dir) is None and len(loss_curve(run_dir)) == 2
    time.sleep(1.1)  # event files are named by the second they were opened in: keep the attempts apart
    assert run(config, run_dir, latents) == 0
    assert_same_run(run_dir, reference_run, resumed=False)
    assert summary(run_dir)["attempts"] == 1
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, FINAL + 1))


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_retry(config, latents, tmp_path):
    """A real SIGTERM from outside: state saved, exit code 75, the retried command resumes bitwise."""
    config["train"].update(max_samples=4 * 40, checkpoint_every_samples=4 * 10)  # long enough to be signalled mid-run
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))

    def command(run_dir):
        return [sys.executable, os.path.join(TESTS_DIR, "train_fixtures.py"), "--config", str(config_path),
                "--run-dir", str(run_dir), "--source", "shards", "--latents", latents]

    env = dict(os.environ, PYTHONPATH=TESTS_DIR, OMP_NUM_THREADS="1", SDCORE_COLLECTIVE_TIMEOUT_MINUTES=TIMEOUT_MINUTES)
    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loss_csv = run_dir / "train" / "loss.csv"
    deadline = time.monotonic() + 120
    while not (loss_csv.exists() and len(loss_csv.read_text().splitlines()) > 8):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == trainer.PREEMPTED_EXIT_CODE, stderr
    assert "received SIGTERM" in stderr
    stopped_at = state(run_dir)["step"]
    assert 8 <= stopped_at < 40

    retry = subprocess.run(command(run_dir), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert retry.returncode == 0, retry.stderr
    assert f"resumed {run_dir} at step {stopped_at}" in retry.stderr

    reference_dir = tmp_path / "uninterrupted"  # in this process: same settings as the script's
    assert run(config, reference_dir, latents) == 0
    assert_same_weights(checkpoint(run_dir, 40)[0], checkpoint(reference_dir, 40)[0])
    assert (run_dir / "train" / "loss.csv").read_text() == (reference_dir / "train" / "loss.csv").read_text()
    assert summary(run_dir)["attempts"] == 2


def test_resumed_entropy_seed_is_kept(config, latents, tmp_path):
    """train.seed null: the seed drawn at the first start is the seed of every later attempt. The
    resumed run equals bitwise an uninterrupted run started with that seed fixed."""
    config["train"]["seed"] = None
    run_dir = tmp_path / "entropy"
    assert run(config, run_dir, latents, conditioner=SignalAtCall(5, signal.SIGUSR1)) == trainer.PREEMPTED_EXIT_CODE
    seed = state(run_dir)["plan"]["seed"]
    assert checkpoint(run_dir, 3)[1]["seed"] == seed
    evaluator = ScriptedEvaluator([(300, 0.01)])
    assert run(config, run_dir, latents, evaluator=evaluator) == 0
    assert summary(run_dir)["seed"] == seed
    assert {checkpoint(run_dir, step)[1]["seed"] for step in (3, 6, 9, 12)} == {seed}
    assert [r["value"] for r in mlperf_records(run_dir) if r["key"] == "seed"] == [seed]
    assert set(evaluator.seeds) == {seed}

    fixed = tiny_config(str(tmp_path), **SETTINGS, seed=seed)
    assert run(fixed, tmp_path / "fixed", latents) == 0
    assert_same_run(run_dir, tmp_path / "fixed")


def test_finished_run_is_never_reopened(config, latents, tmp_path):
    config["train"].update(max_samples=8, checkpoint_every_samples=8)
    run_dir = tmp_path / "run"
    assert run(config, run_dir, latents) == 0
    before = {p: p.read_bytes() for p in (run_dir / "train").iterdir()}
    with pytest.raises(trainer.RunError, match="has finished") as error:
        run(config, run_dir, latents)
    assert str(run_dir) in str(error.value) and "run_name" in str(error.value)  # the two ways out
    assert f"delete {run_dir}" in str(error.value)
    assert {p: p.read_bytes() for p in (run_dir / "train").iterdir()} == before  # nothing touched


def test_changed_training_setting_of_a_started_run_fails(config, latents, tmp_path, reference_run):
    run_dir = tmp_path / "run"
    assert run(config, run_dir, latents, conditioner=SignalAtCall(5, signal.SIGTERM)) == trainer.PREEMPTED_EXIT_CODE
    saved = (run_dir / "train" / "state.pt").read_bytes()
    for key, value in (("batch_size", 2), ("max_samples", 96)):
        changed = json.loads(json.dumps(config))
        changed["train"][key] = value
        with pytest.raises(trainer.RunError, match=f"train\\.{key} ") as error:
            run(changed, run_dir, latents)
        assert str(run_dir) in str(error.value) and "run_name" in str(error.value)
        assert (run_dir / "train" / "state.pt").read_bytes() == saved
    assert run(config, run_dir, latents) == 0  # the run's own settings still continue it, bitwise
    assert_same_run(run_dir, reference_run)


def test_changed_keys_names_every_difference():
    old = {"train": {"batch_size": 4, "optimizer": {"eps": 1e-8}, "seed": None}, "run_name": "a"}
    new = {"train": {"batch_size": 2, "optimizer": {"eps": 1e-8}, "seed": 5}, "run_name": "a", "extra": 1}
    assert trainer.changed_keys(old, new) == ["extra (None -> 1)", "train.batch_size (4 -> 2)", "train.seed (None -> 5)"]
    assert trainer.changed_keys(old, old) == []


def test_state_files_resume_weights_and_refusals(config, latents, tmp_path, reference_run):
    """state.pt names the weights of its step: the step's checkpoint, else train/unet_step_N.safetensors,
    whose older versions are removed. A state whose weights file is at another step is refused; the
    hidden temporaries a kill during a write leaves behind are ignored."""
    run_dir = tmp_path / "run"
    train_dir = run_dir / "train"
    assert run(config, run_dir, latents, conditioner=SignalAtCall(5, signal.SIGUSR1)) == trainer.PREEMPTED_EXIT_CODE
    assert sorted(p.name for p in train_dir.glob("unet_step_*")) == ["unet_step_00000005.safetensors"]
    stored, unet_state = load_state(run_dir)
    assert stored["step"] == 5 and unet_state.keys() == checkpoint(run_dir, 3)[0].keys()

    # second interruption at step 7 (call 2 of this attempt): the step-5 weights go, the step-7 ones come
    assert run(config, run_dir, latents, conditioner=SignalAtCall(2, signal.SIGUSR1)) == trainer.PREEMPTED_EXIT_CODE
    assert state(run_dir)["step"] == 7
    assert sorted(p.name for p in train_dir.glob("unet_step_*")) == ["unet_step_00000007.safetensors"]

    # weights of another step under the state's name: refused, by load_state and by the trainer
    weights = train_dir / "unet_step_00000007.safetensors"
    kept = tmp_path / "kept.safetensors"
    shutil.copy(weights, kept)
    shutil.copy(run_dir / "checkpoints" / "step_00000006.safetensors", weights)
    with pytest.raises(RuntimeError, match="at step 7 but train/unet_step_00000007.safetensors at 6"):
        load_state(run_dir)
    with pytest.raises(RuntimeError, match="at step 7"):
        run(config, run_dir, latents)
    shutil.copy(kept, weights)

    # what a kill in the middle of an atomic write leaves: hidden temporaries beside the real files
    (train_dir / ".state.12345.tmp.pt").write_bytes(b"half a pickle")
    (train_dir / ".unet_step_00000008.12345.tmp.safetensors").write_bytes(b"half a tensor")
    (run_dir / "checkpoints" / ".step_00000009.12345.tmp.safetensors").write_bytes(b"half a tensor")
    assert run(config, run_dir, latents) == 0
    assert_same_run(run_dir, reference_run)
    assert state(run_dir)["unet_file"] == "checkpoints/step_00000012.safetensors"
    assert summary(run_dir)["attempts"] == 3


def test_state_without_weights_is_refused_and_fresh_dir_has_no_state(tmp_path):
    assert load_state(tmp_path / "never-started") is None
    (tmp_path / "run" / "train").mkdir(parents=True)
    torch.save({"step": 3, "unet_file": "train/unet_step_00000003.safetensors"}, tmp_path / "run" / "train" / "state.pt")
    with pytest.raises(Exception, match="unet_step_00000003"):
        load_state(tmp_path / "run")
