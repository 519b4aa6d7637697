"""The MLPerf result log (``:::MLLOG {...}`` lines) of a training run, written by rank 0 only.

Every key SPEC section 5 lists is emitted here, with mlperf_logging's own constants for the key
names. The log survives preemption: a checkpoint records the log's size when it was taken, and
a resumed run truncates the log back to that size and appends. Lines written after the
checkpoint by the interrupted attempt are dropped and written again, so the log of a resumed
run reads like the log of a run that was never interrupted (one ``init_start`` ... ``run_stop``).

Offline evaluation (the rules let the checkpoints be scored after the clock has stopped):
:func:`merge_run_log` turns a training log that ends at its last ``block_stop`` into the final
result log, adding the scored checkpoints' eval lines and the ``run_stop`` stamped at the first
passing checkpoint. :func:`check_log` runs the official compliance checker on a log.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from mlperf_logging.mllog import constants, mllog

from sdcore.files import write_text

BENCHMARK = constants.STABLE_DIFFUSION
RULESET = "5.0.0"  # stable_diffusion is checked by rulesets 3.1.0-5.0.0 only; the checker's default is newer
QUALITY_CHECK = "Failed checks for aggregated_eval_accuracy"
MESSAGE_SEPARATOR = "-" * 30
STATUS_SUCCESS = constants.SUCCESS
STATUS_ABORTED = constants.ABORTED
FID_TARGET = 90.0   # the closed-division quality target: FID <= 90 and CLIP >= 0.15 at one checkpoint
CLIP_TARGET = 0.15
MLLOG_PREFIX = ":::MLLOG "
RESUME_KEY = "sdcore_resume"


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

    def log_resume(self, samples_seen: int, attempt: int, downtime_seconds: float) -> None:
        """A line saying the run continues after an interruption (not an MLPerf key; the checker accepts it):
        the wall-clock time between run_start and run_stop includes the downtime, which the rules do not
        let a result leave out, so a resumed run is honest about it here and in its summary."""
        self.event(RESUME_KEY, {"attempt": attempt, "downtime_seconds": round(downtime_seconds, 3)},
                   metadata={constants.SAMPLES_COUNT: samples_seen})


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


# ---- offline evaluation: merging the scores into the training log ---------------------------------

_EVAL_KEYS = (constants.EVAL_START, constants.EVAL_STOP, constants.EVAL_ACCURACY)


class MergeError(ValueError):
    """A training log or an evaluation set that cannot be merged into a result log (the message names the file)."""


@dataclass
class MergeResult:
    """What :func:`merge_run_log` wrote."""

    out_path: str
    status: str                       # "success" or "aborted"
    evaluated: list[int]              # samples counts of the checkpoints whose eval lines were written, in order
    skipped: list[int]                # checkpoints up to the run_stop point with no evaluation (not evaluated)
    passing_samples: int | None       # the first passing checkpoint, None when aborted
    run_start_ms: int
    run_stop_ms: int

    @property
    def run_minutes(self) -> float:
        """run_stop - run_start, the time to train the result summarizer reports."""
        return (self.run_stop_ms - self.run_start_ms) / 60000.0


@dataclass
class _LogLine:
    text: str                 # the line as read, newline included
    record: dict | None       # the parsed MLLOG record, None for any other line


def read_mllog(path: str | os.PathLike) -> list[_LogLine]:
    """Every line of a log, MLLOG lines parsed; a malformed MLLOG line is a :class:`MergeError` naming the file."""
    lines = []
    with open(path) as f:
        for number, text in enumerate(f, 1):
            record = None
            if text.startswith(MLLOG_PREFIX):
                try:
                    record = json.loads(text[len(MLLOG_PREFIX):])
                except json.JSONDecodeError as err:
                    raise MergeError(f"{path}: line {number} is not a valid MLLOG record: {err}") from None
            if not text.endswith("\n"):
                text += "\n"
            lines.append(_LogLine(text, record))
    return lines


def _normalized_evaluation(evaluation, train_log) -> dict:
    """One evaluation as {"step", "samples_seen", "fid", "clip", eval times}; a path is read as JSON."""
    source = "evaluation"
    if isinstance(evaluation, (str, os.PathLike)):
        source = os.fspath(evaluation)
        with open(evaluation) as f:
            evaluation = json.load(f)
    try:
        result = {"step": None if evaluation.get("step") is None else int(evaluation["step"]),
                  "samples_seen": int(evaluation["samples_seen"]),
                  "fid": float(evaluation["fid"]), "clip": float(evaluation["clip"])}
    except (KeyError, TypeError, ValueError) as err:
        raise MergeError(f"{train_log}: {source} {evaluation!r} lacks a usable samples_seen/fid/clip ({err})") from None
    if not (math.isfinite(result["fid"]) and math.isfinite(result["clip"])):
        raise MergeError(f"{train_log}: {source} at {result['samples_seen']} samples has a non-finite score "
                         f"(FID {result['fid']}, CLIP {result['clip']})")
    for key in ("eval_start_ms", "eval_stop_ms"):
        if evaluation.get(key) is not None:
            result[key] = int(evaluation[key])
    return result


def merge_run_log(train_log: str | os.PathLike, evaluations, out_path: str | os.PathLike,
                  fid_target: float = FID_TARGET, clip_target: float = CLIP_TARGET) -> MergeResult:
    """Write the final MLPerf log of an offline-evaluated run: the training log plus its checkpoints' scores.

    ``train_log`` is the log of a training job run with offline evaluation: it holds ``run_start`` and
    one ``block_stop`` per checkpoint (``samples_count`` = the samples seen at that checkpoint) and no
    eval line and no ``run_stop``. ``evaluations`` are per-checkpoint results (dicts, or paths of the
    JSON files ``workflow_scripts/evaluate.py`` writes) with ``samples_seen``, ``fid``, ``clip`` and
    ``step``; checkpoints without one were not evaluated (the rules allow skipping). The output is

    * the training log up to and including the ``block_stop`` of the first checkpoint, in samples
      order, whose FID <= ``fid_target`` and CLIP >= ``clip_target`` (the lines after it are left
      out: the timed run ended there); without a passing checkpoint, up to the last ``block_stop``;
    * per evaluated checkpoint up to that one, in samples order: ``eval_start``, ``eval_accuracy``
      FID, ``eval_accuracy`` CLIP (``{"metric", "samples_count"}`` metadata, which is how the
      compliance checker pairs the two metrics) and ``eval_stop``; evaluations after the first
      passing checkpoint are not written;
    * ``run_stop`` with ``status`` ``success`` (or ``aborted``) and ``samples_count``.

    Timestamps. The rules ("Quality measure" in training_rules.adoc) allow evaluating timestamped
    checkpoints after the clock has stopped and "update the clock stopped time to the timestamp of
    the first passing checkpoint", a timestamp that "may be any time after the last weight value
    included in the checkpoint is updated"; the Stable Diffusion appendix says "evaluation is done
    offline, the time is not counted towards the submission time". NVIDIA's submissions (v3.1
    report_end.py, v4.0/v4.1 infer_and_eval.py) and Google's maxdiffusion report_end.py stamp
    ``run_stop`` with the checkpoint's training-time timestamp, so the score (run_stop - run_start)
    excludes evaluation. Here the checkpoint timestamp is the ``time_ms`` of its ``block_stop``
    (the trainer logs it right after the checkpoint's last optimizer step, before saving), so:

    * ``run_stop``: the passing checkpoint's ``block_stop`` time; when aborted, the last
      ``block_stop``'s time (NVIDIA stamps an aborted run_stop with its last checkpoint's time too);
    * eval lines: the evaluation's own wall-clock times when it carries ``eval_start_ms`` /
      ``eval_stop_ms`` (NVIDIA and Google log eval_start/eval_stop at the real, later, evaluation
      time); otherwise the checkpoint's ``block_stop`` time (Google's report_end.py re-logs the
      passing checkpoint's eval_accuracy at the checkpoint time). The compliance checker, the RCP
      checker and the result summarizer read no eval timestamps.

    The file is written to a temporary name and moved into place. A training log that already
    holds ``run_stop`` or eval lines, lacks ``run_start`` or checkpoints, or an evaluation at a
    samples count with no ``block_stop`` (or two for one checkpoint) is a :class:`MergeError`
    naming the file. The compliance checker wants scores of at least 2 checkpoints
    (``AT_LEAST(2)`` aggregated_eval_accuracy): a run whose very first checkpoint passes yields a
    log it rejects, as there is no "one before" to score.
    """
    train_log, out_path = os.fspath(train_log), os.fspath(out_path)
    lines = read_mllog(train_log)
    run_start_ms, block_stops = _checkpoint_times(lines, train_log)
    scores = _scores_by_checkpoint(evaluations, block_stops, train_log)
    passing = next((s for s in sorted(scores)
                    if scores[s]["fid"] <= fid_target and scores[s]["clip"] >= clip_target), None)
    stop_samples = passing if passing is not None else max(block_stops)
    cut_index, stop_ms = block_stops[stop_samples]
    written = [s for s in sorted(scores) if s <= stop_samples]
    skipped = [s for s in sorted(block_stops) if s <= stop_samples and s not in scores]
    status = STATUS_SUCCESS if passing is not None else STATUS_ABORTED
    ending = _eval_and_stop_lines([(s, scores[s], block_stops[s][1]) for s in written], status, stop_samples, stop_ms)
    write_text(out_path, "".join(line.text for line in lines[:cut_index + 1]) + ending)
    return MergeResult(out_path=out_path, status=status, evaluated=written, skipped=skipped,
                       passing_samples=passing, run_start_ms=run_start_ms, run_stop_ms=stop_ms)


def _checkpoint_times(lines: list[_LogLine], train_log: str) -> tuple[int, dict[int, tuple[int, int]]]:
    """run_start's time and {samples_count: (line index, time_ms)} of every block_stop of a training log."""
    run_start_ms = None
    block_stops: dict[int, tuple[int, int]] = {}
    for index, line in enumerate(lines):
        record = line.record
        if record is None:
            continue
        key = record.get("key")
        if key == constants.RUN_STOP or key in _EVAL_KEYS:
            raise MergeError(f"{train_log}: not a training log of offline evaluation: it already holds "
                             f"{key!r} (line {index + 1})")
        if key == constants.RUN_START:
            if run_start_ms is not None:
                raise MergeError(f"{train_log}: more than one run_start")
            run_start_ms = int(record["time_ms"])
        elif key == constants.BLOCK_STOP:
            samples = (record.get("metadata") or {}).get(constants.SAMPLES_COUNT)
            if samples is None:
                raise MergeError(f"{train_log}: block_stop without samples_count (line {index + 1})")
            if int(samples) in block_stops:
                raise MergeError(f"{train_log}: two block_stop lines at samples_count {samples}")
            block_stops[int(samples)] = (index, int(record["time_ms"]))
    if run_start_ms is None:
        raise MergeError(f"{train_log}: no run_start")
    if not block_stops:
        raise MergeError(f"{train_log}: no block_stop (no checkpoint)")
    return run_start_ms, block_stops


def _scores_by_checkpoint(evaluations, block_stops: dict, train_log: str) -> dict[int, dict]:
    scores: dict[int, dict] = {}
    for evaluation in evaluations:
        ev = _normalized_evaluation(evaluation, train_log)
        samples = ev["samples_seen"]
        if samples not in block_stops:
            raise MergeError(f"{train_log}: evaluation at {samples} samples, but the log has no block_stop "
                             f"there (checkpoints at {sorted(block_stops)})")
        if samples in scores:
            raise MergeError(f"{train_log}: two evaluations at {samples} samples")
        scores[samples] = ev
    return scores


def _eval_and_stop_lines(evaluated: list[tuple[int, dict, int]], status: str, stop_samples: int, stop_ms: int) -> str:
    """The eval_start / eval_accuracy (FID, CLIP) / eval_stop lines of each (samples, scores, checkpoint
    time) and the run_stop line, as mllog writes them."""
    buffer = io.StringIO()
    logger = logging.getLogger("sdcore.mlperf.merge")   # a private logger writing to ``buffer`` only
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(buffer)
    logger.addHandler(handler)
    try:
        writer = mllog.MLLogger(logger=logger, default_stack_offset=1)
        for samples, ev, checkpoint_ms in evaluated:
            start_ms = ev.get("eval_start_ms", checkpoint_ms)
            end_ms = ev.get("eval_stop_ms", start_ms)
            meta = {constants.SAMPLES_COUNT: samples}
            writer.start(key=constants.EVAL_START, metadata=dict(meta), time_ms=start_ms)
            writer.event(key=constants.EVAL_ACCURACY, value=ev["fid"], metadata={"metric": "FID", **meta},
                         time_ms=end_ms)
            writer.event(key=constants.EVAL_ACCURACY, value=ev["clip"], metadata={"metric": "CLIP", **meta},
                         time_ms=end_ms)
            writer.end(key=constants.EVAL_STOP, metadata=dict(meta), time_ms=end_ms)
        writer.end(key=constants.RUN_STOP, metadata={constants.STATUS: status, constants.SAMPLES_COUNT: stop_samples},
                   time_ms=stop_ms)
    finally:
        logger.removeHandler(handler)
        handler.close()
    return buffer.getvalue()
