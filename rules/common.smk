"""Configuration checks, artifact paths and helpers shared by every rule file.

The config is validated here, before any rule is defined, so a misspelt key, a wrong type or an
out-of-range value stops Snakemake before it schedules a job, with the key in the message.

Merge order, later wins, mappings key by key, lists replaced: config.yaml, then a profile's
``configfile:``, then ``--configfile`` files in order, then ``--config`` (where nested values are
given as YAML, e.g. ``--config 'train={batch_size: 4}'``; they are typed here as YAML, since
Snakemake hands nested command-line values over as strings).
"""

import os
import re
import shlex
import sys
import urllib.parse
import urllib.request

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

sys.path.insert(0, workflow.basedir)  # sdcore, importable without an install when run from a checkout
from sdcore.training.plan import checkpoint_steps  # noqa: E402


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


def typed(value):
    """A nested command-line value as YAML types ('4' -> 4, 'true' -> True, 'null' -> None)."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return yaml.safe_load(value) if isinstance(value, str) and value else value


def nested_command_line_overrides():
    """--config values with mappings, re-typed and merged over the config again."""
    nested = {key: typed(value) for key, value in workflow.config_settings.config.items() if isinstance(value, dict)}
    update_config(config, nested)


nested_command_line_overrides()
try:
    validate(config, "schemas/config.schema.yaml", set_default=False)
except WorkflowError as err:
    # snakemake.utils.validate raises from inside its handler, so the schema error is the context.
    if not isinstance(err.__context__, jsonschema.ValidationError):
        raise
    raise WorkflowError(f"Invalid configuration: {config_error_message(err.__context__)}") from None


def config_error(message):
    return WorkflowError(f"Invalid configuration: {message}")


DATA = config["paths"]["data"]
CKPTS = config["paths"]["checkpoints"]
RESULTS = config["paths"]["results"]
LOGS = config["paths"]["logs"]
BENCH = f"{LOGS}/benchmarks"
RUN = config["run_name"]
RUN_DIR = f"{RESULTS}/{{run}}"  # a pattern: {run} is a wildcard (<run_name> or <run_name>/<i>)
SOURCE = config["data_source"]
INLINE = config["eval"]["mode"] == "inline"
SCRIPTS = os.path.join(workflow.basedir, "workflow_scripts")

# The one software environment of every rule, for --software-deployment-method conda.
# Relative to the rule files in rules/.
ENV = "../envs/sdcore.yaml"

LAION = f"{DATA}/laion400m"
COCO = f"{DATA}/coco2014"
PUBLISHED = f"{DATA}/published"

PART_FILES = config["laion"]["metadata"]["parts"]
PARTS = [name.removesuffix(".parquet") for name in PART_FILES]

unknown_checksums = sorted(set(config["laion"]["metadata"]["sha256"]) - set(PART_FILES))
if unknown_checksums:
    raise config_error("config key 'laion.metadata.sha256' names parts not in laion.metadata.parts: "
                       + ", ".join(unknown_checksums))
for scope, shape in (("launch", config["launch"]), ("eval.launch", config["eval"]["launch"])):
    if shape["gpus_per_node"] and shape["nproc_per_node"] > shape["gpus_per_node"]:
        raise config_error(f"{scope}.nproc_per_node = {shape['nproc_per_node']} ranks per node but "
                           f"{scope}.gpus_per_node = {shape['gpus_per_node']}: one rank per GPU "
                           f"(or gpus_per_node: 0 for CPU ranks)")

# Archive file name (its stem is the wildcard) -> its coco config entry.
COCO_ARCHIVES = {"val2014": "val2014", "annotations_trainval2014": "annotations"}
CHECKPOINT_NAMES = ["sd", "inception", "clip"]
CHECKPOINT_STEPS = [f"step_{step:08d}" for step in checkpoint_steps(config)]
RUN_INDICES = list(range(config["submission"]["runs"]))

# Config slices dumped for jobs that need only part of the config, so that editing an unrelated
# key does not make their (expensive) outputs out of date. The nesting of config is kept.
CONFIG_SLICES = {
    "vae": ["model.params.first_stage_config", "model.params.scale_factor"],
    "text": ["model.params.cond_stage_config", "train.precision", "train.batch_size"],
    "mirror": ["model.params", "checkpoints.clip.arch", "coco.subset", "coco.image_size", "published.moments.shards",
               "demo_mirror.published_samples_per_shard"],
}
# What the training job reads, with its launch shape (rules/config.smk); launch.runtime and
# cpus_per_task, download.*, paths and the profile are not among them, so changing those does not
# make a run out of date. Inline mode adds all of eval.
TRAIN_KEYS = ["model", "train", "mlperf", "eval.mode", "eval.stop_on_target", "eval.fid_target", "eval.clip_target",
              "eval.num_prompts"]
EVAL_KEYS = ["model", "eval", "checkpoints.clip.arch"]


wildcard_constraints:
    part="|".join(re.escape(part) for part in PARTS),
    run=re.escape(RUN) + r"(/\d+)?",
    ckpt=r"step_\d{8}",
    name="|".join(CHECKPOINT_NAMES),
    archive="|".join(COCO_ARCHIVES),
    slice="|".join(CONFIG_SLICES),
    shard=r"\d{5}",


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


def checksum_flags(**digests):
    """download.py flags for the checksums that are known (e.g. sha256=..., md5=...)."""
    return " ".join(f"--{name} {value}" for name, value in digests.items() if value)


def checkpoint_file(name):
    """Where the verified weights of checkpoints.<name> live."""
    return f"{CKPTS}/{name}/{config['checkpoints'][name]['file']}"


def verified_checkpoint(name):
    """The weights of checkpoints.<name> with the marker of their verification (rule verify_checkpoint)."""
    return {name: checkpoint_file(name), f"{name}_verified": f"{checkpoint_file(name)}.verified.json"}


def prompts_file():
    return f"{PUBLISHED}/coco2014/val2014_30k.tsv" if SOURCE == "published" else f"{COCO}/val2014_30k.tsv"


def fid_stats_file():
    return f"{PUBLISHED}/coco2014/val2014_30k_stats.npz" if SOURCE == "published" else f"{COCO}/val2014_30k_stats.npz"


def latent_index():
    return f"{PUBLISHED}/laion400m/moments.json" if SOURCE == "published" else f"{LAION}/latents.json"


PRECOMPUTED_TEXT = config["train"]["text_embeddings"] == "precomputed"


def text_embeddings_index():
    """The precomputed contexts, one store per precision and per-rank batch (what bitwise equality needs)."""
    train = config["train"]
    return f"{DATA}/text_embeddings/{SOURCE}_{train['precision']}_bs{train['batch_size']}/embeddings.json"


def eval_inputs():
    """The files every evaluation reads, by name (the flags of evaluate.py and, inline, train.py)."""
    return {"prompts": prompts_file(), "fid_stats": fid_stats_file(), **verified_checkpoint("sd"),
            **verified_checkpoint("inception"), **verified_checkpoint("clip")}


EVAL_FLAGS = ("--prompts {input.prompts} --fid-stats {input.fid_stats} --inception {input.inception}"
              " --clip {input.clip} --sd-checkpoint {input.sd}")


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


def script(name):
    """The path of a workflow script (beside the Snakefile, wherever the working directory is)."""
    return os.path.join(SCRIPTS, name)


def launcher(shape):
    """The command that starts the ranks of a distributed job (workflow_scripts/launch.py)."""
    return (f"python {SCRIPTS}/launch.py --nodes {shape['nodes']} --nproc-per-node {shape['nproc_per_node']}"
            f" --cpus-per-task {shape['cpus_per_task']} --")


def launch_resources(shape):
    """Cluster resources of a distributed job: ``nodes`` nodes with ``nproc_per_node`` tasks (one per
    GPU) and ``gpus_per_node`` GPUs each. With more than one task, ``mpi`` tells the SLURM executor
    plugin to submit that allocation and let launch.py's srun start the tasks inside it."""
    gpus, tasks = shape["gpus_per_node"], shape["nproc_per_node"]
    resources = dict(nodes=shape["nodes"], cpus_per_task=shape["cpus_per_task"], runtime=shape["runtime"],
                     gres=f"gpu:{gpus}" if gpus else "")
    if shape["nodes"] * tasks > 1:
        resources["mpi"] = "srun"
        resources.update(tasks_per_node=tasks) if tasks > 1 else resources.update(tasks=shape["nodes"])
    return resources


def launch_threads(shape):
    return shape["nproc_per_node"] * shape["cpus_per_task"]


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


def run_config(wildcards, keys, launch):
    """The slice of the config a run's jobs read. The runs <run_name>/<i> of a submission differ in
    their seed only: each draws its own from the system's entropy, or, with train.seed set, uses
    train.seed + i."""
    sliced = config_slice(keys)
    sliced["launch"] = {key: launch[key] for key in ("nodes", "nproc_per_node", "gpus_per_node")}
    _, _, index = wildcards.run.partition("/")
    if index and "train" in sliced and sliced["train"]["seed"] is not None:
        sliced["train"] = {**sliced["train"], "seed": sliced["train"]["seed"] + int(index)}
    return yaml_text(sliced)


# ---- published data (rules/published.smk) ----

PUB = config["published"]
S3_ENDPOINT = os.environ.get("SDCORE_S3_ENDPOINT") or PUB["endpoint"]
MOMENT_SHARDS = [f"{i:05d}" for i in range(PUB["moments"]["shards"])]


def s3_url(relative):
    return f"s3://{PUB['bucket']}/{PUB['prefix'].strip('/')}/{relative}"


def s3_credentials():
    """The published read-only key on the command line, unless the environment supplies credentials."""
    if os.environ.get("SDCORE_S3_ACCESS_KEY_ID"):
        return ("AWS_ACCESS_KEY_ID=$SDCORE_S3_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$SDCORE_S3_SECRET_ACCESS_KEY")
    return f"AWS_ACCESS_KEY_ID={PUB['access_key_id']} AWS_SECRET_ACCESS_KEY={PUB['secret_access_key']}"


S3_DOWNLOAD = ("{params.credentials} python {params.script} --url {params.url:q} --out {output}"
               " --s3-endpoint {params.endpoint:q} --retries {params.retries} {params.checksums} > {log} 2>&1")


# ---- training and evaluation (rules/train.smk) ----

EVAL_LAUNCH = config["eval"]["launch"]
EARLY_STOP = config["eval"]["stop_on_target"] and not INLINE


def run_evaluations(wildcards):
    """Every checkpoint's evaluation result (offline mode; inline, the trainer writes them)."""
    if INLINE:
        return []
    return expand(f"{RESULTS}/{wildcards.run}/eval/{{ckpt}}.json", ckpt=CHECKPOINT_STEPS)
