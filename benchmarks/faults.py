#!/usr/bin/env python3
"""Fault-injection campaign: kill the demo anywhere, corrupt its inputs, fill its disk, run it twice
at once, and check that nothing is lost.

    python benchmarks/faults.py                    # the full campaign (about an hour on 2 cores)
    python benchmarks/faults.py --short            # the CI smoke campaign (minutes)
    python benchmarks/faults.py --slurm            # the SLURM faults (.ci/slurm/run_demo_on_slurm.sh)
    options: --seed N (the draws; printed), --table FILE.md, --data-from DIR (reuse the demo data a
             run of the demo left in DIR/demo), --workdir DIR --keep (keep the trial directories),
             --only NAME... (fault families: kill, write, hung, disk, corrupt, twice)

Everything runs at demo scale through the real workflow (``snakemake --profile profiles/demo -d
<trial dir>``: 2 gloo ranks under torchrun, offline evaluation jobs, the MLPerf log and its check),
each trial in a copy of one prepared data directory under a temporary directory. The campaign keeps
the demo config but sets its own training, for the reference as for the trials: batch 4 per rank and
1,024 samples (checkpoints at 512 and 1,024) and 24 prompts, or with ``--short`` 256 samples
(checkpoints at 128 and 256) and 8 prompts. First the harness makes an uninterrupted reference run; every trial
must end bitwise equal to it: the UNet weights of every checkpoint, the optimiser, LR schedule,
scaler and RNG states in the final ``train/state.pt``, ``train/loss.csv`` byte for byte, the
evaluation scores, and an MLPerf log that passes the open-division checker with the reference's
sequence of keys (``sdcore_resume`` lines aside).

The faults (the table's rows):

kill        SIGKILL at seeded random moments (training steps; inside the atomic writes of
            checkpoints, state and summary; evaluation jobs) of rank 0, rank 1, the whole job
            (torchrun and its ranks) or torchrun alone; a quarter of the training draws kill the
            rerun again. The workflow is then run again. Checked after each kill: every checkpoint
            on disk loads and equals the reference's, the state loads, no process of the job
            outlives it (a rank whose peer died exits within the collective timeout + torchrun's
            grace), and after the rerun no temporary of a killed write is left in train/ or
            checkpoints/.
write       the process writing a checkpoint, ``state.pt`` or ``summary.json`` stopped inside
            ``sdcore.files.atomic_path`` (a hook in this harness' sitecustomize: the temporary
            file complete, cut in half, or already renamed) and then killed: the previous file
            stays loadable, the half-written temporary is never taken for the file.
hung        one rank stopped (SIGSTOP) mid-training: its peer must give up after the collective
            timeout (``SDCORE_COLLECTIVE_TIMEOUT_MINUTES``, 0.5 here) and the job end, not hang.
disk        a small tmpfs as the checkpoint folder, the state folder, a part's latent shard
            folder and the COCO folder (FID statistics): the job fails with an error naming the
            file; the files before it are intact; once the tmpfs is enlarged the rerun succeeds
            (and, for data, rebuilds the same bytes). The tmpfs is always unmounted.
corrupt     a caption that is not UTF-8, moments of the wrong shape, a shard cut in half while
            training reads it: training stops before it trains a step with a skip, naming the
            shard (``train.max_bad_samples`` 0); with the shard mended the rerun resumes bitwise.
            And with a limit (2 bad samples, train.max_bad_samples 2, ranks launched directly):
            the samples are skipped, counted in the summary, and a run preempted and resumed
            equals the uninterrupted one bitwise.
twice       a second ``snakemake`` in the same directory while the first trains: Snakemake's lock
            message, nothing written by it; and a second trainer started by hand in the run
            directory: refused by the trainer's run lock before it writes anything.

Each trial's outcome: survived (the rerun ended equal to the reference and every check held),
data lost (a file that was complete is gone or differs, or the result differs from the reference).
The seed of the draws is printed; the same seed draws the same faults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SNAKEFILE = REPO / "Snakefile"
PROFILE = REPO / "profiles" / "demo"
RUN_REL = Path("demo/results/demo")
TRAIN_LOG_REL = Path("demo/logs/train/demo.log")
LATENTS_REL = Path("demo/data/laion400m/latents")
COCO_REL = Path("demo/data/coco2014")
STATS_REL = COCO_REL / "val2014_30k_stats.npz"
COLLECTIVE_TIMEOUT_MINUTES = 0.5
TORCHRUN_GRACE_SECONDS = 30          # torchrun's SIGTERM -> SIGKILL wait when it stops its workers
EXIT_BOUND_SECONDS = COLLECTIVE_TIMEOUT_MINUTES * 60 + TORCHRUN_GRACE_SECONDS + 30
# The campaign's training is its own, whatever the demo's: batch 4 per rank (global 8) and 1,024 samples
# (128 steps, checkpoints at 512 and 1,024, 24 prompts) for the full campaign, 256 samples (32 steps,
# checkpoints at 128 and 256, 8 prompts) for --short.
FULL_OVERRIDES = ["train={batch_size: 4, max_samples: 1024, checkpoint_every_samples: 512}", "eval={num_prompts: 24}"]
SHORT_OVERRIDES = ["train={batch_size: 4, max_samples: 256, checkpoint_every_samples: 128}", "eval={num_prompts: 8}"]
FAMILIES = ("kill", "write", "hung", "disk", "corrupt", "twice")
IGNORED_STATE_KEYS = {"attempts", "train_seconds", "downtime_seconds", "saved_at", "mlperf_log_offset"}
MLPERF_IGNORED_KEYS = {"sdcore_resume"}
JOB_TIMEOUT = 1800

SITECUSTOMIZE = r'''
"""Fault hooks of benchmarks/faults.py, active only with its environment variables.

SDCORE_FAULTS_PAUSE: JSON list of {"match", "nth", "where", "marker"}: the nth atomic write (in this
process) whose destination contains "match" stops at "where" (before-rename: the temporary written;
partial: the temporary cut to half its size; after-rename: the file in place), writes "marker"
(JSON: pid, destination, temporary) and sleeps until it is killed (or "marker".release appears:
then the write goes on). SDCORE_FAULTS_JOURNAL: a file
to which every completed atomic write appends "<pid> <destination>".
"""
import os

_PLAN = os.environ.get("SDCORE_FAULTS_PAUSE")
_JOURNAL = os.environ.get("SDCORE_FAULTS_JOURNAL")
if _PLAN or _JOURNAL:
    import contextlib
    import importlib.abc
    import importlib.util
    import json
    import sys
    import time

    _RULES = json.loads(_PLAN) if _PLAN else []
    _COUNTS = [0] * len(_RULES)

    def _hold(rule, dest, tmp):
        if rule["where"] == "partial" and tmp is not None and os.path.exists(tmp):
            os.truncate(tmp, os.path.getsize(tmp) // 2)
        with open(rule["marker"] + ".part", "w") as f:
            json.dump({"pid": os.getpid(), "dest": str(dest), "tmp": str(tmp)}, f)
        os.replace(rule["marker"] + ".part", rule["marker"])
        while not os.path.exists(rule["marker"] + ".release"):  # until killed, or released
            time.sleep(0.2)

    def _stage(dest, tmp, stage):
        for i, rule in enumerate(_RULES):
            where = "before-rename" if rule["where"] == "partial" else rule["where"]
            if where == stage and rule["match"] in str(dest):
                _COUNTS[i] += 1
                if _COUNTS[i] == rule.get("nth", 1):
                    _hold(rule, dest, tmp)

    def _patch(module):
        original = module.atomic_path

        @contextlib.contextmanager
        def atomic_path(path):
            with original(path) as tmp:
                yield tmp
                _stage(path, tmp, "before-rename")
            if _JOURNAL:
                with open(_JOURNAL, "a") as f:
                    f.write(f"{os.getpid()} {os.path.abspath(path)}\n")
            _stage(path, None, "after-rename")

        module.atomic_path = atomic_path

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "sdcore.files":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    _patch(module)

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


# ---- small helpers --------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wait_for(condition, timeout: float, what: str, poll: float = 0.1, alive=None):
    """Poll ``condition()`` until it returns a true value (returned); TimeoutError naming ``what``.
    ``alive()`` false (the workflow ended) stops the wait early with None."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and not alive():
            return condition() or None
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def loss_rows(run_dir: Path) -> int:
    try:
        return max(0, len((run_dir / "train" / "loss.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def unbreak_link(path: Path) -> None:
    """Give ``path`` an inode of its own (trial copies hard-link the data) before changing it in place."""
    data = path.read_bytes()
    tmp = path.with_name(path.name + ".unlink")
    tmp.write_bytes(data)
    shutil.copystat(path, tmp)
    os.replace(tmp, path)


# ---- processes ------------------------------------------------------------------------------------

def proc_table() -> dict[int, tuple[int, list[str]]]:
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue
        table[int(name)] = (ppid, argv)
    return table


def descendants(root: int, table=None) -> list[int]:
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def proc_env(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = [item.decode(errors="replace").partition("=") for item in f.read().split(b"\0") if item]
        return {key: value for key, _, value in items}
    except OSError:
        return {}


def processes_in(directory: Path, table=None) -> list[int]:
    """Processes whose working directory lies in ``directory`` (every job of a trial runs there)."""
    table = proc_table() if table is None else table
    prefix = str(directory.resolve())
    found = []
    for pid in table:
        if pid == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + os.sep):
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclasses.dataclass
class TrainJob:
    launcher: int | None
    ranks: dict[int, int]  # rank -> pid

    @property
    def pids(self) -> list[int]:
        return ([self.launcher] if self.launcher else []) + list(self.ranks.values())


def train_job(work: Path) -> TrainJob | None:
    """The torchrun agent and the rank processes of the trial's training job, if they all run."""
    table = proc_table()
    launcher, ranks = None, {}
    for pid in processes_in(work, table):
        argv = table[pid][1]
        if not any(a.endswith("train.py") for a in argv):
            continue
        if any(a.endswith("torchrun") for a in argv):
            launcher = pid
        elif not any(a.endswith("launch.py") for a in argv):
            rank = proc_env(pid).get("RANK")
            if rank is not None:
                ranks[int(rank)] = pid
    if launcher and len(ranks) == 2:
        return TrainJob(launcher, ranks)
    return None


def eval_jobs(work: Path) -> list[int]:
    table = proc_table()
    return [pid for pid in processes_in(work, table)
            if any(a.endswith("evaluate.py") for a in table[pid][1]) and not any(a.endswith("launch.py")
                                                                                 for a in table[pid][1])]


def kill(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# ---- tmpfs ----------------------------------------------------------------------------------------

class Mounts:
    """tmpfs mounts of this campaign, each unmounted on every exit path."""

    def __init__(self):
        self.points: list[Path] = []

    def mount(self, point: Path, size: str) -> None:
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        self.points.append(point)

    def resize(self, point: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)

    def unmount(self, point: Path) -> None:
        if point in self.points:
            for attempt in range(20):
                done = subprocess.run(["umount", str(point)], capture_output=True, text=True)
                if done.returncode == 0:
                    break
                time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", str(point)], check=False)
            self.points.remove(point)

    def unmount_all(self) -> None:
        for point in list(reversed(self.points)):
            self.unmount(point)


# ---- outcomes -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    family: str
    fault: str
    survived: bool
    lost: bool
    notes: list[str]
    seconds: float


class TrialFailed(Exception):
    """A check of a trial failed (recorded, the campaign goes on)."""


# ---- the campaign ---------------------------------------------------------------------------------

class Campaign:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(self.seed)
        self.short = args.short
        self.overrides = SHORT_OVERRIDES if args.short else FULL_OVERRIDES
        self.root = Path(args.workdir or tempfile.mkdtemp(prefix="sdcore-faults-")).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = self.root / "base"
        self.ref = self.root / "reference"
        self.inject = self.root / "inject"
        self.mounts = Mounts()
        self.outcomes: list[Outcome] = []
        self.trial_count = 0
        self.current: Path | None = None
        self.children: list[subprocess.Popen] = []
        self.max_exit_seconds = 0.0

    # ---- running the workflow ----

    def env(self, **extra) -> dict[str, str]:
        env = dict(os.environ)
        env.update(NO_ALBUMENTATIONS_UPDATE="1", SDCORE_COLLECTIVE_TIMEOUT_MINUTES=str(COLLECTIVE_TIMEOUT_MINUTES),
                   PYTHONPATH=os.pathsep.join([str(self.inject)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
        for key in ("SDCORE_FAULTS_PAUSE", "SDCORE_FAULTS_JOURNAL"):
            env.pop(key, None)
        env.update({k: v for k, v in extra.items() if v is not None})
        return env

    def snakemake_command(self, work: Path, targets=(), extra=()) -> list[str]:
        command = [str(Path(sys.executable).parent / "snakemake"), "-s", str(SNAKEFILE), "-d", str(work),
                   "--profile", str(PROFILE)]
        command += list(extra) + [str(t) for t in targets]
        return command + ["--config", *self.overrides]  # last: it takes every word

    def start(self, work: Path, name: str, targets=(), extra=(), **env) -> subprocess.Popen:
        logfile = open(work / f"snakemake-{name}.log", "w")
        proc = subprocess.Popen(self.snakemake_command(work, targets, extra), cwd=work, env=self.env(**env),
                                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        proc.logfile = logfile
        proc.logname = logfile.name
        self.children.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> int:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise TrialFailed(f"snakemake did not end within {timeout:.0f} s (see {proc.logname})")
        proc.logfile.close()
        self.children.remove(proc)
        return code

    def snakemake(self, work: Path, name: str, targets=(), extra=(), **env) -> tuple[int, str]:
        proc = self.start(work, name, targets, extra, **env)
        code = self.finish(proc)
        return code, Path(proc.logname).read_text()

    def stop(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def reap(self, work: Path) -> list[int]:
        """Kill (by pid) whatever of this trial still runs; the pids found."""
        left = [pid for pid in processes_in(work) if alive(pid)]
        kill(left)
        return left

    # ---- preparation ----

    def prepare(self) -> None:
        self.inject.mkdir(parents=True, exist_ok=True)
        (self.inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if self.base.exists() and (self.base / ".faults-base-ready").exists():
            log(f"reusing the prepared data in {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base.mkdir(parents=True)
            if self.args.data_from:
                source = Path(self.args.data_from).resolve() / "demo"
                log(f"copying the demo data of {source}")
                (self.base / "demo").mkdir()
                for part in ("mirror", "checkpoints", "data"):
                    if (source / part).exists():
                        subprocess.run(["cp", "-a", str(source / part), str(self.base / "demo")], check=True)
            log("building the demo data (snakemake --omit-from train_model)")
            started = time.monotonic()
            code, output = self.snakemake(self.base, "prepare", extra=["--omit-from", "train_model"])
            if code:
                raise SystemExit(f"preparing the demo data failed:\n{output[-3000:]}")
            (self.base / ".faults-base-ready").write_text("")
            log(f"data ready in {time.monotonic() - started:.0f} s")
        shutil.rmtree(self.ref, ignore_errors=True)
        self.ref = self.copy_base("reference")
        log("reference: the uninterrupted run")
        started = time.monotonic()
        code, output = self.snakemake(self.ref, "run")
        if code:
            raise SystemExit(f"the reference run failed:\n{output[-3000:]}")
        self.ref_jobs = job_counts(output)
        self.reference = Snapshot(self.ref / RUN_REL)
        from sdcore.mlperf_log import check_log
        verdict = check_log(self.ref / RUN_REL / "mlperf.log", "open")
        if not verdict.passed:
            raise SystemExit(f"the reference's MLPerf log fails the checker: {verdict.failures}")
        self.ref_seconds = time.monotonic() - started
        log(f"reference done in {self.ref_seconds:.0f} s: checkpoints {self.reference.checkpoint_steps}")

    def copy_base(self, name: str) -> Path:
        work = self.root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "demo").mkdir()
        for part in ("mirror", "checkpoints", "data"):
            subprocess.run(["cp", "-al", str(self.base / "demo" / part), str(work / "demo")], check=True)
        for part in ("results", "logs"):
            if (self.base / "demo" / part).exists():
                subprocess.run(["cp", "-a", str(self.base / "demo" / part), str(work / "demo")], check=True)
        if (self.base / ".snakemake").exists():
            subprocess.run(["cp", "-a", str(self.base / ".snakemake"), str(work)], check=True)
            shutil.rmtree(work / ".snakemake" / "log", ignore_errors=True)
        return work

    # ---- one trial ----

    def trial(self, family: str, fault: str, body, *args) -> Outcome:
        self.trial_count += 1
        work = self.copy_base(f"trial-{self.trial_count:03d}")
        self.current = work
        log(f"trial {self.trial_count} [{family}] {fault}  ({work})")
        started = time.monotonic()
        notes: list[str] = []
        survived, lost = True, False
        try:
            lost = bool(body(work, notes, *args))
        except (TrialFailed, TimeoutError) as error:
            survived = False
            notes.append(f"FAILED: {error}")
        except LostData as error:
            survived, lost = False, True
            notes.append(f"DATA LOST: {error}")
        finally:
            for proc in list(self.children):
                self.stop(proc)
                self.children.remove(proc)
            left = self.reap(work)
            if left:
                survived = False
                notes.append(f"FAILED: processes of the trial still ran at its end: {left}")
            for point in [p for p in self.mounts.points if str(p).startswith(str(work))]:
                self.mounts.unmount(point)
        outcome = Outcome(family, fault, survived and not lost, lost, notes, time.monotonic() - started)
        self.outcomes.append(outcome)
        log(("survived" if outcome.survived else "NOT SURVIVED") + (", DATA LOST" if lost else "")
            + f" in {outcome.seconds:.0f} s" + (f": {'; '.join(notes)}" if notes else ""))
        if outcome.survived and not self.args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return outcome

    # ---- checks ----

    def check_on_disk(self, work: Path, notes: list[str]) -> None:
        """What a fault may leave: every checkpoint present complete and the reference's; the state
        loadable, at a checkpoint or preemption step, its history the reference's up to there."""
        from sdcore.checkpoint import load_unet
        from sdcore.files import is_temporary
        from sdcore.training.state import load_state

        run_dir = work / RUN_REL
        for path in sorted((run_dir / "checkpoints").glob("*.safetensors")):
            if is_temporary(path.name):
                continue
            try:
                tensors, meta = load_unet(path)
            except Exception as error:  # noqa: BLE001 - any failure to load is the finding
                raise LostData(f"{path.name} does not load: {error}")
            if not self.reference.same_checkpoint(path.name, tensors, meta):
                raise LostData(f"{path.name} differs from the reference's")
        try:
            stored = load_state(run_dir)
        except Exception as error:  # noqa: BLE001
            raise LostData(f"the state does not load: {error}")
        if stored is not None:
            step = stored[0]["step"]
            history = (run_dir / "train" / "loss.csv").read_text().splitlines()
            if history[:step + 1] != self.reference.loss_lines[:step + 1]:
                raise LostData(f"loss.csv differs from the reference's up to the state's step {step}")
            notes.append(f"state at step {step}")
        else:
            notes.append("no state yet")

    def check_final(self, work: Path, notes: list[str], output: str | None = None) -> None:
        """The rerun's result against the reference: bitwise weights, optimiser, history; scores; log."""
        from sdcore.files import is_temporary
        from sdcore.mlperf_log import check_log

        run_dir = work / RUN_REL
        problems = self.reference.compare(run_dir)
        if problems:
            raise LostData("; ".join(problems))
        verdict = check_log(run_dir / "mlperf.log", "open")
        if not verdict.passed:
            raise LostData(f"the MLPerf log fails the open-division checker: {verdict.failures}")
        left = [p.name for d in ("train", "checkpoints") for p in (run_dir / d).iterdir() if is_temporary(p.name)]
        if left:
            raise TrialFailed(f"temporaries of killed writes left behind: {left}")
        if output is not None:
            for line in output.splitlines():
                if "resumed" in line and " at step " in line:
                    notes.append(line.split("]")[-1].strip())
        notes.append("result bitwise equal to the reference, checker PASS")

    def rerun(self, work: Path, notes: list[str], name: str = "rerun", **env) -> str:
        code, output = self.snakemake(work, name, **env)
        if code:
            raise TrialFailed(f"the rerun failed (exit {code}): {tail(output)}")
        if "train_model" not in job_counts(output):
            notes.append(f"rerun: {', '.join(sorted(job_counts(output)))}")
            return output
        train_log = work / TRAIN_LOG_REL
        text = train_log.read_text(errors="replace") if train_log.exists() else ""
        resumed = re.findall(r"resumed \S+ at step \d+ \(\d+ samples\), attempt \d+", text)
        if resumed:
            notes.append(resumed[-1])
        elif "but its summary is missing: writing it again" in text:
            notes.append("rerun: the finished run wrote its summary again")
        else:
            notes.append("rerun started afresh (no state)")
        return output

    def wait_for_exit(self, pids, since: float, notes: list[str], what="the job") -> float:
        """Seconds from ``since`` until every pid ended; bounded by EXIT_BOUND_SECONDS."""
        try:
            wait_for(lambda: not any(alive(p) for p in pids), EXIT_BOUND_SECONDS + 30, f"{what} to end", poll=0.2)
        except TimeoutError:
            left = [p for p in pids if alive(p)]
            kill(left)
            raise TrialFailed(f"{what} still ran {EXIT_BOUND_SECONDS + 30:.0f} s after the fault: pids {left}")
        seconds = time.monotonic() - since
        self.max_exit_seconds = max(self.max_exit_seconds, seconds)
        if seconds > EXIT_BOUND_SECONDS:
            raise TrialFailed(f"{what} took {seconds:.0f} s to end, over the bound of {EXIT_BOUND_SECONDS:.0f} s")
        notes.append(f"job gone {seconds:.1f} s after the fault")
        return seconds

    # ---- fault: SIGKILL at a random moment ----

    def kill_draws(self, count: int) -> list[dict]:
        draws = []
        steps = self.reference.max_step
        for _ in range(count):
            phase = self.rng.choices(["train", "write", "eval"], weights=[0.45, 0.3, 0.25])[0]
            target = self.rng.choice(["rank0", "rank1", "job", "launcher"])
            draw = {"phase": phase, "target": target}
            if phase == "train":
                draw.update(step=self.rng.randint(1, steps - 1), delay=round(self.rng.uniform(0, 0.5), 3),
                            again=self.rng.random() < 0.25, again_delay=round(self.rng.uniform(0.5, 8), 1))
            elif phase == "write":
                draw.update(self.rng.choice(self.write_points()),
                            where=self.rng.choice(["before-rename", "partial", "after-rename"]))
            else:
                draw.update(target="eval", delay=round(self.rng.uniform(0.5, 25), 1))
            draws.append(draw)
        return draws

    def write_points(self) -> list[dict]:
        c1, c2 = self.reference.checkpoint_steps
        return [{"match": f"checkpoints/step_{c1:08d}.safetensors", "nth": 1},
                {"match": f"checkpoints/step_{c2:08d}.safetensors", "nth": 1},
                {"match": "train/state.pt", "nth": 1}, {"match": "train/state.pt", "nth": 2},
                {"match": "train/state.pt", "nth": 3}, {"match": "train/summary.json", "nth": 1}]

    @staticmethod
    def describe(draw: dict) -> str:
        if draw["phase"] == "train":
            return (f"SIGKILL {draw['target']} at step {draw['step']} +{draw['delay']} s"
                    + (f", again {draw['again_delay']} s into the rerun" if draw.get("again") else ""))
        if draw["phase"] == "write":
            return f"SIGKILL {draw['target']} inside the write of {draw['match']} #{draw['nth']} ({draw['where']})"
        return f"SIGKILL an evaluation job {draw['delay']} s after it started"

    def do_kill(self, work: Path, notes: list[str], draw: dict) -> None:
        run_dir = work / RUN_REL
        marker = work / "paused.json"
        env = {}
        if draw["phase"] == "write":
            env["SDCORE_FAULTS_PAUSE"] = json.dumps([{"match": draw["match"], "nth": draw["nth"],
                                                      "where": draw["where"], "marker": str(marker)}])
        proc = self.start(work, "faulted", **env)
        running = lambda: proc.poll() is None  # noqa: E731
        job = None
        if draw["phase"] == "train":
            job = wait_for(lambda: train_job(work), 600, "the training job", alive=running, poll=0.3)
            wait_for(lambda: loss_rows(run_dir) >= draw["step"], 900, f"step {draw['step']}", poll=0.02,
                     alive=running)
            time.sleep(draw["delay"])
        elif draw["phase"] == "write":
            wait_for(marker.exists, 900, f"the write of {draw['match']}", alive=running)
            paused = json.loads(marker.read_text())
            notes.append(f"stopped in the write of {Path(paused['dest']).name} by pid {paused['pid']}")
            job = train_job(work)
        else:
            pids = wait_for(lambda: eval_jobs(work), 900, "an evaluation job", alive=running)
            time.sleep(draw["delay"])
            pids = [p for p in eval_jobs(work) if alive(p)] or pids
            victim = self.rng.choice(sorted(pids))
            since = time.monotonic()
            kill([victim])
            notes.append(f"killed evaluation pid {victim}")
            self.wait_for_exit([victim], since, notes, "the evaluation job")
            self.finish(proc)
        if job is None and draw["phase"] != "eval":
            code = self.finish(proc)
            raise TrialFailed(f"the training job was not running when the fault was due (snakemake exit {code})")
        if job is not None:
            self.kill_target(job, draw["target"], notes)
            self.finish(proc)
        self.check_on_disk(work, notes)
        if draw.get("again"):
            proc = self.start(work, "rerun-faulted")
            job = wait_for(lambda: train_job(work), 600, "the rerun's training job", alive=lambda: proc.poll() is None)
            if job is not None:
                time.sleep(draw["again_delay"])
                job = train_job(work)
            if job is not None:
                self.kill_target(job, draw["target"], notes)
                notes.append(f"killed the rerun too, {draw['again_delay']} s in")
            self.finish(proc)
            self.check_on_disk(work, notes)
        self.rerun(work, notes)
        self.check_final(work, notes)

    def kill_target(self, job: TrainJob, target: str, notes: list[str]) -> None:
        since = time.monotonic()
        if target == "job":
            kill(job.pids)
        elif target == "launcher":
            kill([job.launcher])  # the ranks run on in sessions of their own unless they notice
        else:
            kill([job.ranks[int(target[-1])]])
        self.wait_for_exit(job.pids, since, notes)

    # ---- fault: a rank stopped (hung peer) ----

    def do_hung(self, work: Path, notes: list[str], rank: int, step: int) -> None:
        run_dir = work / RUN_REL
        proc = self.start(work, "faulted")
        running = lambda: proc.poll() is None  # noqa: E731
        job = wait_for(lambda: train_job(work), 600, "the training job", alive=running, poll=0.3)
        wait_for(lambda: loss_rows(run_dir) >= step, 900, f"step {step}", poll=0.02, alive=running)
        if job is None:
            raise TrialFailed("the training job was not running")
        since = time.monotonic()
        kill([job.ranks[rank]], signal.SIGSTOP)
        notes.append(f"rank {rank} stopped at step {loss_rows(run_dir)}")
        survivor = job.ranks[1 - rank]
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not alive(survivor), EXIT_BOUND_SECONDS, "the surviving rank to end", poll=0.2)
        survivor_seconds = time.monotonic() - since
        notes.append(f"surviving rank gone after {survivor_seconds:.1f} s "
                     f"(collective timeout {COLLECTIVE_TIMEOUT_MINUTES * 60:.0f} s)")
        self.wait_for_exit(job.pids, since, notes)
        self.finish(proc)
        log_text = (work / TRAIN_LOG_REL).read_text(errors="replace")
        if "timed out" not in log_text.lower() and "timeout" not in log_text.lower():
            notes.append("(the log does not mention the timeout)")
        self.check_on_disk(work, notes)
        self.rerun(work, notes)
        self.check_final(work, notes)

    # ---- fault: disk full ----

    def do_disk_checkpoint(self, work: Path, notes: list[str]) -> None:
        run_dir = work / RUN_REL
        point = run_dir / "checkpoints"
        size = (self.ref / RUN_REL / "checkpoints" / self.reference.checkpoint_names[0]).stat().st_size
        self.mounts.mount(point, str(int(size * 1.5)))
        code, output = self.snakemake(work, "faulted")
        expect_failure(code, output)
        second = point / self.reference.checkpoint_names[1]
        self.expect_error(work, f"cannot write {second.relative_to(work)}", "No space left on device", notes=notes)
        self.check_on_disk(work, notes)
        self.mounts.resize(point, str(int(size * 4)))
        self.rerun(work, notes)
        self.check_final(work, notes)

    def do_disk_state(self, work: Path, notes: list[str]) -> None:
        run_dir = work / RUN_REL
        point = run_dir / "train"
        self.mounts.mount(point, "2m")  # the history and logs fit, the state (optimiser: 2x the weights) does not
        code, output = self.snakemake(work, "faulted")
        expect_failure(code, output)
        self.expect_error(work, "cannot write demo/results/demo/train/", "No space left on device", notes=notes)
        self.check_on_disk(work, notes)
        self.mounts.resize(point, "256m")
        self.rerun(work, notes)
        self.check_final(work, notes)

    def do_disk_shard(self, work: Path, notes: list[str]) -> None:
        part = sorted((work / LATENTS_REL).iterdir())[-1]
        reference = {p.name: sha256(p) for p in sorted(part.iterdir()) if p.is_file()}
        shards = sorted(name for name in reference if name.endswith(".tar"))
        for path in part.iterdir():
            path.unlink()
        part.rmdir()
        (work / LATENTS_REL.parent / "latents.json").unlink()
        first, second = ((self.base / LATENTS_REL / part.name / name).stat().st_size for name in shards[:2])
        self.mounts.mount(part, str((first + second // 2) // 4096 * 4096 + 3 * 4096))
        target = (LATENTS_REL.parent / "latents.json")
        code, output = self.snakemake(work, "faulted", targets=[target])
        expect_failure(code, output)
        logs = "\n".join(p.read_text(errors="replace") for p in (work / "demo/logs").rglob("*.log"))
        hit = [line for line in (logs + output).splitlines() if "No space left" in line and part.name in line]
        if not hit:
            raise TrialFailed("no error naming the shard and the full disk")
        notes.append(hit[-1].strip()[-200:])
        kept = [p.name for p in part.iterdir() if p.name.endswith(".tar") and not p.name.startswith(".")]
        for name in kept:
            if reference.get(name) != sha256(part / name):
                raise LostData(f"{name}, written before the disk was full, differs")
        notes.append(f"kept intact: {kept or 'nothing yet'}")
        self.mounts.resize(part, "64m")
        code, output = self.snakemake(work, "rerun", targets=[target])
        if code:
            raise TrialFailed(f"the rerun failed: {tail(output)}")
        rebuilt = {p.name: sha256(p) for p in sorted(part.iterdir()) if p.is_file()}
        if {k: v for k, v in rebuilt.items() if k.endswith(".tar")} != \
                {k: v for k, v in reference.items() if k.endswith(".tar")}:
            raise LostData("the rebuilt shards differ from the first build")
        notes.append("rerun rebuilt the same shard bytes")

    def do_disk_stats(self, work: Path, notes: list[str]) -> None:
        coco = work / COCO_REL
        reference = sha256(coco / STATS_REL.name)
        held = work / "coco-copy"
        subprocess.run(["cp", "-a", str(coco), str(held)], check=True)
        (held / STATS_REL.name).unlink()
        shutil.rmtree(coco)
        used = sum(p.stat().st_size for p in held.rglob("*") if p.is_file())
        self.mounts.mount(coco, str(used + 2 * 1024 * 1024))
        subprocess.run(f"cp -a {held}/. {coco}/", shell=True, check=True)
        code, output = self.snakemake(work, "faulted", targets=[STATS_REL])
        expect_failure(code, output)
        logs = "\n".join(p.read_text(errors="replace") for p in (work / "demo/logs").rglob("*.log"))
        hit = [line for line in (logs + output).splitlines() if "No space left" in line and STATS_REL.name in line]
        if not hit:
            raise TrialFailed("no error naming the statistics file and the full disk")
        notes.append(hit[0].strip()[-160:])
        before = {p.relative_to(held): sha256(p) for p in held.rglob("*") if p.is_file()}
        for rel, digest in before.items():
            if sha256(coco / rel) != digest:
                raise LostData(f"{rel} changed")
        self.mounts.resize(coco, "256m")
        code, output = self.snakemake(work, "rerun", targets=[STATS_REL])
        if code:
            raise TrialFailed(f"the rerun failed: {tail(output)}")
        if sha256(coco / STATS_REL.name) != reference:
            raise LostData("the rebuilt statistics differ")
        notes.append("rerun rebuilt the same statistics")

    def expect_error(self, work: Path, *needles: str, notes: list[str]) -> None:
        text = (work / TRAIN_LOG_REL).read_text(errors="replace")
        lines = [line for line in text.splitlines() if all(n in line for n in needles)]
        if not lines:
            raise TrialFailed(f"the train log has no line with {needles}: {tail(text)}")
        notes.append(lines[0].strip()[-200:])
        if "--- Logging error ---" in text:
            raise TrialFailed("a log write failed silently (logging error) before the job stopped")

    # ---- fault: corrupt inputs ----

    def victim_shard(self, work: Path) -> Path:
        return sorted((work / LATENTS_REL).glob("*/00000.tar"))[1]

    def do_corrupt(self, work: Path, notes: list[str], kind: str) -> None:
        run_dir = work / RUN_REL
        shard = self.victim_shard(work)
        unbreak_link(shard)
        original = shard.read_bytes()
        if kind in ("caption", "shape"):
            key = rewrite_sample(shard, kind, index=7)
            notes.append(f"{shard.name} of {shard.parent.name[:10]}: sample {key} {kind} damaged")
            code, _ = self.snakemake(work, "faulted")
        else:  # cut in half while training reads it
            proc = self.start(work, "faulted")
            running = lambda: proc.poll() is None  # noqa: E731
            wait_for(lambda: loss_rows(run_dir) >= 8, 900, "step 8", alive=running)
            with open(shard, "r+b") as f:
                f.truncate(len(original) // 2)
            notes.append(f"cut to {len(original) // 2} bytes at step {loss_rows(run_dir)}")
            code = self.finish(proc)
        text = (work / TRAIN_LOG_REL).read_text(errors="replace")
        if code == 0:
            if kind != "cut":
                raise LostData("training ran to its end on damaged data without a word")
            problems = self.reference.compare(run_dir)
            if problems:
                raise LostData(f"trained on a cut shard without stopping: {problems}")
            notes.append("the cut shard was not drawn again: run unchanged")
            return
        lines = [line for line in text.splitlines() if "train.max_bad_samples" in line and str(shard) in line]
        if not lines:
            raise TrialFailed(f"no error naming the shard and the limit: {tail(text)}")
        notes.append(lines[0].split("train: ")[-1][:220])
        self.check_on_disk(work, notes)
        shard.write_bytes(original)
        self.rerun(work, notes)
        self.check_final(work, notes)

    def do_bad_limit(self, work: Path, notes: list[str]) -> None:
        """max_bad_samples 2, two bad samples: skipped and counted; a preempted + resumed run equals an
        uninterrupted one bitwise. Ranks launched as the rule launches them (the workflow's schema may
        not know the key yet)."""
        import yaml

        shard = self.victim_shard(work)
        unbreak_link(shard)
        keys = [rewrite_sample(shard, "caption", index=3), rewrite_sample(shard, "shape", index=11)]
        config = yaml.safe_load((self.ref / RUN_REL / "train_config.yaml").read_text())
        config["train"]["max_bad_samples"] = 2
        config_path = work / "train_config_limit.yaml"
        config_path.write_text(yaml.safe_dump(config))

        def launch(run_dir: Path, name: str) -> subprocess.Popen:
            command = [sys.executable, str(REPO / "workflow_scripts" / "launch.py"), "--nodes", "1",
                       "--nproc-per-node", "2", "--cpus-per-task", "1", "--", str(REPO / "workflow_scripts" / "train.py"),
                       "--config", str(config_path), "--run-dir", str(run_dir),
                       "--latents", "demo/data/laion400m/latents.json",
                       "--sd-checkpoint", "demo/checkpoints/sd/512-base-ema.ckpt"]
            out = open(work / f"{name}.log", "w")
            proc = subprocess.Popen(command, cwd=work, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            proc.logfile, proc.logname = out, out.name
            self.children.append(proc)
            return proc

        uninterrupted, preempted = work / "limit-uninterrupted", work / "limit-preempted"
        code = self.finish(launch(uninterrupted, "uninterrupted"))
        if code:
            raise TrialFailed(f"the run with max_bad_samples 2 failed: {tail((work / 'uninterrupted.log').read_text())}")
        summary = json.loads((uninterrupted / "train" / "summary.json").read_text())
        skipped = summary.get("bad_samples_skipped", [])
        if sorted(s["key"] for s in skipped) != sorted(keys):
            raise LostData(f"the summary counts {skipped}, not the two damaged samples {keys}")
        notes.append(f"skipped and counted: {[s['key'] for s in skipped]}")
        proc = launch(preempted, "preempted")
        wait_for(lambda: loss_rows(preempted) >= self.reference.max_step // 3, 900, "a third of the steps",
                 alive=lambda: proc.poll() is None)
        job = train_job(work)
        if job is None:
            raise TrialFailed("the training was not running")
        kill(job.ranks.values(), signal.SIGTERM)  # as SLURM preempts: SIGTERM to every task
        code = self.finish(proc)
        text = (work / "preempted.log").read_text()
        if code == 0 or "preempted at step" not in text:
            raise TrialFailed(f"SIGTERM did not preempt the run (exit {code}): {tail(text)}")
        notes.append(re.findall(r"preempted at step \d+", text)[0])
        code = self.finish(launch(preempted, "resumed"))
        if code:
            raise TrialFailed(f"the resumed run failed: {tail((work / 'resumed.log').read_text())}")
        problems = Snapshot(uninterrupted, evaluations=False).compare(preempted)
        if problems:
            raise LostData(f"preempted + resumed differs from uninterrupted: {problems}")
        notes.append("preempted + resumed == uninterrupted, bitwise")
        config["train"]["max_bad_samples"] = 1
        config_path.write_text(yaml.safe_dump(config))
        code = self.finish(launch(work / "limit-1", "limit-1"))
        text = (work / "limit-1.log").read_text()
        if code == 0 or "more than train.max_bad_samples = 1" not in text:
            raise TrialFailed(f"with max_bad_samples 1 the run did not stop naming the limit: {tail(text)}")
        notes.append("limit 1: stopped naming the shard")

    # ---- fault: two at once ----

    def do_twice(self, work: Path, notes: list[str]) -> None:
        """The first workflow is held inside its first checkpoint write (holding the run lock; a long
        collective timeout for it) while the second workflow and a second trainer try; then released."""
        run_dir = work / RUN_REL
        marker = work / "paused.json"
        c1 = self.reference.checkpoint_steps[0]
        first = self.start(work, "first", SDCORE_COLLECTIVE_TIMEOUT_MINUTES="20", SDCORE_FAULTS_PAUSE=json.dumps(
            [{"match": f"checkpoints/step_{c1:08d}.safetensors", "nth": 1, "where": "before-rename",
              "marker": str(marker)}]))
        running = lambda: first.poll() is None  # noqa: E731
        wait_for(marker.exists, 900, "the first checkpoint write", alive=running)
        watched = [p for d in ("demo/data", "demo/checkpoints") for p in (work / d).rglob("*") if p.is_file()]
        watched += list(run_dir.glob("*.yaml"))
        before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in watched}
        journal = work / "journal-second.txt"
        second = self.start(work, "second", SDCORE_FAULTS_JOURNAL=str(journal))
        code = self.finish(second, timeout=300)
        text = Path(second.logname).read_text()
        if code == 0 or "cannot be locked" not in text:
            raise TrialFailed(f"the second snakemake did not stop on the lock (exit {code}): {tail(text)}")
        notes.append("second snakemake: " + next(line.strip() for line in text.splitlines() if "cannot be locked" in line))
        # a second trainer by hand (what an orphaned or a --nolock attempt would be)
        command = [sys.executable, str(REPO / "workflow_scripts" / "launch.py"), "--nodes", "1", "--nproc-per-node", "2",
                   "--cpus-per-task", "1", "--", str(REPO / "workflow_scripts" / "train.py"),
                   "--config", str(RUN_REL / "train_config.yaml"), "--run-dir", str(RUN_REL),
                   "--latents", "demo/data/laion400m/latents.json",
                   "--sd-checkpoint", "demo/checkpoints/sd/512-base-ema.ckpt"]
        rows_before = loss_rows(run_dir)
        third = subprocess.run(command, cwd=work, env=self.env(SDCORE_FAULTS_JOURNAL=str(journal)),
                               capture_output=True, text=True, timeout=600)
        if third.returncode == 0 or "is being trained by" not in third.stderr:
            raise TrialFailed(f"a second trainer in the run directory was not refused (exit {third.returncode}): "
                              f"{tail(third.stderr)}")
        notes.append("second trainer: " + next(line for line in third.stderr.splitlines()
                                               if "is being trained by" in line).split("train: ")[-1][:160])
        if journal.exists() and journal.read_text().strip():
            raise LostData(f"the refused invocations wrote: {journal.read_text().split()[:6]}")
        changed = [str(p.relative_to(work)) for p, sig in before.items()
                   if not p.exists() or (p.stat().st_ino, p.stat().st_mtime_ns) != sig]
        if changed:
            raise LostData(f"files changed under the running workflow: {changed[:5]}")
        if loss_rows(run_dir) != rows_before:
            raise LostData("the history changed while the first trainer was held")
        Path(str(marker) + ".release").write_text("")
        code = self.finish(first)
        output = Path(first.logname).read_text()
        if code:
            raise TrialFailed(f"the first workflow failed (exit {code}): {tail(output)}")
        if job_counts(output) != self.ref_jobs:
            raise LostData(f"jobs ran {job_counts(output)}, the reference ran {self.ref_jobs}")
        self.check_final(work, notes)
        notes.append("each job ran once")

    # ---- the plan ----

    def plan(self) -> list[tuple]:
        only = set(self.args.only or FAMILIES)
        short = self.args.plan == "short"
        c1, c2 = self.reference.checkpoint_steps
        steps = self.reference.max_step
        trials = []
        if "kill" in only:
            draws = self.kill_draws(2 if short else 24)
            if short:  # one rank mid-training, the whole job inside a checkpoint write
                draws = [{"phase": "train", "target": self.rng.choice(["rank0", "rank1"]),
                          "step": self.rng.randint(c1 + 1, steps - 2), "delay": 0.1, "again": False},
                         {"phase": "write", "target": "job", "match": f"checkpoints/step_{c2:08d}.safetensors",
                          "nth": 1, "where": "partial"}]
            trials += [("kill", self.describe(d), self.do_kill, d) for d in draws]
        if "write" in only:
            points = [("train/state.pt", 3, "after-rename", "rank1"), ("train/state.pt", 2, "partial", "job")]
            if not short:
                points += [(f"checkpoints/step_{c1:08d}.safetensors", 1, "partial", "rank0"),
                           ("train/summary.json", 1, "before-rename", "job"),
                           (f"checkpoints/step_{c2:08d}.safetensors", 1, "before-rename", "launcher"),
                           ("train/state.pt", 1, "before-rename", "rank0")]
            for match, nth, where, target in points:
                draw = {"phase": "write", "target": target, "match": match, "nth": nth, "where": where}
                trials.append(("write", self.describe(draw), self.do_kill, draw))
        if "hung" in only:
            for rank in ([1] if short else [0, 1]):
                step = self.rng.randint(2, steps - 2)
                trials.append(("hung", f"SIGSTOP rank {rank} at step {step}", self.do_hung, rank, step))
        if "disk" in only:
            trials.append(("disk", "tmpfs checkpoints/ holds one checkpoint", self.do_disk_checkpoint))
            if not short:
                trials += [("disk", "tmpfs train/ of 2 MB (state.pt does not fit)", self.do_disk_state),
                           ("disk", "tmpfs latents/<part>/ holds one shard", self.do_disk_shard),
                           ("disk", "tmpfs coco2014/ without room for the FID statistics", self.do_disk_stats)]
        if "corrupt" in only:
            trials.append(("corrupt", "caption not UTF-8 (max_bad_samples 0)", self.do_corrupt, "caption"))
            if not short:
                trials += [("corrupt", "moments .npy of the wrong shape (max_bad_samples 0)", self.do_corrupt, "shape"),
                           ("corrupt", "shard cut in half during training", self.do_corrupt, "cut"),
                           ("corrupt", "2 bad samples, max_bad_samples 2; preempted + resumed", self.do_bad_limit)]
        if "twice" in only:
            trials.append(("twice", "second snakemake and second trainer in one directory", self.do_twice))
        if self.args.match:
            trials = [t for t in trials if any(m in t[1] for m in self.args.match)]
        return trials

    def run(self) -> int:
        started = time.monotonic()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = " ".join(["python benchmarks/faults.py", *sys.argv[1:]])
        log(f"{command}: seed {self.seed}, work in {self.root}")
        try:
            self.prepare()
            for family, fault, body, *args in self.plan():
                self.trial(family, fault, body, *args)
        finally:
            for proc in list(self.children):
                self.stop(proc)
            if self.current is not None:
                self.reap(self.current)
            self.mounts.unmount_all()
        seconds = time.monotonic() - started
        table = render_table(self.outcomes, command, self.seed, date, seconds, self.short, self.max_exit_seconds)
        print(table)
        if self.args.table:
            Path(self.args.table).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.table).write_text(table)
            log(f"table written to {self.args.table}")
        if not self.args.keep and all(o.survived for o in self.outcomes):
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            log(f"trial directories kept in {self.root}")
        return 0 if all(o.survived for o in self.outcomes) else 1


class LostData(Exception):
    """A complete file was lost or changed, or the result differs from the reference."""


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def expect_failure(code: int, output: str) -> None:
    if code == 0:
        raise TrialFailed("the workflow succeeded although the fault should have stopped it")


def job_counts(output: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in output.splitlines():
        if line.startswith(("rule ", "localrule ")) and line.rstrip().endswith(":"):
            name = line.split()[1].rstrip(":")
            counts[name] = counts.get(name, 0) + 1
    return counts


def rewrite_sample(shard: Path, kind: str, index: int) -> str:
    """Damage sample ``index`` of a shard (rewritten atomically, same member order): its caption
    made invalid UTF-8, or its moments replaced by an array of another shape. Returns its key."""
    import numpy as np

    members = []
    with tarfile.open(shard) as tar:
        for member in tar:
            members.append((member, tar.extractfile(member).read() if member.isfile() else None))
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members if m.isfile()})
    key = keys[index]
    tmp = shard.with_name(shard.name + ".rewrite")
    with tarfile.open(tmp, "w") as out:
        for member, data in members:
            if member.isfile() and member.name.split(".", 1)[0] == key:
                if kind == "caption" and member.name.endswith(".txt"):
                    data = b"\xff\xfe a caption that is not UTF-8 \xc3"
                elif kind == "shape" and member.name.endswith(".npy"):
                    buf = io.BytesIO()
                    np.save(buf, np.zeros((8, 4, 4), np.float32))
                    data = buf.getvalue()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    os.replace(tmp, shard)
    return key


class Snapshot:
    """What the reference run produced, and the comparison of a run directory with it."""

    def __init__(self, run_dir: Path, evaluations: bool = True):
        import torch

        from sdcore.checkpoint import load_unet

        self.run_dir = run_dir
        self.evaluations = evaluations
        self.checkpoint_names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.safetensors"))
        self.checkpoint_steps = [int(n[5:13]) for n in self.checkpoint_names]
        self.max_step = self.checkpoint_steps[-1]
        self.checkpoints = {name: load_unet(run_dir / "checkpoints" / name) for name in self.checkpoint_names}
        self.loss_lines = (run_dir / "train" / "loss.csv").read_text().splitlines()
        self.state = torch.load(run_dir / "train" / "state.pt", map_location="cpu", weights_only=True)
        self.scores = {p.name: scores(p) for p in sorted((run_dir / "eval").glob("step_*.json"))} if evaluations else {}
        self.keys = mlperf_keys(run_dir / "mlperf.log") if evaluations else None

    def same_checkpoint(self, name: str, tensors: dict, meta: dict) -> bool:
        import torch

        if name not in self.checkpoints:
            return False
        ref_tensors, ref_meta = self.checkpoints[name]
        return meta == ref_meta and tensors.keys() == ref_tensors.keys() and \
            all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)

    def compare(self, run_dir: Path) -> list[str]:
        import torch

        from sdcore.checkpoint import load_unet

        problems = []
        names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.safetensors"))
        if names != self.checkpoint_names:
            problems.append(f"checkpoints {names} != {self.checkpoint_names}")
        for name in set(names) & set(self.checkpoint_names):
            if not self.same_checkpoint(name, *load_unet(run_dir / "checkpoints" / name)):
                problems.append(f"weights of {name} differ")
        lines = (run_dir / "train" / "loss.csv").read_text().splitlines()
        if lines != self.loss_lines:
            first = next((i for i, (a, b) in enumerate(zip(lines, self.loss_lines)) if a != b), min(len(lines),
                                                                                                 len(self.loss_lines)))
            problems.append(f"loss.csv differs from row {first} ({len(lines) - 1} rows, reference {len(self.loss_lines) - 1})")
        state = torch.load(run_dir / "train" / "state.pt", map_location="cpu", weights_only=True)
        differing = sorted(key for key in set(state) | set(self.state) if key not in IGNORED_STATE_KEYS
                           and not same(state.get(key), self.state.get(key)))
        if differing:
            problems.append(f"final state differs in {differing}")
        if self.evaluations:
            got = {p.name: scores(p) for p in sorted((run_dir / "eval").glob("step_*.json"))}
            if got != self.scores:
                problems.append(f"evaluation scores {got} != {self.scores}")
            keys = mlperf_keys(run_dir / "mlperf.log")
            if keys != self.keys:
                problems.append("the MLPerf log's keys differ from the reference's")
        return problems


def same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def scores(path: Path) -> dict:
    record = json.loads(path.read_text())
    return {key: record.get(key) for key in ("step", "fid", "clip", "samples_seen", "seed", "targets_met")}


def mlperf_keys(path: Path) -> list[str]:
    keys = []
    for line in path.read_text().splitlines():
        if line.startswith(":::MLLOG "):
            key = json.loads(line[len(":::MLLOG "):])["key"]
            if key not in MLPERF_IGNORED_KEYS:
                keys.append(key)
    return keys


def render_table(outcomes: list[Outcome], command: str, seed: int, date: str, seconds: float, short: bool,
                 max_exit: float) -> str:
    rows: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in outcomes:
        label = outcome.fault
        if outcome.family == "kill":
            label = "SIGKILL of a rank / the whole job / torchrun at a random moment (steps, writes, evaluations)"
        rows.setdefault((outcome.family, label), []).append(outcome)
    lines = [f"# Fault campaign ({'short' if short else 'full'})", "",
             f"`{command}` — seed {seed}, {date}, {seconds / 60:.1f} min; collective timeout "
             f"{COLLECTIVE_TIMEOUT_MINUTES} min, slowest end of a faulted job {max_exit:.1f} s "
             f"(bound {EXIT_BOUND_SECONDS:.0f} s)", "",
             "| fault | tried | survived | data lost |", "| --- | ---: | ---: | ---: |"]
    for (family, label), group in rows.items():
        lines.append(f"| {family}: {label} | {len(group)} | {sum(o.survived for o in group)} | "
                     f"{sum(o.lost for o in group)} |")
    lines += ["", "<details><summary>every trial</summary>", ""]
    for i, outcome in enumerate(outcomes, 1):
        mark = "ok" if outcome.survived else ("LOST" if outcome.lost else "FAILED")
        lines.append(f"{i}. [{mark}] {outcome.family}: {outcome.fault} ({outcome.seconds:.0f} s) — "
                     + "; ".join(n.replace("|", "/") for n in outcome.notes if n))
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def run_slurm(args) -> int:
    """The SLURM faults live in .ci/slurm/run_demo_on_slurm.sh (it starts and stops the cluster);
    here they are run and their table printed."""
    table_file = Path(tempfile.mkdtemp(prefix="sdcore-slurm-faults-")) / "faults.md"
    env = dict(os.environ, SDCORE_SLURM_FAULT_TABLE=str(table_file), SDCORE_SLURM_FAULTS="1")
    started = time.monotonic()
    code = subprocess.call(["bash", str(REPO / ".ci" / "slurm" / "run_demo_on_slurm.sh")], env=env)
    seconds = time.monotonic() - started
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = table_file.read_text() if table_file.exists() else "| (no SLURM fault ran) | 0 | 0 | 0 |\n"
    table = "\n".join(["# Fault campaign (SLURM)", "", f"`python benchmarks/faults.py --slurm` — {date}, "
                       f"{seconds / 60:.1f} min, run_demo_on_slurm.sh exit {code}", "",
                       "| fault | tried | survived | data lost |", "| --- | ---: | ---: | ---: |", body])
    print(table)
    if args.table:
        Path(args.table).write_text(table)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the CI campaign: a few trials, 256 training samples")
    parser.add_argument("--slurm", action="store_true", help="the SLURM faults on the CI cluster")
    parser.add_argument("--seed", type=int, default=None, help="seed of the draws (default: drawn, and printed)")
    parser.add_argument("--table", help="write the table (markdown) here")
    parser.add_argument("--data-from", help="a directory where the demo ran: copy its demo/ data instead of building")
    parser.add_argument("--workdir", help="where the trials run (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep every trial directory")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, help="only these fault families")
    parser.add_argument("--plan", choices=["short", "full"], help="which trials (default: the mode's own)")
    parser.add_argument("--match", nargs="+", help="only the trials whose description contains one of these")
    args = parser.parse_args()
    args.plan = args.plan or ("short" if args.short else "full")
    if args.slurm:
        return run_slurm(args)
    if os.geteuid() != 0 and (not args.only or "disk" in args.only):
        parser.error("the disk-full faults mount tmpfs: run as root, or leave them out (--only ...)")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10**6)
    campaign = Campaign(args)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    return campaign.run()


if __name__ == "__main__":
    sys.exit(main())
