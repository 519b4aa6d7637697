"""Config dumps for jobs that read the config from a file.

A dump is rewritten only when the keys it holds change (Snakemake's params trigger), so the
jobs that read it are redone exactly then, and not when an unrelated key is edited.
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


rule run_config:
    """The merged config of the configured run, which its training and evaluations read."""
    output:
        f"{RUN_DIR}/config.yaml",
    params:
        text=lambda wildcards: yaml_text(config),
    wildcard_constraints:
        run=re.escape(RUN),
    log:
        f"{LOGS}/train/{{run}}.config.log",
    benchmark:
        f"{BENCH}/train/{{run}}.config.tsv"
    threads: 1
    resources:
        mem_mb=100,
    conda:
        ENV
    shell:
        WRITE_TEXT
