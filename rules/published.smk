"""The prepared dataset MLCommons publishes for the benchmark (data_source: published, the default):
the 832 moment shards of the LAION-400M subset and the COCO prompts and FID statistics, fetched over
S3 from the bucket the reference's download scripts name, every shard verified against the published
sha512sums.txt before anything reads it. Re-scraping LAION is not deterministic (dead URLs); these are
the files reference results were trained on.

Endpoint and credentials: published.* in the config; the environment variables SDCORE_S3_ENDPOINT,
SDCORE_S3_ACCESS_KEY_ID and SDCORE_S3_SECRET_ACCESS_KEY override them (credentials given that way
are not written into the job's command line).
"""

rule download_published_sums:
    """sha512sums.txt of the moment shards (the list every shard is checked against)."""
    output:
        f"{PUBLISHED}/laion400m/moments/sha512sums.txt",
    params:
        script=script("download.py"),
        url=s3_url(f"{PUB['moments']['dir']}/sha512sums.txt"),
        endpoint=S3_ENDPOINT,
        credentials=s3_credentials(),
        retries=config["download"]["retries"],
        checksums=checksum_flags(sha256=PUB["moments"]["sums_sha256"]),
    log:
        f"{LOGS}/published/sha512sums.log",
    benchmark:
        f"{BENCH}/published/sha512sums.tsv"
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        S3_DOWNLOAD


rule download_published_shard:
    """One moment shard (<key>.npy (1, 8, 64, 64), <key>.txt, <key>.json), verified by its sha512."""
    input:
        sums=f"{PUBLISHED}/laion400m/moments/sha512sums.txt",
    output:
        protected(f"{PUBLISHED}/laion400m/moments/{{shard}}.tar"),
    params:
        script=script("download.py"),
        url=lambda wildcards: s3_url(f"{PUB['moments']['dir']}/{wildcards.shard}.tar"),
        endpoint=S3_ENDPOINT,
        credentials=s3_credentials(),
        retries=config["download"]["retries"],
        checksums=lambda wildcards, input: f"--sha512-from {input.sums}",
    log:
        f"{LOGS}/published/moments/{{shard}}.log",
    benchmark:
        f"{BENCH}/published/moments/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        S3_DOWNLOAD


rule download_published_coco:
    """The COCO prompt subset (val2014_30k.tsv) and its FID statistics (val2014_30k_stats.npz), as
    the reference made them; checked by sha256 where the config pins one (none is published)."""
    output:
        protected(f"{PUBLISHED}/coco2014/{{file}}"),
    params:
        script=script("download.py"),
        url=lambda wildcards: s3_url(f"{PUB['coco']['dir']}/{wildcards.file}"),
        endpoint=S3_ENDPOINT,
        credentials=s3_credentials(),
        retries=config["download"]["retries"],
        checksums=lambda wildcards: checksum_flags(sha256=PUB["coco"]["sha256"].get(wildcards.file)),
    wildcard_constraints:
        file="val2014_30k.tsv|val2014_30k_stats.npz",
    log:
        f"{LOGS}/published/coco/{{file}}.log",
    benchmark:
        f"{BENCH}/published/coco/{{file}}.tsv"
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        S3_DOWNLOAD


rule index_published_moments:
    """The latent index of the published training set: the verified shards and their sample count."""
    input:
        expand(f"{PUBLISHED}/laion400m/moments/{{shard}}.tar", shard=MOMENT_SHARDS),
    output:
        f"{PUBLISHED}/laion400m/moments.json",
    params:
        script=script("index_latents.py"),
    log:
        f"{LOGS}/published/moments_index.log",
    benchmark:
        f"{BENCH}/published/moments_index.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python {params.script} --shards {input} --out {output} > {log} 2>&1"
