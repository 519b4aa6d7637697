"""The MLPerf result log (``:::MLLOG {...}`` lines) of a training run, written by rank 0 only.

Every key SPEC section 5 lists is emitted here, with mlperf_logging's own constants for the key
names. The log survives preemption: a checkpoint records the log's size when it was taken, and
a resumed run truncates the log back to that size and appends. Lines written after the
checkpoint by the interrupted attempt are dropped and written again, so the log of a resumed
run reads like the log of a run that was never interrupted (one ``init_start`` ... ``run_stop``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from mlperf_logging.mllog import mllog
from mlperf_logging.mllog import constants

BENCHMARK = constants.STABLE_DIFFUSION
RULESET = "5.0.0"  # stable_diffusion is checked by rulesets 3.1.0-5.0.0 only; the checker's default is newer
QUALITY_CHECK = "Failed checks for aggregated_eval_accuracy"
MESSAGE_SEPARATOR = "-" * 30
STATUS_SUCCESS = constants.SUCCESS
STATUS_ABORTED = constants.ABORTED


class MlperfLogger:
    """mllog events to ``path`` (and stdout) on rank 0; every call is a no-op on other ranks."""

    def __init__(self, path: str | os.PathLike, enabled: bool, resume_offset: int | None = None):
        """Start a fresh log, or with ``resume_offset`` continue one cut back to that many bytes."""
        self.path = os.fspath(path)
        self.enabled = enabled
        self._handler: logging.FileHandler | None = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_offset is None:
            open(self.path, "w").close()
        else:
            with open(self.path, "r+b") as f:
                f.truncate(resume_offset)
        self._handler = logging.FileHandler(self.path, mode="a")
        logger = logging.getLogger(f"sdcore.mlperf.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(self._handler)
        logger.addHandler(logging.StreamHandler(sys.stdout))
        self._logger = logger
        # offset 3: report the trainer line that called a log_* phase method, not this module
        self._mllog = mllog.MLLogger(logger=logger, default_stack_offset=3)

    def offset(self) -> int:
        """Bytes written so far (flushed), to store in a checkpoint."""
        if not self.enabled:
            return 0
        self._handler.flush()
        return os.path.getsize(self.path)

    def close(self) -> None:
        if self.enabled:
            for handler in list(self._logger.handlers):
                handler.close()
                self._logger.removeHandler(handler)

    def event(self, key: str, value=None, metadata: dict | None = None) -> None:
        if self.enabled:
            self._mllog.event(key=key, value=value, metadata=metadata)

    def start(self, key: str, value=None, metadata: dict | None = None) -> None:
        if self.enabled:
            self._mllog.start(key=key, value=value, metadata=metadata)

    def end(self, key: str, value=None, metadata: dict | None = None) -> None:
        if self.enabled:
            self._mllog.end(key=key, value=value, metadata=metadata)

    # The phases of a run, in log order.

    def log_init_start(self, mlperf_cfg: dict) -> None:
        """cache_clear, the submission fields, init_start (the start of the untimed init phase)."""
        self.event(constants.CACHE_CLEAR, True)
        self.event(constants.SUBMISSION_BENCHMARK, BENCHMARK)
        self.event(constants.SUBMISSION_DIVISION, mlperf_cfg["division"])
        self.event(constants.SUBMISSION_ORG, mlperf_cfg["org"])
        self.event(constants.SUBMISSION_PLATFORM, mlperf_cfg["platform"])
        self.event(constants.SUBMISSION_POC_NAME, mlperf_cfg["poc_name"])
        self.event(constants.SUBMISSION_POC_EMAIL, mlperf_cfg["poc_email"])
        self.event(constants.SUBMISSION_STATUS, mlperf_cfg["status"])
        self.start(constants.INIT_START)

    def log_hyperparameters(self, *, seed: int, train_samples: int, eval_samples: int,
                            gradient_accumulation_steps: int, global_batch_size: int,
                            betas: tuple[float, float], eps: float, weight_decay: float,
                            learning_rate: float, warmup_steps: int) -> None:
        """The run's settings; ``learning_rate`` is the scaled rate (base rate x global batch)."""
        self.event(constants.SEED, seed)
        self.event(constants.TRAIN_SAMPLES, train_samples)
        self.event(constants.EVAL_SAMPLES, eval_samples)
        self.event(constants.GRADIENT_ACCUMULATION_STEPS, gradient_accumulation_steps)
        self.event(constants.GLOBAL_BATCH_SIZE, global_batch_size)
        self.event(constants.OPT_NAME, constants.ADAMW)
        self.event(constants.OPT_ADAMW_BETA_1, float(betas[0]))
        self.event(constants.OPT_ADAMW_BETA_2, float(betas[1]))
        self.event(constants.OPT_ADAMW_EPSILON, float(eps))
        self.event(constants.OPT_ADAMW_WEIGHT_DECAY, float(weight_decay))
        self.event(constants.OPT_BASE_LR, float(learning_rate))
        self.event(constants.OPT_LR_WARMUP_STEPS, warmup_steps)

    def log_run_start(self) -> None:
        self.end(constants.INIT_STOP)
        self.start(constants.RUN_START)

    def log_block_start(self, samples_seen: int) -> None:
        self.start(constants.BLOCK_START, metadata={constants.SAMPLES_COUNT: samples_seen})

    def log_block_stop(self, samples_seen: int) -> None:
        self.end(constants.BLOCK_STOP, metadata={constants.SAMPLES_COUNT: samples_seen})

    def log_eval_start(self, samples_seen: int) -> None:
        self.start(constants.EVAL_START, metadata={constants.SAMPLES_COUNT: samples_seen})

    def log_eval_result(self, samples_seen: int, fid: float, clip: float) -> None:
        """The two eval_accuracy lines of one checkpoint (the checker pairs them by samples_count)."""
        self.event(constants.EVAL_ACCURACY, float(fid),
                   metadata={"metric": "FID", constants.SAMPLES_COUNT: samples_seen})
        self.event(constants.EVAL_ACCURACY, float(clip),
                   metadata={"metric": "CLIP", constants.SAMPLES_COUNT: samples_seen})
        self.end(constants.EVAL_STOP, metadata={constants.SAMPLES_COUNT: samples_seen})

    def log_run_stop(self, samples_seen: int, success: bool) -> None:
        status = STATUS_SUCCESS if success else STATUS_ABORTED
        self.end(constants.RUN_STOP, metadata={constants.STATUS: status, constants.SAMPLES_COUNT: samples_seen})


@dataclass
class CheckResult:
    """Outcome of the MLPerf compliance checker on one log, in one division."""

    division: str
    passed: bool
    failures: list[str] = field(default_factory=list)  # the checker's failure messages
    output: str = ""                                    # everything the checker printed

    @property
    def only_quality_failed(self) -> bool:
        """True when the quality target (FID and CLIP at one checkpoint) is the one failing check."""
        return not self.passed and len(self.failures) == 1 and self.failures[0].startswith(QUALITY_CHECK)

    @property
    def verdict(self) -> str:
        if self.passed:
            return "PASS"
        return "FAIL (quality target not reached; every other check passed)" if self.only_quality_failed else "FAIL"


def check_log(log_path: str | os.PathLike, division: str) -> CheckResult:
    """Run ``python -m mlperf_logging.compliance_checker --usage training --ruleset 5.0.0`` on the log.

    The checker takes the division from the log's ``submission_division`` line, so the check runs
    on a copy whose division is set to ``division`` (the original is not modified).
    """
    if division not in ("open", "closed"):
        raise ValueError(f"division must be open or closed, got {division!r}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "mlperf.log")
        with open(log_path) as src, open(copy, "w") as dst:
            for line in src:
                dst.write(_with_division(line, division))
        checker_log = os.path.join(tmp, "checker.log")
        proc = subprocess.run(
            [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
             "--ruleset", RULESET, "--log_output", checker_log, copy],
            cwd=tmp, capture_output=True, text=True,
        )
        with open(checker_log) as f:
            checker_output = f.read()
    return CheckResult(division=division, passed=proc.returncode == 0,
                       failures=_failure_messages(checker_output), output=checker_output)


def _with_division(line: str, division: str) -> str:
    prefix = ":::MLLOG "
    if not line.startswith(prefix):
        return line
    record = json.loads(line[len(prefix):])
    if record.get("key") != constants.SUBMISSION_DIVISION:
        return line
    record["value"] = division
    return prefix + json.dumps(record) + "\n"


def _failure_messages(checker_output: str) -> list[str]:
    """The checker's messages: one WARNING record whose text is the messages joined by a dashed line."""
    match = re.search(r"^WARNING - (.*?)(?=^(?:INFO|ERROR) - |\Z)", checker_output, re.S | re.M)
    if match is None:
        return []
    return [m.strip() for m in match.group(1).split(MESSAGE_SEPARATOR) if m.strip()]
