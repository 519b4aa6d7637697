"""Exact resumption: a run interrupted (crash, SIGTERM) and resumed ends bitwise equal to one that never stopped.

CPU, one thread, ``torch.use_deterministic_algorithms(True)``, real webdataset shards (so the data
stream's fast-forward inside a block is exercised).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sdcore import train
from train_fixtures import HashedCaptionConditioner, ScriptedEvaluator, tiny_config, write_latent_shards

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# 12 steps of 4 samples, a checkpoint every 3 steps (4 evaluations), never reaching the target
SETTINGS = dict(checkpoint_every_samples=12, max_samples=48)


@pytest.fixture(autouse=True)
def deterministic_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture
def config(tmp_path):
    config = tiny_config(str(tmp_path), **SETTINGS)
    write_latent_shards(config)
    return config


def run(config, run_dir, evaluator=None, conditioner=None):
    return train.main(config, str(run_dir), device="cpu", make_data_source=train.latent_source,
                      make_conditioner=lambda c, env: conditioner or HashedCaptionConditioner(),
                      make_evaluator=lambda c, env: evaluator or ScriptedEvaluator([(300, 0.01)]))


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "step_00000012.pt"), weights_only=True)["unet"]


def assert_same_run(run_dir, reference_dir):
    weights, expected = final_weights(run_dir), final_weights(reference_dir)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected), "weights differ"
    with open(os.path.join(run_dir, "loss.csv")) as a, open(os.path.join(reference_dir, "loss.csv")) as b:
        assert a.read() == b.read()
    keys, reference_keys = mlperf_keys(run_dir), mlperf_keys(reference_dir)
    assert keys == reference_keys  # one init_start ... run_stop, nothing duplicated by the restart
    assert keys.count("run_start") == 1 and keys.count("eval_accuracy") == 8


def mlperf_keys(run_dir):
    with open(os.path.join(run_dir, "mlperf.log")) as f:
        return [json.loads(line.split(" ", 1)[1])["key"] for line in f if line.startswith(":::MLLOG")]


@pytest.fixture
def reference_run(config, tmp_path):
    run_dir = tmp_path / "uninterrupted"
    assert run(config, run_dir) == 0
    return run_dir


class SignalAtCall(HashedCaptionConditioner):
    """Sends this process a signal during the n-th conditioning call (i.e. in the middle of a step)."""

    def __init__(self, n, signum):
        self.n, self.signum, self.count = n, signum, 0

    def __call__(self, captions, device):
        self.count += 1
        if self.count == self.n:
            os.kill(os.getpid(), self.signum)
        return super().__call__(captions, device)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_block_checkpoints_exits_and_resumes_bitwise(config, tmp_path, reference_run, signum):
    run_dir = tmp_path / "preempted"
    assert run(config, run_dir, conditioner=SignalAtCall(5, signum)) == train.PREEMPTED_EXIT_CODE
    state = torch.load(run_dir / "resume.pt", weights_only=True)
    assert state["step"] == 5 and not state["pending_eval"]  # the step in flight finished, then stop
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000003.pt"]
    assert not (run_dir / "summary.json").exists()
    assert run(config, run_dir) == 0
    assert_same_run(run_dir, reference_run)


class CrashingEvaluator(ScriptedEvaluator):
    def evaluate(self, unet, samples_seen):
        if len(self.calls) == 1:
            raise RuntimeError("node lost during evaluation")
        return super().evaluate(unet, samples_seen)


def test_crash_after_checkpoint_resumes_with_the_evaluation_and_bitwise(config, tmp_path, reference_run):
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="node lost"):
        run(config, run_dir, evaluator=CrashingEvaluator([(300, 0.01)]))
    assert torch.load(run_dir / "resume.pt", weights_only=True)["pending_eval"]
    evaluator = ScriptedEvaluator([(300, 0.01)])
    assert run(config, run_dir, evaluator=evaluator) == 0
    assert evaluator.calls == [24, 36, 48]  # the checkpoint at 24 samples is evaluated after the restart
    assert_same_run(run_dir, reference_run)


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_retry(config, tmp_path):
    """A real SIGTERM from outside: complete checkpoint, exit code 75, the retried command resumes."""
    config["train"].update(max_samples=4 * 40, checkpoint_every_samples=4 * 10)  # long enough to be signalled mid-run
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))

    def command(run_dir):
        return [sys.executable, os.path.join(TESTS_DIR, "train_fixtures.py"), "--config", str(config_path),
                "--run-dir", str(run_dir), "--source", "shards"]

    env = dict(os.environ, PYTHONPATH=TESTS_DIR)
    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loss_csv = run_dir / "loss.csv"
    deadline = time.monotonic() + 120
    while not (loss_csv.exists() and len(loss_csv.read_text().splitlines()) > 8):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.PREEMPTED_EXIT_CODE, stderr
    assert "received SIGTERM" in stderr
    stopped_at = torch.load(run_dir / "resume.pt", weights_only=True)["step"]
    assert 8 <= stopped_at < 40

    retry = subprocess.run(command(run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr
    assert f"resumed from {run_dir / 'resume.pt'} at step {stopped_at}" in retry.stderr

    reference_dir = tmp_path / "uninterrupted"  # in this process: same settings as the script's
    assert run(config, reference_dir) == 0
    last = "step_00000040.pt"
    weights = torch.load(run_dir / "checkpoints" / last, weights_only=True)["unet"]
    expected = torch.load(reference_dir / "checkpoints" / last, weights_only=True)["unet"]
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert (run_dir / "loss.csv").read_text() == (reference_dir / "loss.csv").read_text()
