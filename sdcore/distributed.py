"""Process-group setup for torchrun, SLURM (`srun`, one task per GPU) and single-process runs.

The same training code runs under all three launchers. torchrun exports RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT; srun exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
the node list, from which the rendezvous address (first host) is derived. Without either, the
run is a single process and no process group is created, so every collective helper here is
a no-op.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Collectives in this project are tiny (a stop flag, evaluation results) or DDP buckets; a long
# timeout lets one rank write a full-size checkpoint or run an evaluation shard while the others wait.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[003-005,010],login1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


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
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
        return {
            "LAUNCHER": "slurm",
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", first_slurm_host(nodelist)),
            "MASTER_PORT": env.get("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)),
        }
    return {"LAUNCHER": "single", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group of this launch (NCCL on GPUs, gloo on CPU) and pick the device.

    ``device``: "auto" (the local GPU if there is one, else CPU), "cpu" or "cuda".
    """
    env = launcher_env()
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        # srun --gpus-per-task shows each task only its own GPU: the local rank then indexes nothing.
        torch_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    # The rank's CPU threads: the SLURM task's CPUs, else OMP_NUM_THREADS (set per rank by torchrun
    # and by config.yaml's launch command). Set explicitly because Snakemake exports the whole
    # job's thread count as OMP_NUM_THREADS and MKL_NUM_THREADS, which reach the ranks (srun's
    # --export does not override them) and which torch would take: oversubscribed CPU threads
    # slow a step down tenfold.
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK") if env["LAUNCHER"] == "slurm" else None
    threads = slurm_cpus or os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if world_size > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env["MASTER_ADDR"]
        os.environ["MASTER_PORT"] = env["MASTER_PORT"]
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device,
                   launcher=env["LAUNCHER"])


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
