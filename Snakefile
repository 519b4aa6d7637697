"""MLPerf Training text-to-image benchmark (Stable Diffusion v2) as a Snakemake workflow.

    snakemake --profile profiles/demo            # the whole pipeline on the generated demo mirror
    snakemake --profile profiles/slurm train     # one run of the real benchmark on a SLURM cluster
    snakemake --profile profiles/slurm submission  # the runs of a submission, checked and packaged
    snakemake -n train                           # the DAG of the real benchmark, nothing run

The config (config.yaml, with profile/--configfile/--config overrides merged over it) is validated
against rules/schemas/config.schema.yaml by rules/common.smk before any rule exists. The workflow
finds its own files next to this Snakefile; artifacts go under the working directory (-d DIR).
"""


configfile: workflow.source_path("config.yaml")


include: "rules/common.smk"


report: "rules/report/workflow.rst"


rule all:
    """Default target: one training run with its evaluations, checked MLPerf log and summary (and,
    when the data are rebuilt, the counts of the LAION chain)."""
    default_target: True
    input:
        f"{RESULTS}/{RUN}/summary.txt",
        [f"{LAION}/summary.txt"] if SOURCE == "rebuild" else [],


rule train:
    """The benchmark: data, checkpoints, training, evaluations, MLPerf log check, summary."""
    input:
        f"{RESULTS}/{RUN}/summary.txt",


# Small jobs that run on the submitting host even with a cluster executor; the downloads too,
# since cluster compute nodes often have no internet access.
localrules:
    all,
    train,
    submission,
    dump_config_slice,
    train_config,
    eval_config,
    download_laion_metadata,
    download_coco,
    download_checkpoint,
    download_published_sums,
    download_published_shard,
    download_published_coco,
    summarize_filter,
    summarize_laion,
    mlperf_log,
    check_mlperf_log,
    summarize_run,


include: "rules/config.smk"
include: "rules/demo.smk"
include: "rules/checkpoints.smk"
include: "rules/published.smk"
include: "rules/laion.smk"
include: "rules/coco.smk"
include: "rules/train.smk"
include: "rules/submission.smk"
