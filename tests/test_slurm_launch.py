"""What the SLURM profiles make of the train job: the sbatch request and the rank launch.

Each case dry-runs the real workflow with a profile (no cluster needed), reads the train_model
job's resources and shell command from Snakemake's output, and feeds the resources to the SLURM
executor plugin's own sbatch builder. So the test covers the chain config launch.* -> rule
resources -> profile overrides -> sbatch flags, at the 1x8 and 32x8 scales of the benchmark and
for the 2-rank CPU job of the CI cluster.
"""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
plugin_utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")


class Resources(dict):
    """The subset of Snakemake's resource list the plugin uses: .get() and attribute access."""

    __getattr__ = dict.__getitem__


def dry_run_train_job(tmp_path, profile, *extra_configfiles):
    """(resources, threads, shell command) of train_model in a dry run of the `train` target.

    --forcerun: the job is listed even when this checkout has already run the pipeline."""
    cmd = [*SNAKEMAKE, "train", "--profile", profile, "--dry-run", "--nolock", "--forcerun", "train_model",
           "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile")]
    if extra_configfiles:
        cmd += ["--configfile", *map(str, extra_configfiles)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    block = proc.stdout.split("checkpoint train_model:", 1)[1].split("\n\n", 1)[0]
    resources_line = re.search(r"^\s+resources: (.*)$", block, re.M).group(1)
    resources = Resources()
    for item in resources_line.split(", "):
        key, _, value = item.partition("=")
        resources[key] = int(value) if value.isdigit() else value
    threads = int(re.search(r"^\s+threads: (\d+)$", block, re.M).group(1)) if "threads:" in block else 1
    shell = re.search(r"^Shell command: (.*)$", block, re.M).group(1)
    return resources, threads, shell


def has(sbatch, flag):
    """Whether the whole option `flag` (e.g. "--nodes=1", "-p gpu") is in the sbatch line."""
    return f" {flag} " in f" {sbatch} "


def sbatch_line(resources, threads):
    job = SimpleNamespace(resources=resources, threads=threads)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule_train_model",
              "account": "", "partition": f" -p {resources['slurm_partition']}", "workdir": "/w"}
    return submit_string.get_submit_command(job, params) + plugin_utils.set_gres_string(job)


def test_one_node_of_eight_gpus(tmp_path):
    resources, threads, shell = dry_run_train_job(tmp_path, "profiles/slurm")
    sbatch = sbatch_line(resources, threads)
    for flag in ["--nodes=1", "--ntasks-per-node=8", "--cpus-per-task=8", "--gres=gpu:8", "-t 1440",
                 "--exclusive", "--signal=USR1@600", "-p gpu"]:
        assert has(sbatch, flag), (flag, sbatch)
    # one task per GPU is set by --ntasks-per-node; --ntasks-per-gpu would multiply it
    assert "--ntasks-per-gpu" not in sbatch and "--ntasks=" not in sbatch
    assert shell.startswith("srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=8 --cpus-per-task=8 --export=ALL,OMP_NUM_THREADS=8 "
                            "python workflow_scripts/train.py ")


def test_thirty_two_nodes_of_eight_gpus(tmp_path):
    scale = tmp_path / "nodes.yaml"
    scale.write_text(yaml.safe_dump({"launch": {"nodes": 32}}))
    resources, threads, shell = dry_run_train_job(tmp_path, "profiles/slurm", scale)
    sbatch = sbatch_line(resources, threads)
    for flag in ["--nodes=32", "--ntasks-per-node=8", "--cpus-per-task=8", "--gres=gpu:8"]:
        assert has(sbatch, flag), (flag, sbatch)
    assert "--ntasks-per-gpu" not in sbatch and "--ntasks=" not in sbatch
    assert shell.startswith("srun --kill-on-bad-exit=1 --nodes=32 --ntasks-per-node=8 --cpus-per-task=8 --export=ALL,OMP_NUM_THREADS=8 python ")


def test_ci_cluster_runs_two_cpu_ranks(tmp_path):
    resources, threads, shell = dry_run_train_job(tmp_path, "profiles/slurm-ci")
    sbatch = sbatch_line(resources, threads)
    for flag in ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]:
        assert has(sbatch, flag), (flag, sbatch)
    assert "--gres" not in sbatch and "--gpus" not in sbatch and has(sbatch, "-p cpu")
    assert shell.startswith("srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --export=ALL,OMP_NUM_THREADS=1 python ")


def test_local_demo_keeps_torchrun(tmp_path):
    resources, _, shell = dry_run_train_job(tmp_path, "profiles/demo")
    assert "mpi" not in resources
    assert shell.startswith("env OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 workflow_scripts/train.py ")
