"""Process-group setup for torchrun, SLURM (``srun``, one task per GPU) and single-process runs.

The same training and evaluation code runs under all three launchers. torchrun exports
RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT; srun exports SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID and the node list, whose first host is the rendezvous address.
Without either, the run is a single process and every collective helper here is a no-op.

Before any collective, each rank checks that what it was started with is the configured launch
shape (``launch.nodes`` x ``launch.nproc_per_node`` ranks, one GPU each unless
``launch.gpus_per_node`` is 0): a mismatch stops every rank with one line naming it, instead of a
run at the wrong global batch or several ranks on one GPU.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist



def collective_timeout(environ=None) -> datetime.timedelta:
    """``SDCORE_COLLECTIVE_TIMEOUT_MINUTES`` (default 30; fractions allowed, e.g. 0.5 in tests)."""
    value = (os.environ if environ is None else environ).get("SDCORE_COLLECTIVE_TIMEOUT_MINUTES", "30")
    try:
        minutes = float(value)
    except ValueError:
        raise ValueError(f"SDCORE_COLLECTIVE_TIMEOUT_MINUTES={value!r}: not a number of minutes") from None
    if not minutes > 0:
        raise ValueError(f"SDCORE_COLLECTIVE_TIMEOUT_MINUTES={value!r}: must be > 0")
    return datetime.timedelta(minutes=minutes)


# Collectives here are tiny (a stop flag, evaluation results) or DDP buckets. A rank waits this
# long for its peers (a checkpoint write, an evaluation shard) before it gives up on them: a rank
# whose peer died or hangs exits instead of hanging.
PROCESS_GROUP_TIMEOUT = collective_timeout()
# A rank started by a launcher (torchrun's agent, slurmstepd) checks this often that the launcher
# still lives; torchrun starts its workers in sessions of their own, so a killed agent would leave
# them training on, unseen by the scheduler, beside the retry it starts (sdcore.distributed.watch_parent).
PARENT_POLL_SECONDS = 1.0
PARENT_DIED_EXIT_CODE = 70


class LaunchShapeError(RuntimeError):
    """The ranks were started in another shape than the configured one."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def expand_hostlist(hostlist: str) -> list[str]:
    """A SLURM host list (``gpu[003-005,010],login1``, ``a[1-2]b[3-4]``) as host names, in order."""
    hosts, depth, start = [], 0, 0
    for i, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            if hostlist[start:i].strip():
                hosts.extend(_expand_host(hostlist[start:i].strip()))
            start = i + 1
    if depth != 0 or not hosts:
        raise ValueError(f"cannot parse SLURM host list {hostlist!r}")
    return hosts


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    names = []
    for item in match.group(1).split(","):
        low, dash, high = item.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"cannot parse SLURM host range {item!r} in {pattern!r}")
        for number in range(int(low), int(high or low) + 1):
            names.extend(head + str(number).zfill(len(low)) + rest for rest in _expand_host(tail))
    return names


def first_slurm_host(nodelist: str) -> str:
    """First host of the allocation: ``scontrol show hostnames`` when it exists, else our parser."""
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=30, check=True)
        return done.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return expand_hostlist(nodelist)[0]


def launcher_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Normalise the launcher's environment to torchrun's variable names (plus LAUNCHER, which one).

    torchrun's names win when both are set (torchrun inside an allocation); SLURM's are used when
    the ranks were started by srun. MASTER_PORT defaults to a port derived from the job id, so two
    jobs sharing a node do not collide.
    """
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "LAUNCHER": "torchrun",
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "LOCAL_WORLD_SIZE": env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")  # srun sets the former
    if "SLURM_PROCID" in env and int(tasks) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
        return {
            "LAUNCHER": "slurm",
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": tasks,
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": _tasks_on_this_node(env),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)),
        }
    return {"LAUNCHER": "single", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def _tasks_on_this_node(env: dict[str, str]) -> str:
    """This node's task count from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE (``8(x4)`` or ``2,1``)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_NTASKS", "1"))
    counts = []
    for item in spec.split(","):
        count, _, repeat = item.partition("(x")
        counts.extend([int(count)] * int(repeat.rstrip(")") or 1))
    node = int(env.get("SLURM_NODEID", "0"))
    return str(counts[node] if node < len(counts) else counts[0])


def check_launch_shape(shape: dict, world_size: int, local_world_size: int, gpus_visible: int,
                       bound_to_task: bool = False) -> None:
    """Raise LaunchShapeError (one line) unless this launch is the configured shape. ``bound_to_task``:
    CUDA_VISIBLE_DEVICES shows this rank one GPU of its own (srun --gpus-per-task); one GPU seen without
    that is one GPU shared by every rank of the node, which would put them all on cuda:0."""
    nodes, per_node, gpus = shape["nodes"], shape["nproc_per_node"], shape["gpus_per_node"]
    if world_size != nodes * per_node:
        raise LaunchShapeError(f"launched {world_size} ranks, but launch.nodes x launch.nproc_per_node = "
                               f"{nodes} x {per_node} = {nodes * per_node}")
    if local_world_size != per_node:
        raise LaunchShapeError(f"launched {local_world_size} ranks on this node, but launch.nproc_per_node = {per_node}")
    if gpus and gpus_visible == 0:
        raise LaunchShapeError(f"launch.gpus_per_node = {gpus}, but this rank sees no GPU "
                               "(set launch.gpus_per_node: 0 to train on the CPU)")
    if gpus and gpus_visible != per_node and not (gpus_visible == 1 and (bound_to_task or per_node == 1)):
        raise LaunchShapeError(f"{per_node} ranks per node need one GPU each: this rank sees {gpus_visible} GPUs "
                               f"(expected {per_node}, or 1 bound to the task)")


def gpus_bound_to_task(environ: dict[str, str] | None = None) -> bool:
    """Whether CUDA_VISIBLE_DEVICES gives this process exactly one GPU (a per-task binding)."""
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()]) == 1


def select_device(shape: dict, local_rank: int, gpus_visible: int) -> torch.device:
    """CPU when ``gpus_per_node`` is 0; else this rank's own GPU (the one bound to the task when it sees one)."""
    if shape["gpus_per_node"] == 0:
        return torch.device("cpu")
    return torch.device("cuda", 0 if gpus_visible == 1 else local_rank)


def init_distributed(shape: dict | None = None) -> DistEnv:
    """Check the launch against ``shape`` (the config's ``launch``), pick the device, join the
    process group (NCCL on GPUs, gloo on CPU). Without ``shape`` (tools run by hand): every
    rank on the CPU unless a GPU is there, no shape check."""
    env = launcher_env()
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank, local_world_size = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    gpus_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if shape is None:
        shape = {"nodes": 1, "nproc_per_node": local_world_size, "gpus_per_node": min(gpus_visible, local_world_size)}
    else:
        try:
            check_launch_shape(shape, world_size, local_world_size, gpus_visible, bound_to_task=gpus_bound_to_task())
        except LaunchShapeError as error:
            raise LaunchShapeError(f"rank {rank} ({env['LAUNCHER']}): {error}") from None
    device = select_device(shape, local_rank, gpus_visible)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The rank's CPU threads: the SLURM task's CPUs, else OMP_NUM_THREADS (set per rank by the
    # launcher). Set explicitly because Snakemake exports the whole job's thread count as
    # OMP_NUM_THREADS and MKL_NUM_THREADS, which reach the ranks (srun's --export does not
    # override them) and which torch would take: oversubscribed threads slow a step tenfold.
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK") if env["LAUNCHER"] == "slurm" else None
    threads = slurm_cpus or os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if env["LAUNCHER"] != "single":
        watch_parent()
    if world_size > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env["MASTER_ADDR"]
        os.environ["MASTER_PORT"] = env["MASTER_PORT"]
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                   device=device, launcher=env["LAUNCHER"])


_watched_parent: int | None = None


def watch_parent(poll_seconds: float = PARENT_POLL_SECONDS) -> None:
    """Exit this process (``PARENT_DIED_EXIT_CODE``) soon after its parent, the launcher, dies.

    A rank of a killed job must not live on: torchrun's agent starts the ranks in sessions of their
    own, so SIGKILL of the agent (or of the job's process group) would leave them training and
    writing the run directory while the workflow, seeing the job fail, starts a retry beside them.
    A daemon thread polls ``os.getppid()``: when the parent dies the rank is re-parented (to init or
    a subreaper) and exits at once, without a state save (the last saved state stays the resume
    point; atomic writes leave no half file). One watcher per process.
    """
    global _watched_parent
    parent = os.getppid()
    if _watched_parent is not None or parent <= 1:
        return
    _watched_parent = parent

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        print(f"sdcore: pid {os.getpid()}: the launcher (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(PARENT_DIED_EXIT_CODE)

    threading.Thread(target=watch, name="sdcore-parent-watch", daemon=True).start()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
