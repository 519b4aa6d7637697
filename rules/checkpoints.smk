"""Third-party weights, downloaded once and verified by sha256 where one is published.

Nothing in sdcore fetches weights itself: the jobs load these files.
"""


rule download_checkpoint:
    input:
        checkpoint_source,
    output:
        protected(f"{CKPTS}/{{name}}/{{file}}"),
    params:
        url=lambda wildcards: config["checkpoints"][wildcards.name]["url"],
        checksums=lambda wildcards: checksum_flags(sha256=config["checkpoints"][wildcards.name]["sha256"]),
        retries=config["download"]["retries"],
    log:
        f"{LOGS}/checkpoints/{{name}}/{{file}}.log",
    benchmark:
        f"{BENCH}/checkpoints/{{name}}/{{file}}.tsv"
    wildcard_constraints:
        file="|".join(re.escape(config["checkpoints"][name]["file"]) for name in CHECKPOINT_NAMES),
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python workflow_scripts/download.py --url {params.url:q} --out {output} {params.checksums}"
        " --retries {params.retries} > {log} 2>&1"
