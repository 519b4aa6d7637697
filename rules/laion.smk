"""LAION-400M training subset, one chain per metadata part (SPEC section 1):
download -> licence filter -> image fetch (img2dataset) -> VAE moments (latent shards).

Every part's chain is known from the config alone, so a dry run shows all of it.
"""

I2D = config["laion"]["img2dataset"]
LATENTS = config["laion"]["latents"]


rule download_laion_metadata:
    input:
        lambda wildcards: source_input(part_url(wildcards.part)),
    output:
        protected(f"{LAION}/metadata/{{part}}.parquet"),
    params:
        url=lambda wildcards: part_url(wildcards.part),
        checksums=lambda wildcards: checksum_flags(
            sha256=config["laion"]["metadata"]["sha256"].get(f"{wildcards.part}.parquet")
        ),
        retries=config["download"]["retries"],
    log:
        f"{LOGS}/laion/download/{{part}}.log",
    benchmark:
        f"{BENCH}/laion/download/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python workflow_scripts/download.py --url {params.url:q} --out {output} {params.checksums}"
        " --retries {params.retries} > {log} 2>&1"


rule filter_laion_metadata:
    input:
        f"{LAION}/metadata/{{part}}.parquet",
    output:
        parquet=f"{LAION}/filtered/{{part}}.parquet",
        report=f"{LAION}/filtered/{{part}}.report.json",
    params:
        mode=config["laion"]["filter"]["mode"],
    log:
        f"{LOGS}/laion/filter/{{part}}.log",
    benchmark:
        f"{BENCH}/laion/filter/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=16000,
    conda:
        ENV
    shell:
        "python workflow_scripts/filter_laion.py --in {input} --out {output.parquet}"
        " --report {output.report} --mode {params.mode} > {log} 2>&1"


rule summarize_filter:
    input:
        expand(f"{LAION}/filtered/{{part}}.report.json", part=PARTS),
    output:
        f"{LAION}/filter_summary.json",
    log:
        f"{LOGS}/laion/filter_summary.log",
    benchmark:
        f"{BENCH}/laion/filter_summary.tsv"
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        "python workflow_scripts/summarize_filter.py --reports {input} --out {output} > {log} 2>&1"


rule fetch_laion_images:
    """img2dataset with the reference's parameters; its processes are the job's threads and its
    download threads per process the download_threads resource (both from laion.img2dataset).
    Shards are written beside the manifest, which comes last; a rerun resumes the shards that
    exist (incremental mode), since only the manifest is a declared output."""
    input:
        f"{LAION}/filtered/{{part}}.parquet",
    output:
        f"{LAION}/images/{{part}}/manifest.json",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        samples_per_shard=I2D["samples_per_shard"],
        min_success_rate=I2D["min_success_rate"],
        timeout=I2D["timeout"],
        retries=I2D["retries"],
    log:
        f"{LOGS}/laion/fetch/{{part}}.log",
    benchmark:
        f"{BENCH}/laion/fetch/{{part}}.tsv"
    threads: I2D["processes"]
    resources:
        download_threads=I2D["threads"],
        mem_mb=lambda wildcards, threads: 2048 + 1024 * threads,
    conda:
        ENV
    shell:
        "python workflow_scripts/fetch_images.py --in {input} --out-dir {params.out_dir} --manifest {output}"
        " --processes {threads} --threads {resources.download_threads}"
        " --samples-per-shard {params.samples_per_shard} --min-success-rate {params.min_success_rate}"
        " --timeout {params.timeout} --retries {params.retries} > {log} 2>&1"


rule encode_laion_latents:
    """VAE moments of every stored image, one output shard per image shard, manifest last."""
    input:
        manifest=f"{LAION}/images/{{part}}/manifest.json",
        checkpoint=checkpoint_file("sd"),
        vae_config=f"{DATA}/config/vae.yaml",
    output:
        f"{LAION}/latents/{{part}}/manifest.json",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        image_size=LATENTS["image_size"],
        batch_size=LATENTS["batch_size"],
        device=LATENTS["device"],
        antialias="--antialias" if LATENTS["antialias"] else "",
    log:
        f"{LOGS}/laion/latents/{{part}}.log",
    benchmark:
        f"{BENCH}/laion/latents/{{part}}.tsv"
    threads: 4
    resources:
        mem_mb=16000,
    conda:
        ENV
    shell:
        "python workflow_scripts/encode_latents.py --manifest {input.manifest} --out-dir {params.out_dir}"
        " --out-manifest {output} --checkpoint {input.checkpoint} --config {input.vae_config}"
        " --image-size {params.image_size} --batch-size {params.batch_size} --device {params.device}"
        " {params.antialias} > {log} 2>&1"
