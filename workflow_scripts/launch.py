"""Start the ranks of a distributed job (training or evaluation) in the configured shape.

    python workflow_scripts/launch.py --nodes N --nproc-per-node P --cpus-per-task C -- SCRIPT ARGS...

A single rank runs as this process. Otherwise, inside a SLURM allocation (the job Snakemake's SLURM
executor submitted, or an salloc) the ranks start with ``srun``: N nodes x P tasks, C CPUs each, rank and world size from SLURM. Elsewhere with
``torchrun --standalone``: P ranks on this machine, which needs N = 1. Every rank gets
OMP_NUM_THREADS=C, because Snakemake exports the whole job's thread count, which each rank would
otherwise take. A shape the allocation cannot hold fails here, before any rank starts, with one
line saying why; each rank checks the shape again when it starts (sdcore.distributed).
"""

import argparse
import os
import shutil
import sys


def launch_command(nodes: int, per_node: int, cpus: int, script: list[str], environ: dict) -> list[str]:
    if nodes * per_node == 1:
        # one rank: this process is it. Inside SLURM the executor already started it as a job step
        # (srun -n1); a nested srun would wait forever for the CPUs that step holds.
        return [sys.executable, *script]
    if environ.get("SLURM_JOB_ID"):
        allocated = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
        if nodes > allocated:
            raise SystemExit(f"launch: {nodes} nodes wanted, but SLURM job {environ['SLURM_JOB_ID']} has {allocated}")
        return ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
                f"--ntasks={nodes * per_node}", f"--cpus-per-task={cpus}", f"--export=ALL,OMP_NUM_THREADS={cpus}",
                sys.executable, *script]
    if nodes > 1:
        raise SystemExit(f"launch: launch.nodes = {nodes} needs a SLURM allocation (snakemake --profile "
                         "profiles/slurm), but this job runs outside SLURM")
    torchrun = shutil.which("torchrun") or "torchrun"
    return [torchrun, "--standalone", f"--nproc-per-node={per_node}", *script]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--nproc-per-node", type=int, required=True, help="ranks per node (one per GPU)")
    parser.add_argument("--cpus-per-task", type=int, required=True, help="CPU threads of each rank")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("no script to launch")
    command = launch_command(args.nodes, args.nproc_per_node, args.cpus_per_task, script, os.environ)
    os.environ["OMP_NUM_THREADS"] = str(args.cpus_per_task)
    print("launch:", " ".join(command), file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
