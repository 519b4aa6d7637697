"""Config dumps for jobs that read the config from a file.

A dump is rewritten only when the keys it holds change (Snakemake's params trigger), so the jobs
that read it are redone exactly then, and not when an unrelated key is edited.
"""


rule dump_config_slice:
    """The keys of CONFIG_SLICES[slice] as YAML, rewritten only when those keys change."""
    output:
        f"{DATA}/config/{{slice}}.yaml",
    params:
        text=lambda wildcards: yaml_text(config_slice(CONFIG_SLICES[wildcards.slice])),
    log:
        f"{LOGS}/config/{{slice}}.log",
    benchmark:
        f"{BENCH}/config/{{slice}}.tsv"
    threads: 1
    resources:
        mem_mb=100,
    conda:
        ENV
    shell:
        WRITE_TEXT


rule train_config:
    """What a run's training reads (TRAIN_KEYS, plus the training's launch shape)."""
    output:
        f"{RUN_DIR}/train_config.yaml",
    params:
        text=lambda wildcards: run_config(wildcards, TRAIN_KEYS + (["eval"] if INLINE else []), config["launch"]),
    log:
        f"{LOGS}/train/{{run}}.train_config.log",
    benchmark:
        f"{BENCH}/train/{{run}}.train_config.tsv"
    threads: 1
    resources:
        mem_mb=100,
    conda:
        ENV
    shell:
        WRITE_TEXT


rule eval_config:
    """What a run's evaluation jobs read (EVAL_KEYS, plus eval.launch as their shape)."""
    output:
        f"{RUN_DIR}/eval_config.yaml",
    params:
        text=lambda wildcards: run_config(wildcards, EVAL_KEYS, config["eval"]["launch"]),
    log:
        f"{LOGS}/eval/{{run}}.eval_config.log",
    benchmark:
        f"{BENCH}/eval/{{run}}.eval_config.tsv"
    threads: 1
    resources:
        mem_mb=100,
    conda:
        ENV
    shell:
        WRITE_TEXT
