"""Configuration checks, artifact paths and helpers shared by every rule file.

The config is validated here, before any rule is defined, so a misspelt key, a wrong type or an
out-of-range value stops Snakemake before it schedules a job, with the key in the message.
"""

import os
import re
import urllib.parse
import urllib.request

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def config_error_message(error):
    """One line naming the offending key, instead of jsonschema's dump of the whole section."""
    where = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = error.schema.get("properties", {})
        unknown = sorted(set(error.instance) - set(allowed))
        prefix = f"{where}." if where else ""
        names = ", ".join(f"'{prefix}{key}'" for key in unknown)
        return f"unknown config key {names}; allowed there: {', '.join(sorted(allowed))}"
    return f"config key '{where or '<top level>'}': {error.message}"


try:
    validate(config, "schemas/config.schema.yaml", set_default=False)
except WorkflowError as err:
    # snakemake.utils.validate raises from inside its handler, so the schema error is the context.
    if not isinstance(err.__context__, jsonschema.ValidationError):
        raise
    raise WorkflowError(f"Invalid configuration: {config_error_message(err.__context__)}") from None


DATA = config["paths"]["data"]
CKPTS = config["paths"]["checkpoints"]
RESULTS = config["paths"]["results"]
LOGS = config["paths"]["logs"]
BENCH = f"{LOGS}/benchmarks"
RUN = config["run_name"]
RUN_DIR = f"{RESULTS}/{{run}}"  # a pattern: {run} is a wildcard
LAUNCH = config["launch"]

# The one software environment of every rule, for --software-deployment-method conda.
# Relative to the rule files in rules/.
ENV = "../envs/sdcore.yaml"

LAION = f"{DATA}/laion400m"
COCO = f"{DATA}/coco2014"

PART_FILES = config["laion"]["metadata"]["parts"]
PARTS = [name.removesuffix(".parquet") for name in PART_FILES]

unknown_checksums = sorted(set(config["laion"]["metadata"]["sha256"]) - set(PART_FILES))
if unknown_checksums:
    raise WorkflowError(
        "Invalid configuration: config key 'laion.metadata.sha256' names parts not in "
        f"laion.metadata.parts: {', '.join(unknown_checksums)}"
    )

# Archive file name (its stem is the wildcard) -> its coco config entry.
COCO_ARCHIVES = {"val2014": "val2014", "annotations_trainval2014": "annotations"}
CHECKPOINT_NAMES = ["sd", "inception", "clip"]

# Config slices dumped for jobs that need only part of the config, so that editing an unrelated
# key does not make their (expensive) outputs out of date. The nesting of config is kept.
CONFIG_SLICES = {
    "vae": ["model.params.first_stage_config"],
    "mirror": ["model.params", "checkpoints.clip.arch"],
}


wildcard_constraints:
    part="|".join(re.escape(part) for part in PARTS),
    run=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    ckpt=r"step_\d{8}",
    name="|".join(CHECKPOINT_NAMES),
    archive="|".join(COCO_ARCHIVES),
    slice="|".join(CONFIG_SLICES),


def local_path(url):
    """The local file a source names (plain path or file:// URL), or None for a remote URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.netloc + parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return url
    return None


def source_input(url):
    """A local source as an ordinary DAG input, so whatever rule makes it (the demo mirror) runs
    first; nothing for a remote URL, which the download job fetches itself.

    ancient(): a file, once downloaded and verified, is not fetched again because its source got
    a newer time stamp; that is how remote sources behave too.
    """
    path = local_path(url)
    return [] if path is None else [ancient(path)]


def part_url(part):
    return f"{config['laion']['metadata']['source'].rstrip('/')}/{part}.parquet"


def checksum_flags(sha256=None, md5=None):
    """download.py flags for the checksums that are known."""
    flags = []
    if sha256:
        flags.append(f"--sha256 {sha256}")
    if md5:
        flags.append(f"--md5 {md5}")
    return " ".join(flags)


def checkpoint_file(name):
    """Where the verified weights of checkpoints.<name> live."""
    return f"{CKPTS}/{name}/{config['checkpoints'][name]['file']}"


def latents_manifests():
    return expand(f"{LAION}/latents/{{part}}/manifest.json", part=PARTS)


def config_slice(dotted_keys):
    """The sub-tree of config holding only the given dotted keys, with their nesting."""
    sliced = {}
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        source, target = config, sliced
        for key in parents:
            source = source[key]
            target = target.setdefault(key, {})
        target[leaf] = source[leaf]
    return sliced


def yaml_text(data):
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def launcher():
    """The command that starts the ranks of a distributed job (launch.command, formatted)."""
    return LAUNCH["command"].format(**LAUNCH)


def launch_resources():
    """Cluster resources of a distributed job: `nodes` nodes with `nproc_per_node` tasks (one per
    GPU) and `gpus_per_node` GPUs each. With an srun launch command, `mpi` tells the SLURM executor
    plugin to submit that allocation and let the rule's own srun start the tasks inside it."""
    gpus = LAUNCH["gpus_per_node"]
    return dict(
        nodes=LAUNCH["nodes"],
        tasks_per_node=LAUNCH["nproc_per_node"],
        cpus_per_task=LAUNCH["cpus_per_task"],
        gres=f"gpu:{gpus}" if gpus else "",
        runtime=LAUNCH["runtime"],
        **({"mpi": "srun"} if LAUNCH["command"].split()[0] == "srun" else {}),
    )


# Writes params.text to the output through a temporary name, so a reader never sees half a file.
WRITE_TEXT = "{{ printf '%s' {params.text:q} > {output}.tmp && mv {output}.tmp {output}; }} 2> {log}"


def mirror_sources():
    """The configured local sources that lie inside the mirror directory."""
    urls = [part_url(part) for part in PARTS]
    urls += [config["coco"][key]["url"] for key in COCO_ARCHIVES.values()]
    urls += [config["checkpoints"][name]["url"] for name in CHECKPOINT_NAMES]
    root = os.path.normpath(config["demo_mirror"]["dir"]) + os.sep
    paths = (local_path(url) for url in urls)
    return sorted(path for path in paths if path and os.path.normpath(path).startswith(root))


def checkpoint_source(wildcards):
    """The local source of checkpoints.<name>, refusing a file name the config does not give it."""
    entry = config["checkpoints"][wildcards.name]
    if wildcards.file != entry["file"]:
        raise WorkflowError(f"checkpoints.{wildcards.name} is stored as {entry['file']}, not {wildcards.file}")
    return source_input(entry["url"])


def run_evaluations(wildcards):
    """One evaluation per checkpoint the finished training left in its run directory."""
    checkpoints.train_model.get(run=wildcards.run)
    saved = glob_wildcards(f"{RESULTS}/{wildcards.run}/checkpoints/{{ckpt}}.pt").ckpt
    steps = sorted(name for name in saved if re.fullmatch(r"step_\d{8}", name))
    return expand(f"{RESULTS}/{wildcards.run}/eval/{{ckpt}}.json", ckpt=steps)
