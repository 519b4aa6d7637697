"""The Snakemake workflow as a whole: config validation and merging, the DAG of the real benchmark
(published data, rebuilt data, a submission), lint, rule hygiene, the demo profile, and the
consistency of pyproject.toml, envs/ and the Dockerfile.

Snakemake runs as a subprocess in a copy of the workflow files, so nothing is written into the
repository and no job runs (every call is a dry run, a lint or a failing validation).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "config.yaml", "profiles", "envs", "workflow_scripts", "sdcore"]
PER_PART_RULES = ["download_laion_metadata", "filter_laion_metadata", "fetch_laion_images", "encode_laion_latents"]
# Snakemake and its SLURM plugin run the workflow; the jobs' environment does not need them.
WORKFLOW_RUNNERS = {"snakemake", "snakemake-executor-plugin-slurm", "pygments"}  # pygments: snakemake --report


def copy_workflow(root: Path) -> Path:
    """A copy of the workflow's files in ``root``: dry runs there see none of this checkout's outputs and
    leave Snakemake's .snakemake/ state out of the repository."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


def snakemake(workdir, *args, cwd=None):
    """Run Snakemake with this interpreter; return (exit code, stdout + stderr, seconds)."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd or workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def job_counts(output):
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def job_blocks(output, rule):
    """The indented lines of every job of ``rule`` in a dry run, one dict of fields per job."""
    jobs, current = [], None
    for line in output.splitlines():
        if re.match(rf"^(?:local)?(?:rule|checkpoint) {rule}:$", line):
            current = {}
            jobs.append(current)
        elif current is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            current[key] = value
        else:
            current = None
    return jobs


def job_outputs(output, rule):
    """The output files of every job of ``rule`` in a dry run."""
    return sorted({path for job in job_blocks(output, rule) if "output" in job for path in job["output"].split(", ")})


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
        ("launch:\n  nproc_per_node: 8\n  gpus_per_node: 4\n", "launch.nproc_per_node", "one rank per GPU"),
        ("data_source: scrape\n", "data_source", "is not one of"),
    ],
)
def test_bad_config_stops_before_any_job_naming_the_key(workdir, tmp_path, override, key, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    code, output, _ = snakemake(workdir, "-n", "train", "--configfile", str(bad))
    assert code != 0
    assert "Invalid configuration" in output
    assert key in output
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
    assert config["eval"]["precision"] == "fp16" and config["eval"]["mode"] == "offline"
    assert config["train"]["seed"] is None and config["data_source"] == "published"
    assert config["published"]["moments"]["shards"] == 832 and config["submission"]["runs"] == 10
    unet = config["model"]["params"]["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["context_dim"]) == (320, [1, 2, 4, 4], 1024)


def test_dry_run_of_train_fetches_the_published_data_and_lists_every_evaluation(workdir):
    code, output, seconds = snakemake(workdir, "-n", "train")
    assert code == 0, output
    counts = job_counts(output)
    assert counts["download_published_shard"] == 832 and counts["download_published_sums"] == 1
    assert counts["download_published_coco"] == 2 and counts["index_published_moments"] == 1
    # global batch 64: a checkpoint every 8000 steps up to the budget (auto: 3,072,000 samples from the
    # RCP table), each one evaluated offline
    assert counts["evaluate"] == 6 and counts["train_model"] == 1
    assert counts["download_checkpoint"] == 3 and counts["verify_checkpoint"] == 3
    for rule in ["mlperf_log", "check_mlperf_log", "summarize_run", "train_config", "eval_config"]:
        assert counts.get(rule) == 1, (rule, counts)
    for rule in PER_PART_RULES + ["coco_subset", "coco_fid_stats", "demo_mirror"]:
        assert rule not in counts
    evaluations = job_outputs(output, "evaluate")
    assert f"results/sd2-mlperf/eval/step_{8000:08d}.json" in evaluations
    print(f"snakemake -n train: {sum(counts.values())} jobs in {seconds:.1f} s")


def test_dry_run_of_the_rebuild_chain(workdir):
    code, output, _ = snakemake(workdir, "-n", "train", "--config", "data_source=rebuild")
    assert code == 0, output
    counts = job_counts(output)
    parts = len(load_config()["laion"]["metadata"]["parts"])
    for rule in PER_PART_RULES:
        assert counts.get(rule) == parts, (rule, counts)
    for rule in ["download_coco", "extract_coco_annotations", "extract_coco_images", "coco_subset", "coco_resize",
                 "coco_fid_stats", "index_latents"]:
        assert counts.get(rule) == (2 if rule == "download_coco" else 1), (rule, counts)
    assert "download_published_shard" not in counts


def test_dry_run_of_a_submission_at_32x8(workdir, tmp_path):
    shape = tmp_path / "shape.yaml"
    shape.write_text(yaml.safe_dump({"launch": {"nodes": 32}, "train": {"batch_size": 2}}))  # global batch 512
    code, output, _ = snakemake(workdir, "-n", "submission", "--configfile", str(shape))
    assert code == 0, output
    counts = job_counts(output)
    assert counts["train_model"] == 10 and counts["mlperf_log"] == 10 and counts["check_mlperf_log"] == 10
    evaluations = [path for path in job_outputs(output, "evaluate") if path.endswith(".json")]
    assert counts["evaluate"] == len(evaluations) == 70  # budget 3,584,000 samples: 7 checkpoints of 1000 steps per run
    assert f"results/sd2-mlperf/9/eval/step_{7000:08d}.json" in evaluations
    assert counts["package_submission"] == 1


@pytest.mark.slow
def test_nested_command_line_overrides_are_typed_and_validated(workdir):
    code, output, _ = snakemake(workdir, "-n", "train", "--config", "train={batch_size: 4}", "run_name=nested")
    assert code == 0, output
    assert "results/nested/train_config.yaml" in output
    # 4 per rank x 8 ranks = global batch 32: a checkpoint every 16000 steps
    assert job_outputs(output, "evaluate")[0] == f"results/nested/eval/step_{16000:08d}.json"
    code, output, _ = snakemake(workdir, "-n", "train", "--config", "train={batch_size: four}")
    assert code != 0 and "train.batch_size" in output and "is not of type 'integer'" in output


@pytest.mark.slow
def test_merge_order_config_yaml_then_configfiles_then_config(workdir, tmp_path):
    """config.yaml, then the configfiles in order, then --config; later wins, key by key. A --configfile
    on the command line replaces the profile's configfile list (Snakemake's rule for profile values), so
    the README layers a file over the demo by naming the demo's file first."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"run_name": "from-configfile",
                                     "train": {"max_samples": 2048, "checkpoint_every_samples": 512}}))
    code, output, _ = snakemake(workdir, "--profile", "profiles/demo", "-n", "--configfile",
                                "profiles/demo/demo-config.yaml", str(extra))
    assert code == 0, output
    assert "demo/results/from-configfile/train_config.yaml" in output  # demo paths kept, run_name replaced
    assert len(job_outputs(output, "evaluate")) == 2 * 4               # 2048 samples / 512 per checkpoint
    assert "demo/results/from-configfile/eval/step_00000128.json" in output  # the demo's global batch 16 kept
    code, output, _ = snakemake(workdir, "--profile", "profiles/demo", "-n", "--configfile",
                                "profiles/demo/demo-config.yaml", str(extra), "--config", "run_name=from-config")
    assert code == 0, output
    assert "demo/results/from-config/train_config.yaml" in output and len(job_outputs(output, "evaluate")) == 2 * 4
    code, output, _ = snakemake(workdir, "--profile", "profiles/demo", "-n", "--config", "run_name=only-config")
    assert code == 0, output  # --config alone keeps the profile's configfile
    assert "demo/results/only-config/train_config.yaml" in output


def test_demo_profile_schedules_the_mirror_and_writes_only_under_demo(workdir):
    code, output, _ = snakemake(workdir, "--profile", "profiles/demo", "-n")
    assert code == 0, output
    counts = job_counts(output)
    assert counts["demo_mirror"] == 1
    demo = yaml.safe_load((REPO / "profiles/demo/demo-config.yaml").read_text())
    parts = len(demo["laion"]["metadata"]["parts"])
    for rule in PER_PART_RULES:
        assert counts.get(rule) == parts, (rule, counts)
    assert counts["all"] == 1 and counts["summarize_filter"] == 1 and counts["evaluate"] == 2
    outputs = [path for rule in counts for path in job_outputs(output, rule)]
    assert outputs and all(path.startswith("demo/") for path in outputs), outputs


def test_named_target_with_forcerun_rebuilds_only_that_artifact(workdir):
    """The README's form: targets first, --forcerun last (it takes every word after it)."""
    code, output, _ = snakemake(workdir, "data/coco2014/val2014_30k.tsv", "--config", "data_source=rebuild", "-n",
                                "--forcerun", "coco_subset")
    assert code == 0, output
    counts = job_counts(output)
    assert set(counts) == {"coco_subset", "extract_coco_annotations", "download_coco"}, counts


def test_the_workflow_runs_from_another_directory(workdir, tmp_path):
    """snakemake -s REPO/Snakefile -d DIR: the workflow's files relative to the Snakefile, artifacts under DIR."""
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    code, output, _ = snakemake(workdir, "-s", str(workdir / "Snakefile"), "-d", str(run_dir), "-n", "-p", "train",
                                cwd=tmp_path)
    assert code == 0, output
    assert f"python {workdir}/workflow_scripts/launch.py " in output
    assert not (tmp_path / "results").exists() and (run_dir / ".snakemake").is_dir()


def test_lint_is_clean(workdir):
    code, output, _ = snakemake(workdir, "--lint")
    assert code == 0, output
    assert "Lints for" not in output


def test_every_rule_has_a_docstring_log_benchmark_and_the_conda_env():
    rules = {}
    for path in sorted((REPO / "rules").glob("*.smk")) + [REPO / "Snakefile"]:
        text = path.read_text()
        for match in re.finditer(r"^(?:rule|checkpoint) (\w+):\n((?:    .*\n|\n)*)", text, re.M):
            rules[match.group(1)] = match.group(2)
    assert len(rules) >= 30
    targets = {"all", "train", "submission"}
    for name, body in rules.items():
        assert body.lstrip().startswith('"""'), f"rule {name} has no docstring"
        if name in targets:
            continue
        for directive in ("log:", "benchmark:", "conda:\n        ENV"):
            assert f"    {directive}" in body, f"rule {name} lacks {directive!r}"
    assert 'ENV = "../envs/sdcore.yaml"' in (REPO / "rules/common.smk").read_text()


def test_conda_env_has_the_packages_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [dep for dep in project["dependencies"] if re.split(r"[<>=!~ ;\[]", dep)[0] not in WORKFLOW_RUNNERS]
    env = yaml.safe_load((REPO / "envs/sdcore.yaml").read_text())
    pip_section = [item["pip"] for item in env["dependencies"] if isinstance(item, dict)]
    assert pip_section == [wanted]


def test_dockerfile_builds_on_nvidia_pytorch_and_docker_context_leaves_out_data():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", dockerfile, re.MULTILINE)
    assert re.search(r"pip install .*-e \"\.\[test\]\"", dockerfile)
    assert "NO_ALBUMENTATIONS_UPDATE=1" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", "data", "checkpoints", "results", "logs", "demo", ".snakemake"):
        assert path in ignored or f"/{path}" in ignored or f"{path}/" in ignored, path


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci/run").read_text()


def test_no_path_outside_the_clone():
    """The clone needs nothing beside it: no absolute path of this machine, no sibling directory."""
    offenders = []
    for path in REPO.rglob("*"):
        if any(part in (".git", ".venv", "demo", ".snakemake", "__pycache__") for part in path.relative_to(REPO).parts):
            continue
        if path.suffix in (".py", ".smk", ".yaml", ".sh", ".toml") or path.name in ("Snakefile", "run"):
            text = path.read_text(errors="replace")
            if re.search("/" + "work/|" + r"\.\./" + "shared", text):  # split: this file holds no such path
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def readme_snakemake_commands():
    """Every `snakemake ...` command of the README (code blocks and inline), comments dropped."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(snakemake [^\n#|]*)", readme, re.M)
    commands += re.findall(r"`(snakemake [^`]*)`", readme)
    return sorted({c.strip() for c in commands if "..." not in c and "/path/to" not in c and "--report" not in c})


@pytest.mark.parametrize("command", readme_snakemake_commands())
def test_every_snakemake_command_of_the_readme_works(workdir, command):
    """Finding 2 of issue 13 and the rule behind it: the README shows only commands that work. Each is
    dry-run (with the README's own shape file) and must plan at least one job of the rule it names."""
    readme = (REPO / "README.md").read_text()
    shape = re.search(r"# shape-32x8.yaml.*?\n(.*?)```", readme, re.S).group(1)
    (workdir / "shape-32x8.yaml").write_text(shape)
    args = shlex.split(command)[1:]
    code, output, _ = snakemake(workdir, *args, *([] if "-n" in args else ["-n"]))
    assert code == 0, output
    if "--rulegraph" in args:
        assert output.lstrip().startswith("Building DAG") and "digraph snakemake_dag" in output
        return
    counts = job_counts(output)
    named = [a for a in args if a in counts or "/" in a and not a.startswith("profiles/") and not a.endswith(".yaml")]
    assert counts, output
    if "--forcerun" in args:
        assert args[args.index("--forcerun") + 1] in counts
    for target in named:
        if "/" in target:
            assert target in output, target


def test_precomputed_text_embeddings_add_one_encoding_job(workdir):
    code, output, _ = snakemake(workdir, "-n", "-p", "train", "--config", "train={text_embeddings: precomputed}")
    assert code == 0, output
    counts = job_counts(output)
    assert counts["encode_text_embeddings"] == 1
    index = "data/text_embeddings/published_fp16_bs8/embeddings.json"
    assert job_outputs(output, "encode_text_embeddings") == [index]
    assert f"--text-embeddings {index}" in output
