"""An MLPerf Training submission package of stable_diffusion runs, and the official checkers' verdicts on it.

Layout (what ``mlperf_logging.package_checker`` and ``mlperf_logging.result_summarizer`` read for
ruleset 5.0.0; the package folder is the submitter's folder)::

    <package>/systems/<system>.json                            system description, required fields below
    <package>/results/<system>/stable_diffusion/result_<i>.txt the merged MLPerf log of run i, i = 0..N-1

Nothing else is read by the checkers: ``benchmarks/`` (the code) is required by the submission
rules but no checker looks into it, so none is written here. The package checker wants exactly 10
result files for stable_diffusion (``benchmark_meta``), a valid system description (every field of
``SYSTEM_DESC_FIELDS`` present, ``status`` one of ``AVAILABILITY``), each log passing the
compliance checker (one failing file is tolerated, "olympic scoring"), and, in the closed division
only (taken from the system description), unique seeds and the RCP check. In the closed division
the RCP check and the result summarizer may write ``scaling.json`` next to the results (the score
normalization for runs converging faster than the RCP mean), as the official tools do.

The evaluation selection rule of the benchmark (training_rules.adoc, "Benchmark Specific Rules"):
scores of all checkpoints up to the first passing one for 1 of the 10 runs, of the first passing
one and the one before it for the other 9; :func:`plan_evaluations` says which evaluations a run
still needs given the scores known so far.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sdcore.files import write_text
from sdcore.mlperf_log import CLIP_TARGET, FID_TARGET, MLLOG_PREFIX

BENCHMARK = "stable_diffusion"
RULESET = "5.0.0"
USAGE = "training"
RESULT_FILES = 10   # mlperf_logging.benchmark_meta: stable_diffusion needs exactly 10 result files
# mlperf_logging.system_desc_checker: every one must be present (values may be empty strings).
SYSTEM_DESC_FIELDS = (
    "submitter", "division", "status", "system_name", "number_of_nodes", "host_processors_per_node",
    "host_processor_model_name", "host_processor_core_count", "host_processor_vcpu_count",
    "host_processor_frequency", "host_processor_caches", "host_processor_interconnect",
    "host_memory_capacity", "host_storage_type", "host_storage_capacity", "host_networking",
    "host_networking_topology", "host_memory_configuration", "accelerators_per_node",
    "accelerator_model_name", "accelerator_host_interconnect", "accelerator_frequency",
    "accelerator_on-chip_memories", "accelerator_memory_configuration", "accelerator_memory_capacity",
    "accelerator_interconnect", "accelerator_interconnect_topology", "cooling", "hw_notes", "framework",
    "other_software_stack", "operating_system", "sw_notes",
)
# The result summarizer computes int(number_of_nodes) * int(host_processors_per_node / accelerators_per_node).
NUMERIC_DEFAULTS = {"number_of_nodes": "1", "host_processors_per_node": "1", "accelerators_per_node": "0"}
AVAILABILITY = ("Available on-premise", "Available cloud", "Research, Development, or Internal (RDI)", "Preview")
PACKAGE_OK = "PACKAGE CHECKER FOUND NO ERRORS, SUCCESS !"
PACKAGE_ERRORS = "PACKAGE CHECKER FOUND ERRORS"

# ---- which checkpoints a run must have scored ------------------------------------------------------

MODE_UNTIL_PASS = "until_first_pass"   # 1 of the 10 runs: every checkpoint up to the first passing one
MODE_LAST_TWO = "last_two"             # the other 9: the first passing checkpoint and the one before it
MODE_ALL = "all"                       # every checkpoint (when configured, e.g. to plot a whole run)
MODES = (MODE_UNTIL_PASS, MODE_LAST_TWO, MODE_ALL)


def evaluation_mode(run_index: int, evaluate_all: bool = False) -> str:
    """Run 0 scores every checkpoint up to the first passing one, the others the last two; or all if configured."""
    if evaluate_all:
        return MODE_ALL
    return MODE_UNTIL_PASS if run_index == 0 else MODE_LAST_TWO


@dataclass
class EvaluationPlan:
    """What a run still has to evaluate, given the scores known so far (samples counts of checkpoints)."""

    mode: str
    needed: list[int]          # checkpoints to evaluate next (all may run at once), in samples order
    required: list[int]        # the checkpoints whose scores the final log must carry, as far as known
    first_pass: int | None     # the first passing checkpoint, once it is determined
    complete: bool             # nothing more to evaluate: first_pass determined, or no checkpoint left to try

    @property
    def status(self) -> str:
        if not self.complete:
            return "pending"
        return "success" if self.first_pass is not None else "aborted"


def _score_map(scores) -> dict[int, tuple[float, float]]:
    """{samples: (fid, clip)} from a mapping samples -> {"fid", "clip"} | (fid, clip), or evaluation dicts."""
    result = {}
    items = scores.items() if isinstance(scores, Mapping) else ((e["samples_seen"], e) for e in scores)
    for samples, value in items:
        if isinstance(value, Mapping):
            fid, clip = value["fid"], value["clip"]
        else:
            fid, clip = value
        result[int(samples)] = (float(fid), float(clip))
    return result


def plan_evaluations(checkpoints: Iterable[int], scores, mode: str, fid_target: float = FID_TARGET,
                     clip_target: float = CLIP_TARGET, start: int | None = None) -> EvaluationPlan:
    """Which checkpoints (samples counts) a run must still evaluate; a pure function of what is known.

    ``checkpoints``: the samples counts of the run's checkpoints; ``scores``: the known results, as a
    mapping samples -> {"fid", "clip"} (or (fid, clip)) or a list of evaluation dicts with
    ``samples_seen``. A checkpoint passes when FID <= ``fid_target`` and CLIP >= ``clip_target``.

    * ``until_first_pass`` (run 0): every checkpoint before the earliest known passing one must be
      scored (all of them are ``needed`` at once); the first passing checkpoint is determined when
      a passing one has only failing checkpoints before it. No pass and nothing unscored: aborted.
    * ``last_two`` (the other runs): checkpoints may be skipped. With no passing score known, the
      next checkpoint to try is the earliest unscored one at or after ``start`` (default: the
      first checkpoint), a forward search like NVIDIA's ``INFER_START_STEP``; when a checkpoint
      passes, the one before it must be scored too (if it passes as well, the search moves back). Done when the earliest passing checkpoint's
      predecessor is scored and fails (or it has none: the run's first checkpoint).
    * ``all``: every unscored checkpoint is needed; first_pass as in ``until_first_pass``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ckpts = sorted({int(c) for c in checkpoints})
    if not ckpts:
        raise ValueError("no checkpoints")
    known = _score_map(scores)
    unknown = sorted(set(known) - set(ckpts))
    if unknown:
        raise ValueError(f"scores at samples counts that are no checkpoint: {unknown}")

    def passes(samples: int) -> bool:
        fid, clip = known[samples]
        return fid <= fid_target and clip >= clip_target

    passing = [c for c in ckpts if c in known and passes(c)]
    earliest_pass = passing[0] if passing else None
    unscored = [c for c in ckpts if c not in known]

    if mode in (MODE_UNTIL_PASS, MODE_ALL):
        before = [c for c in unscored if earliest_pass is None or c < earliest_pass]
        first_pass = earliest_pass if earliest_pass is not None and not before else None
        needed = unscored if mode == MODE_ALL else before
        limit = first_pass if first_pass is not None else earliest_pass if earliest_pass is not None else ckpts[-1]
        required = [c for c in ckpts if c <= limit]
        complete = not needed if mode == MODE_ALL else not before
        return EvaluationPlan(mode, needed, required, first_pass, complete)

    # MODE_LAST_TWO
    if earliest_pass is not None:
        index = ckpts.index(earliest_pass)
        if index == 0:
            return EvaluationPlan(mode, [], [earliest_pass], earliest_pass, True)
        before = ckpts[index - 1]
        if before not in known:
            return EvaluationPlan(mode, [before], [before, earliest_pass], None, False)
        return EvaluationPlan(mode, [], [before, earliest_pass], earliest_pass, True)
    first = ckpts[0] if start is None else int(start)
    window = ckpts[bisect.bisect_left(ckpts, first):]
    needed = [c for c in window if c not in known][:1]
    return EvaluationPlan(mode, needed, [], None, not needed)


# ---- the package -------------------------------------------------------------------------------------

@dataclass
class SubmissionConfig:
    """Who submits what on which system; ``system`` holds the other systems/<system>.json fields."""

    submitter: str
    system_name: str
    division: str                               # "closed" or "open"
    status: str = "Available on-premise"        # the system's availability, one of AVAILABILITY
    system: dict = field(default_factory=dict)  # the remaining fields (see SYSTEM_DESC_FIELDS)

    def __post_init__(self):
        if self.division not in ("closed", "open"):
            raise ValueError(f"division must be closed or open, got {self.division!r}")
        if self.status not in AVAILABILITY:
            raise ValueError(f"status must be one of {AVAILABILITY}, got {self.status!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.system_name):
            raise ValueError(f"system_name {self.system_name!r} is used as a file name: letters, digits, _.+- only")

    @classmethod
    def from_dict(cls, d: dict) -> SubmissionConfig:
        """From {submitter, system_name, division, status, system}; system_name and status may also
        be given inside ``system`` (as in the system JSON itself)."""
        known = {"submitter", "system_name", "division", "status", "system"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown submission config keys: {sorted(extra)}")
        d = dict(d)
        system = dict(d.get("system") or {})
        for name in ("system_name", "status", "submitter", "division"):
            if name not in d and name in system:
                d[name] = system[name]
        d["system"] = system
        return cls(**d)


@dataclass
class SubmissionLayout:
    package_dir: str
    system_json: str
    benchmark_dir: str
    result_files: list[str]
    defaulted_fields: list[str]   # system description fields filled with a default ("" or NUMERIC_DEFAULTS)


def _log_values(path: str) -> dict:
    values = {}
    with open(path) as f:
        for line in f:
            if line.startswith(MLLOG_PREFIX):
                record = json.loads(line[len(MLLOG_PREFIX):])
                values.setdefault(record["key"], record.get("value"))
    return values


def system_description(config: SubmissionConfig) -> tuple[dict, list[str]]:
    """The systems/<system>.json content, and which fields got a default value.

    Every value is a string, as in the published submissions: the system description checker joins
    some of them with ``",".join`` and crashes on a number (YAML reads ``number_of_nodes: 1`` as one).
    """
    desc, defaulted = {}, []
    for name in SYSTEM_DESC_FIELDS:
        if name in config.system:
            desc[name] = str(config.system[name])
        else:
            desc[name] = NUMERIC_DEFAULTS.get(name, "")
            defaulted.append(name)
    for name in config.system:
        desc.setdefault(name, str(config.system[name]))
    for name, value in (("submitter", config.submitter), ("division", config.division),
                        ("status", config.status), ("system_name", config.system_name)):
        if name in config.system and config.system[name] != value:
            raise ValueError(f"system field {name}={config.system[name]!r} contradicts the config ({value!r})")
        desc[name] = value
        if name in defaulted:
            defaulted.remove(name)
    return desc, defaulted


def layout_submission(run_logs: Iterable[str | os.PathLike], package_dir: str | os.PathLike,
                      config: SubmissionConfig) -> SubmissionLayout:
    """Copy the merged run logs to results/<system>/stable_diffusion/result_<i>.txt and write the system JSON.

    The benchmark folder is rebuilt from scratch (stale result files or scaling.json go). Each log
    must be a finished stable_diffusion log (holding run_stop) of the configured division; a log
    that is not is a ValueError naming it.
    """
    run_logs = [os.fspath(p) for p in run_logs]
    if not run_logs:
        raise ValueError("no run logs")
    for path in run_logs:
        values = _log_values(path)
        if values.get("submission_benchmark") != BENCHMARK:
            raise ValueError(f"{path}: submission_benchmark is {values.get('submission_benchmark')!r}, not {BENCHMARK}")
        if values.get("submission_division") != config.division:
            raise ValueError(f"{path}: submission_division is {values.get('submission_division')!r}, "
                             f"the submission is {config.division}")
        if "run_stop" not in values:
            raise ValueError(f"{path}: no run_stop (merge the evaluations into the training log first)")
    package_dir = os.fspath(package_dir)
    desc, defaulted = system_description(config)
    systems = os.path.join(package_dir, "systems")
    benchmark_dir = os.path.join(package_dir, "results", config.system_name, BENCHMARK)
    os.makedirs(systems, exist_ok=True)
    if os.path.isdir(benchmark_dir):
        shutil.rmtree(benchmark_dir)
    os.makedirs(benchmark_dir)
    system_json = os.path.join(systems, f"{config.system_name}.json")
    write_text(system_json, json.dumps(desc, indent=2) + "\n")
    result_files = []
    for i, path in enumerate(run_logs):
        dest = os.path.join(benchmark_dir, f"result_{i}.txt")
        shutil.copyfile(path, dest)
        result_files.append(dest)
    return SubmissionLayout(package_dir, system_json, benchmark_dir, result_files, defaulted)


# ---- the official checkers -------------------------------------------------------------------------

@dataclass
class CheckerRun:
    """One official tool run as a subprocess: its command, its whole output, and the verdict read from it."""

    name: str
    command: list[str]
    returncode: int
    output: str                  # stdout, stderr and the tool's own log file
    passed: bool | None          # None: the tool reports no pass/fail (the summarizer)
    verdict: str
    messages: list[str] = field(default_factory=list)   # the ERROR lines (or the key lines)
    data: dict = field(default_factory=dict)           # parsed results (summarizer rows)

    def report(self) -> str:
        lines = [f"== {self.name}: {self.verdict}", "$ " + " ".join(self.command)]
        lines += [f"  ! {m}" for m in self.messages]
        lines.append(self.output.rstrip())
        return "\n".join(lines) + "\n"


def _run(command: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _read(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def _combined(proc: subprocess.CompletedProcess, log_text: str) -> str:
    parts = []
    if proc.stdout.strip():
        parts.append("--- stdout ---\n" + proc.stdout.rstrip())
    if proc.stderr.strip() and proc.stderr.strip() != log_text.strip():   # the tools log to both
        parts.append("--- stderr ---\n" + proc.stderr.rstrip())
    if log_text.strip():
        parts.append("--- log file ---\n" + log_text.rstrip())
    return "\n".join(parts) + "\n"


def _fresh(path: str) -> str:
    if os.path.exists(path):
        os.unlink(path)   # the tools' logging.basicConfig appends to an existing file
    return path


def run_package_checker(package_dir: str, reports_dir: str, ruleset: str = RULESET) -> CheckerRun:
    """``python -m mlperf_logging.package_checker PACKAGE training RULESET`` (it always exits 0: the verdict is in its log)."""
    log = _fresh(os.path.join(reports_dir, "package_checker.log"))
    command = [sys.executable, "-m", "mlperf_logging.package_checker", os.path.abspath(package_dir), USAGE, ruleset,
               "--log_output", log]
    proc = _run(command, reports_dir)
    text = _read(log)
    errors = [line[len("ERROR - "):].strip() for line in text.splitlines() if line.startswith("ERROR - ")]
    if PACKAGE_OK in text:
        passed, verdict = True, "PASS"
    elif PACKAGE_ERRORS in text:
        passed, verdict = False, f"FAIL ({len(errors)} error lines)"
    else:
        passed, verdict = False, f"CRASHED (exit {proc.returncode})"
        errors += [line for line in proc.stderr.strip().splitlines()[-3:]]
    return CheckerRun("package_checker", command, proc.returncode, _combined(proc, text), passed, verdict, errors)


def run_rcp_checker(benchmark_dir: str, reports_dir: str, ruleset: str = RULESET) -> CheckerRun:
    """``python -m mlperf_logging.rcp_checker RESULTS_DIR --rcp_usage training --rcp_version RULESET`` (pruned RCPs)."""
    log = _fresh(os.path.join(reports_dir, "rcp_checker.log"))
    command = [sys.executable, "-m", "mlperf_logging.rcp_checker", os.path.abspath(benchmark_dir),
               "--rcp_usage", USAGE, "--rcp_version", ruleset, "--log_output", log]
    proc = _run(command, reports_dir)
    text = _read(log)
    result = re.search(r"^(?:INFO|ERROR) - (.*?), RCP test (PASSED|FAILED)", text, re.MULTILINE)
    keys = [line.split(" - ", 1)[1].strip() for line in text.splitlines()
            if re.match(r"(INFO|WARNING|ERROR) - +(RCP Record|Submission mean epochs|Run incomplete|Submission mean)",
                        line)]
    if result is None:
        return CheckerRun("rcp_checker", command, proc.returncode, _combined(proc, text), False,
                          f"CRASHED (exit {proc.returncode})", proc.stderr.strip().splitlines()[-3:])
    reason, outcome = result.group(1), result.group(2)
    passed = outcome == "PASSED" and proc.returncode == 0
    return CheckerRun("rcp_checker", command, proc.returncode, _combined(proc, text), passed,
                      f"{'PASS' if passed else 'FAIL'} ({reason})", [reason] + keys, {"reason": reason})


def run_result_summarizer(package_dir: str, reports_dir: str, ruleset: str = RULESET) -> CheckerRun:
    """``python -m mlperf_logging.result_summarizer PACKAGE training RULESET --csv REPORTS/summary.csv``.

    It writes summary.csv/.json and summary_detailed.csv/.json; the row of each system is returned in
    ``data["rows"]`` (``stable_diffusion`` = the score in minutes, None when no score could be
    computed) and ``data["detailed"]`` (time_to_train, samples_to_converge, RCP, scaling factor).
    """
    csv = os.path.join(reports_dir, "summary.csv")
    outputs = [csv, csv.replace(".csv", ".json"), csv.replace(".csv", "_detailed.csv"),
               csv.replace(".csv", "_detailed.json")]
    for path in outputs:
        _fresh(path)
    command = [sys.executable, "-m", "mlperf_logging.result_summarizer", os.path.abspath(package_dir), USAGE, ruleset,
               "--csv", csv]
    proc = _run(command, reports_dir)

    def records(path):
        text = _read(path)
        return json.loads(text) if text.strip() else []

    rows, detailed = records(outputs[1]), records(outputs[3])
    notes = [line.strip() for line in proc.stdout.splitlines()
             if re.match(r"\s*(NOTICE|ERROR|CRITICAL|\*\* CRITICAL|WARNING)", line) or " in /" in line]
    data = {"rows": rows, "detailed": detailed}
    if proc.returncode != 0:
        return CheckerRun("result_summarizer", command, proc.returncode, _combined(proc, ""), False,
                          f"CRASHED (exit {proc.returncode})", notes + proc.stderr.strip().splitlines()[-3:], data)
    parts = []
    for row in rows:
        score = row.get(BENCHMARK)
        if isinstance(score, (int, float)) and not math.isnan(score):
            parts.append(f"{row.get('system')}: {score:.6g} min")
        else:
            parts.append(f"{row.get('system')}: no score")
    for row in detailed:
        extra = [f"{name} {row.get(f'{BENCHMARK}:{name}')}" for name in ("samples_to_converge", "RCP")
                 if row.get(f"{BENCHMARK}:{name}") not in (None, "")]
        if extra:
            parts.append(", ".join(extra))
    verdict = "; ".join(parts) if parts else "no rows"
    return CheckerRun("result_summarizer", command, proc.returncode, _combined(proc, ""), None, verdict, notes, data)


@dataclass
class SubmissionCheck:
    layout: SubmissionLayout | None
    package: CheckerRun
    rcp: CheckerRun
    summary: CheckerRun
    reports_dir: str

    @property
    def runs(self) -> list[CheckerRun]:
        return [self.package, self.rcp, self.summary]

    def report(self) -> str:
        head = [f"package: {self.layout.package_dir if self.layout else '?'}"]
        if self.layout is not None:
            head.append(f"result files: {len(self.layout.result_files)} (the package checker wants {RESULT_FILES})")
            if self.layout.defaulted_fields:
                head.append("system fields defaulted: " + ", ".join(self.layout.defaulted_fields))
        return "\n".join(head) + "\n\n" + "\n".join(run.report() for run in self.runs)


def check_submission(package_dir: str | os.PathLike, system_name: str, reports_dir: str | os.PathLike,
                     ruleset: str = RULESET, layout: SubmissionLayout | None = None) -> SubmissionCheck:
    """Run the package checker, the RCP checker (on results/<system>/stable_diffusion) and the result summarizer.

    Failing verdicts (e.g. the RCP checker's "Insufficient convergence" for runs that did not reach
    the target) are results, returned and reported, not exceptions. Each tool's output goes to
    ``reports_dir`` (package_checker.log, rcp_checker.log, summary*.csv/json, report.txt).
    """
    # absolute: the tools run with the reports folder as their working directory
    package_dir, reports_dir = os.path.abspath(package_dir), os.path.abspath(reports_dir)
    os.makedirs(reports_dir, exist_ok=True)
    benchmark_dir = os.path.join(package_dir, "results", system_name, BENCHMARK)
    check = SubmissionCheck(layout, run_package_checker(package_dir, reports_dir, ruleset),
                            run_rcp_checker(benchmark_dir, reports_dir, ruleset),
                            run_result_summarizer(package_dir, reports_dir, ruleset), reports_dir)
    write_text(os.path.join(reports_dir, "report.txt"), check.report())
    return check


def build_submission(run_logs: Iterable[str | os.PathLike], package_dir: str | os.PathLike,
                     config: SubmissionConfig | dict, reports_dir: str | os.PathLike | None = None,
                     ruleset: str = RULESET) -> SubmissionCheck:
    """:func:`layout_submission` then :func:`check_submission`; reports default to ``<package_dir>_checks``."""
    if isinstance(config, dict):
        config = SubmissionConfig.from_dict(config)
    package_dir = os.fspath(package_dir)
    if reports_dir is None:
        reports_dir = os.path.abspath(package_dir).rstrip(os.sep) + "_checks"
    layout = layout_submission(run_logs, package_dir, config)
    return check_submission(package_dir, config.system_name, reports_dir, ruleset, layout)
