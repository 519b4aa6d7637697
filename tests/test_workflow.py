"""The Snakemake workflow as a whole: config validation, the DAG of the real benchmark, lint,
the demo profile, and the consistency of pyproject.toml, envs/ and the Dockerfile.

Snakemake runs as a subprocess in a copy of the workflow files, so nothing is written into the
repository and no job runs (every call is a dry run, a lint or a failing validation).
"""

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "config.yaml", "profiles", "envs"]
PER_PART_RULES = ["download_laion_metadata", "filter_laion_metadata", "fetch_laion_images", "encode_laion_latents"]
# Snakemake and its SLURM plugin run the workflow; the jobs' environment does not need them.
WORKFLOW_RUNNERS = {"snakemake", "snakemake-executor-plugin-slurm"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow, so Snakemake's .snakemake/ state stays out of the repository."""
    root = tmp_path_factory.mktemp("workflow")
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy2(source, root / name)
    return root


def snakemake(workdir, *args):
    """Run Snakemake with this interpreter; return (exit code, stdout + stderr, seconds)."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def job_counts(output):
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def load_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.mark.parametrize(
    "override, key, problem",
    [
        ("train:\n  batch_sizee: 4\n", "train.batch_sizee", "unknown config key"),
        ("model:\n  params:\n    unet_config:\n      params:\n        model_channel: 32\n",
         "model.params.unet_config.params.model_channel", "unknown config key"),
        ("train:\n  batch_size: four\n", "train.batch_size", "is not of type 'integer'"),
        ("eval:\n  clip_target: 2.0\n", "eval.clip_target", "greater than the maximum"),
        ("laion:\n  filter:\n    mode: strict\n", "laion.filter.mode", "is not one of"),
        ("laion:\n  metadata:\n    sha256: {nothing.parquet: " + "a" * 64 + "}\n",
         "laion.metadata.sha256", "nothing.parquet"),
    ],
)
def test_bad_config_stops_before_any_job_naming_the_key(workdir, tmp_path, override, key, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    code, output, _ = snakemake(workdir, "-n", "train", "--configfile", str(bad))
    assert code != 0
    assert "Invalid configuration" in output
    assert f"'{key}'" in output
    assert problem in output
    assert "Job stats" not in output


def test_real_config_is_valid_and_holds_the_benchmark():
    config = load_config()
    parts = config["laion"]["metadata"]["parts"]
    assert len(parts) == 32 and len(set(parts)) == 32
    assert all(re.fullmatch(r"part-000\d\d-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000\.snappy\.parquet", p) for p in parts)
    assert config["coco"]["subset"] == {"size": 30000, "seed": 2023}
    assert config["train"]["checkpoint_every_samples"] == 512000
    assert config["train"]["optimizer"] == {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    assert (config["eval"]["fid_target"], config["eval"]["clip_target"]) == (90.0, 0.15)
    unet = config["model"]["params"]["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["context_dim"]) == (320, [1, 2, 4, 4], 1024)


def test_dry_run_of_train_lists_every_stage(workdir):
    code, output, seconds = snakemake(workdir, "-n", "train")
    assert code == 0, output
    counts = job_counts(output)
    parts = len(load_config()["laion"]["metadata"]["parts"])
    for rule in PER_PART_RULES:
        assert counts.get(rule) == parts, (rule, counts)
    assert counts["download_checkpoint"] == 3
    assert counts["download_coco"] == 2
    for rule in ["extract_coco_annotations", "extract_coco_images", "coco_subset", "coco_resize",
                 "coco_fid_stats", "run_config", "train_model", "check_mlperf_log", "summarize_run"]:
        assert counts.get(rule) == 1, (rule, counts)
    # The demo mirror is not part of the real benchmark's DAG.
    assert "demo_mirror" not in counts
    print(f"snakemake -n train: {sum(counts.values())} jobs in {seconds:.1f} s")


def test_demo_profile_schedules_the_mirror_through_ordinary_inputs(workdir):
    code, output, _ = snakemake(workdir, "--profile", "profiles/demo", "-n")
    assert code == 0, output
    counts = job_counts(output)
    assert counts["demo_mirror"] == 1
    demo = yaml.safe_load((REPO / "profiles/demo/demo-config.yaml").read_text())
    parts = len(demo["laion"]["metadata"]["parts"])
    for rule in PER_PART_RULES:
        assert counts.get(rule) == parts, (rule, counts)
    assert counts["all"] == 1 and counts["summarize_filter"] == 1


def test_lint_is_clean(workdir):
    code, output, _ = snakemake(workdir, "--lint")
    assert code == 0, output
    assert "Lints for" not in output


def test_conda_env_has_the_packages_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [dep for dep in project["dependencies"] if re.split(r"[<>=!~ ;\[]", dep)[0] not in WORKFLOW_RUNNERS]
    env = yaml.safe_load((REPO / "envs/sdcore.yaml").read_text())
    pip_section = [item["pip"] for item in env["dependencies"] if isinstance(item, dict)]
    assert pip_section == [wanted]


def test_every_rule_names_the_conda_env():
    rules = "".join(path.read_text() for path in (REPO / "rules").glob("*.smk"))
    n_rules = len(re.findall(r"^(?:rule|checkpoint) \w+:", rules, re.MULTILINE))
    assert rules.count("    conda:\n        ENV\n") == n_rules
    assert 'ENV = "../envs/sdcore.yaml"' in rules
    assert (REPO / "envs/sdcore.yaml").is_file()


def test_dockerfile_builds_on_nvidia_pytorch_and_installs_the_package():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", dockerfile, re.MULTILINE)
    assert re.search(r"pip install .*-e \"\.\[test\]\"", dockerfile)
    assert "NO_ALBUMENTATIONS_UPDATE=1" in dockerfile


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci/run").read_text().splitlines()
