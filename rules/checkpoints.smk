"""Third-party weights: downloaded once, verified against the configured sha256 when downloaded and
again whenever a job is about to read them (rule verify_checkpoint), so a file swapped or damaged
after its download is caught before it is used. Nothing in sdcore fetches weights itself."""


rule download_checkpoint:
    """Fetch checkpoints.<name> (SD2, Inception, OpenCLIP) with retries, resume and checksum check."""
    input:
        checkpoint_source,
    output:
        protected(f"{CKPTS}/{{name}}/{{file}}"),
    params:
        script=script("download.py"),
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
        "python {params.script} --url {params.url:q} --out {output} {params.checksums}"
        " --retries {params.retries} > {log} 2>&1"


rule verify_checkpoint:
    """Size and sha256 of the weights against the config, before any job reads them. Redone when the
    file is newer than its marker or the expected checksum changes."""
    input:
        f"{CKPTS}/{{name}}/{{file}}",
    output:
        f"{CKPTS}/{{name}}/{{file}}.verified.json",
    params:
        script=script("verify_file.py"),
        checksums=lambda wildcards: checksum_flags(sha256=config["checkpoints"][wildcards.name]["sha256"]),
    log:
        f"{LOGS}/checkpoints/{{name}}/{{file}}.verify.log",
    benchmark:
        f"{BENCH}/checkpoints/{{name}}/{{file}}.verify.tsv"
    wildcard_constraints:
        file="|".join(re.escape(config["checkpoints"][name]["file"]) for name in CHECKPOINT_NAMES),
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        "python {params.script} --file {input} {params.checksums} --out {output} > {log} 2>&1"
