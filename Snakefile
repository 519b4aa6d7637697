"""MLPerf Training text-to-image benchmark (Stable Diffusion v2) as a Snakemake workflow.

    snakemake --profile profiles/demo            # the whole pipeline on the generated demo mirror
    snakemake --profile profiles/slurm train     # the real benchmark on a SLURM cluster
    snakemake -n train                           # the DAG of the real benchmark, nothing run

The config (config.yaml, with profile/--configfile overrides merged over it) is validated
against rules/schemas/config.schema.yaml by rules/common.smk before any rule exists.
"""


configfile: "config.yaml"


include: "rules/common.smk"


rule all:
    """Default target: the training pipeline with its log check and summary, and the licence
    filter report of the LAION parts."""
    default_target: True
    input:
        f"{RESULTS}/{RUN}/summary.txt",
        f"{LAION}/filter_summary.json",


rule train:
    """The benchmark: data, checkpoints, training with evaluations, MLPerf log check, summary."""
    input:
        f"{RESULTS}/{RUN}/summary.txt",


# Small jobs that run on the submitting host even with a cluster executor; the downloads too,
# since cluster compute nodes often have no internet access.
localrules:
    all,
    train,
    dump_config_slice,
    run_config,
    download_laion_metadata,
    download_coco,
    download_checkpoint,
    summarize_filter,
    check_mlperf_log,
    summarize_run,


include: "rules/config.smk"
include: "rules/demo.smk"
include: "rules/checkpoints.smk"
include: "rules/laion.smk"
include: "rules/coco.smk"
include: "rules/train.smk"
