"""LAION-400M training subset rebuilt from the metadata (data_source: rebuild), one chain per
metadata part (SPEC section 1): download -> licence filter -> image fetch (img2dataset) -> VAE
moments (latent shards), and the latent index of all parts that training reads.

Every part's chain is known from the config alone, so a dry run shows all of it.
"""

I2D = config["laion"]["img2dataset"]
LATENTS = config["laion"]["latents"]


rule download_laion_metadata:
    """One LAION-400M metadata part (parquet), verified by sha256 where the config pins one."""
    input:
        lambda wildcards: source_input(part_url(wildcards.part)),
    output:
        protected(f"{LAION}/metadata/{{part}}.parquet"),
    params:
        script=script("download.py"),
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
        "python {params.script} --url {params.url:q} --out {output} {params.checksums}"
        " --retries {params.retries} > {log} 2>&1"


rule filter_laion_metadata:
    """Licence filter of one part (the reference keeps LICENSE != '?'), with a per-licence report."""
    input:
        f"{LAION}/metadata/{{part}}.parquet",
    output:
        parquet=f"{LAION}/filtered/{{part}}.parquet",
        report=f"{LAION}/filtered/{{part}}.report.json",
    params:
        script=script("filter_laion_metadata.py"),
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
        "python {params.script} --in {input} --out {output.parquet}"
        " --report {output.report} --mode {params.mode} > {log} 2>&1"


rule summarize_filter:
    """Rows in, rows kept and licences over all parts."""
    input:
        expand(f"{LAION}/filtered/{{part}}.report.json", part=PARTS),
    output:
        report(f"{LAION}/filter_summary.json", category="Data", caption="report/filter.rst"),
    params:
        script=script("summarize_filter.py"),
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
        "python {params.script} --reports {input} --out {output} > {log} 2>&1"


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
        script=script("fetch_laion_images.py"),
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
        "python {params.script} --in {input} --out-dir {params.out_dir} --manifest {output}"
        " --processes {threads} --threads {resources.download_threads}"
        " --samples-per-shard {params.samples_per_shard} --min-success-rate {params.min_success_rate}"
        " --timeout {params.timeout} --retries {params.retries} > {log} 2>&1"


rule encode_laion_latents:
    """VAE moments of every stored image, one output shard per image shard, manifest last."""
    input:
        manifest=f"{LAION}/images/{{part}}/manifest.json",
        **verified_checkpoint("sd"),
        vae_config=f"{DATA}/config/vae.yaml",
    output:
        f"{LAION}/latents/{{part}}/manifest.json",
    params:
        script=script("encode_laion_latents.py"),
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
        "python {params.script} --manifest {input.manifest} --out-dir {params.out_dir}"
        " --out-manifest {output} --checkpoint {input.sd} --config {input.vae_config}"
        " --image-size {params.image_size} --batch-size {params.batch_size} --device {params.device}"
        " --workers {threads} {params.antialias} > {log} 2>&1"


rule index_latents:
    """The latent index of the rebuilt training set: every part's shards and the sample count."""
    input:
        expand(f"{LAION}/latents/{{part}}/manifest.json", part=PARTS),
    output:
        f"{LAION}/latents.json",
    params:
        script=script("index_latents.py"),
    log:
        f"{LOGS}/laion/latents_index.log",
    benchmark:
        f"{BENCH}/laion/latents_index.tsv"
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        "python {params.script} --manifests {input} --out {output} > {log} 2>&1"


rule summarize_laion:
    """What the rebuild chain made of the LAION parts: rows kept by the licence filter, images fetched
    and failed (by kind of error), moments encoded and skipped, per part and in all."""
    input:
        filtered=f"{LAION}/filter_summary.json",
        images=expand(f"{LAION}/images/{{part}}/manifest.json", part=PARTS),
        latents=expand(f"{LAION}/latents/{{part}}/manifest.json", part=PARTS),
    output:
        report(f"{LAION}/summary.txt", category="Data", caption="report/laion.rst"),
    params:
        script=script("summarize_laion.py"),
    log:
        f"{LOGS}/laion/summary.log",
    benchmark:
        f"{BENCH}/laion/summary.tsv"
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        "python {params.script} --filter-summary {input.filtered} --images {input.images} --latents {input.latents}"
        " --out {output} > {log} 2>&1"
