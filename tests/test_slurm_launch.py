"""What the profiles make of the distributed jobs: the sbatch request, the partition of every job, and
the rank launch (workflow_scripts/launch.py).

Each case dry-runs the real workflow with a profile (no cluster needed), reads the jobs' resources
and shell commands from Snakemake's output, and feeds the resources to the SLURM executor plugin's
own sbatch builder. So the test covers the chain config launch.* -> rule resources -> profile
overrides -> sbatch flags, at the 1x8 and 32x8 scales of the benchmark and for the 2-rank CPU job of
the CI cluster; launch.py turns the same shape into the srun or torchrun command.
"""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from test_workflow import copy_workflow, job_blocks

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
WORKDIR = None
GPU_RULES = {"train_model", "evaluate", "encode_laion_latents", "coco_fid_stats"}

submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
plugin_utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")
sys.path.insert(0, str(REPO / "workflow_scripts"))
from launch import launch_command  # noqa: E402


class Resources(dict):
    """The subset of Snakemake's resource list the plugin uses: .get() and attribute access."""

    __getattr__ = dict.__getitem__


@pytest.fixture(scope="module", autouse=True)
def workflow_copy(tmp_path_factory):
    global WORKDIR
    WORKDIR = copy_workflow(tmp_path_factory.mktemp("slurm_launch"))


def dry_run(profile, *args, target="train"):
    """Snakemake's dry-run output (with shell commands) of ``target``, nothing written."""
    cmd = [*SNAKEMAKE, target, "--profile", profile, "--dry-run", "--printshellcmds", *args]
    proc = subprocess.run(cmd, cwd=WORKDIR, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def parse_resources(line):
    resources = Resources()
    for item in line.split(", "):
        key, _, value = item.partition("=")
        resources[key] = int(value) if value.isdigit() else value
    return resources


def train_job(output):
    """(resources, threads, shell command) of the train_model job."""
    block = output.split("rule train_model:", 1)[1].split("\n\n", 1)[0]
    resources = parse_resources(re.search(r"^\s+resources: (.*)$", block, re.M).group(1))
    threads = int(re.search(r"^\s+threads: (\d+)$", block, re.M).group(1)) if "threads:" in block else 1
    shell = re.search(r"^Shell command: (.*)$", block, re.M).group(1)
    return resources, threads, shell


def has(sbatch, flag):
    """Whether the whole option `flag` (e.g. "--nodes=1", "-p gpu") is in the sbatch line."""
    return f" {flag} " in f" {sbatch} "


def sbatch_line(resources, threads, rule="train_model"):
    job = SimpleNamespace(resources=resources, threads=threads)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": f"rule_{rule}",
              "account": "", "partition": f" -p {resources['slurm_partition']}", "workdir": "/w"}
    return submit_string.get_submit_command(job, params) + plugin_utils.set_gres_string(job)


@pytest.mark.slow
def test_one_node_of_eight_gpus():
    resources, threads, shell = train_job(dry_run("profiles/slurm"))
    sbatch = sbatch_line(resources, threads)
    for flag in ["--nodes=1", "--ntasks-per-node=8", "--cpus-per-task=8", "--gres=gpu:8", "-t 1440",
                 "--exclusive", "--signal=USR1@600", "-p gpu"]:
        assert has(sbatch, flag), (flag, sbatch)
    # one task per GPU is set by --ntasks-per-node; --ntasks-per-gpu would multiply it
    assert "--ntasks-per-gpu" not in sbatch and "--ntasks=" not in sbatch
    assert re.match(r"python \S+/workflow_scripts/launch.py --nodes 1 --nproc-per-node 8 --cpus-per-task 8 -- "
                    r"\S+/workflow_scripts/train.py ", shell), shell


@pytest.mark.slow
def test_thirty_two_nodes_with_a_run_name_from_the_command_line(tmp_path):
    """Finding 1 of issue 13: --configfile plus --config run_name=... used to replace the profile's launch
    command (32 nodes asked, 8 ranks started). The shape now lives in the config only."""
    scale = tmp_path / "shape32.yaml"
    scale.write_text(yaml.safe_dump({"launch": {"nodes": 32}, "train": {"batch_size": 2}}))
    resources, threads, shell = train_job(dry_run("profiles/slurm", "--configfile", str(scale),
                                                  "--config", "run_name=try32"))
    sbatch = sbatch_line(resources, threads)
    for flag in ["--nodes=32", "--ntasks-per-node=8", "--cpus-per-task=8", "--gres=gpu:8"]:
        assert has(sbatch, flag), (flag, sbatch)
    assert "--launch.py" not in shell and "--nodes 32 --nproc-per-node 8" in shell
    assert "results/try32" in shell
    # inside that allocation launch.py starts 32 x 8 ranks with srun
    command = launch_command(32, 8, 8, ["train.py"], {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "32"})
    assert command[:6] == ["srun", "--kill-on-bad-exit=1", "--nodes=32", "--ntasks-per-node=8", "--ntasks=256",
                           "--cpus-per-task=8"]


def test_cpu_jobs_go_to_the_cpu_partition_and_gpu_jobs_to_the_gpu_one():
    """Finding 6: CPU-only rules were submitted to the gpu partition."""
    output = dry_run("profiles/slurm", "--config", "data_source=rebuild", target="all")
    partitions = {}
    for rule in ("fetch_laion_images", "filter_laion_metadata", "coco_resize", "coco_fid_stats", "encode_laion_latents",
                 "train_model", "evaluate", "index_latents"):
        jobs = job_blocks(output, rule)
        assert jobs, rule
        partitions[rule] = parse_resources(jobs[0]["resources"])["slurm_partition"]
    assert {rule for rule, partition in partitions.items() if partition == "gpu"} == GPU_RULES & set(partitions)
    assert {partition for rule, partition in partitions.items() if rule not in GPU_RULES} == {"cpu"}


def test_ci_cluster_runs_two_cpu_ranks():
    resources, threads, shell = train_job(dry_run("profiles/slurm-ci"))
    sbatch = sbatch_line(resources, threads)
    for flag in ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]:
        assert has(sbatch, flag), (flag, sbatch)
    assert "--gres" not in sbatch and "--gpus" not in sbatch and has(sbatch, "-p cpu")
    assert "launch.py --nodes 1 --nproc-per-node 2 --cpus-per-task 1 --" in shell


def test_local_demo_launch():
    resources, _, shell = train_job(dry_run("profiles/demo"))
    assert resources["mpi"] == "srun" and resources["tasks_per_node"] == 2  # only used by a SLURM executor
    assert "launch.py --nodes 1 --nproc-per-node 2 --cpus-per-task 1 --" in shell
    command = launch_command(1, 2, 1, ["train.py", "--x"], {})
    assert command[1:] == ["--standalone", "--nproc-per-node=2", "train.py", "--x"]
    assert launch_command(1, 1, 4, ["evaluate.py"], {}) == [sys.executable, "evaluate.py"]
    # one rank inside a SLURM job step: no nested srun, which would wait forever for the step's CPUs
    assert launch_command(1, 1, 1, ["evaluate.py"], {"SLURM_JOB_ID": "24", "SLURM_STEP_ID": "0"}) == [
        sys.executable, "evaluate.py"]


def test_a_shape_the_launch_cannot_honour_fails_before_any_rank_starts():
    with pytest.raises(SystemExit, match="launch.nodes = 4 needs a SLURM allocation"):
        launch_command(4, 8, 8, ["train.py"], {})
    with pytest.raises(SystemExit, match="4 nodes wanted, but SLURM job 9 has 2"):
        launch_command(4, 8, 8, ["train.py"], {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2"})
