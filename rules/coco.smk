"""COCO-2014 validation rebuilt from the archives (data_source: rebuild): the 30,000-prompt subset and
the FID reference statistics, made as the reference made the published ones (SPEC section 1):
images resized to 512x512 bicubic and saved as JPEG (PIL's default quality 75) like its
coco-split-resize.py, then pytorch-fid's front end and Inception (sdcore.fid). The resize and the
statistics depend on sdcore/fid.py itself, so a change to that preprocessing redoes them."""

FID_MODULE = os.path.join(workflow.basedir, "sdcore", "fid.py")


rule download_coco:
    """val2014.zip or annotations_trainval2014.zip, checked by md5."""
    input:
        lambda wildcards: source_input(config["coco"][COCO_ARCHIVES[wildcards.archive]]["url"]),
    output:
        protected(f"{COCO}/{{archive}}.zip"),
    params:
        script=script("download.py"),
        url=lambda wildcards: config["coco"][COCO_ARCHIVES[wildcards.archive]]["url"],
        checksums=lambda wildcards: checksum_flags(md5=config["coco"][COCO_ARCHIVES[wildcards.archive]]["md5"]),
        retries=config["download"]["retries"],
    log:
        f"{LOGS}/coco/download/{{archive}}.log",
    benchmark:
        f"{BENCH}/coco/download/{{archive}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python {params.script} --url {params.url:q} --out {output} {params.checksums}"
        " --retries {params.retries} > {log} 2>&1"


rule extract_coco_annotations:
    """captions_val2014.json out of the annotations archive."""
    input:
        f"{COCO}/annotations_trainval2014.zip",
    output:
        captions=f"{COCO}/annotations/captions_val2014.json",
        marker=f"{COCO}/annotations/.extracted",
    params:
        script=script("extract_zip.py"),
        out_dir=lambda wildcards, output: os.path.dirname(output.captions),
    log:
        f"{LOGS}/coco/extract_annotations.log",
    benchmark:
        f"{BENCH}/coco/extract_annotations.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python {params.script} --zip {input} --member-prefix annotations/captions_val2014.json"
        " --out-dir {params.out_dir} --marker {output.marker} > {log} 2>&1"


rule extract_coco_images:
    """All 40,504 images, needed only to make the resized subset: a temporary directory (the zip
    stays), deleted once the resized images exist."""
    input:
        f"{COCO}/val2014.zip",
    output:
        temp(directory(f"{COCO}/val2014")),
    params:
        script=script("extract_zip.py"),
    log:
        f"{LOGS}/coco/extract_images.log",
    benchmark:
        f"{BENCH}/coco/extract_images.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python {params.script} --zip {input} --member-prefix val2014/ --out-dir {output}"
        " --marker {output}/.extracted > {log} 2>&1"


rule coco_subset:
    """val2014_30k.tsv: the reference's prompt subset (shuffle with seed 2023, one caption per image)."""
    input:
        f"{COCO}/annotations/captions_val2014.json",
    output:
        f"{COCO}/val2014_30k.tsv",
    params:
        script=script("coco_subset.py"),
        size=config["coco"]["subset"]["size"],
        seed=config["coco"]["subset"]["seed"],
    log:
        f"{LOGS}/coco/subset.log",
    benchmark:
        f"{BENCH}/coco/subset.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python {params.script} --annotations {input} --out {output} --size {params.size}"
        " --seed {params.seed} > {log} 2>&1"


rule coco_resize:
    """The subset's images resized as the reference's coco-split-resize.py does (512x512 bicubic,
    aspect not kept, JPEG at PIL's default quality), marker last."""
    input:
        tsv=f"{COCO}/val2014_30k.tsv",
        images=f"{COCO}/val2014",
        preprocessing=FID_MODULE,
    output:
        f"{COCO}/val2014_512x512_30k/.done",
    params:
        script=script("coco_resize.py"),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        size=config["coco"]["image_size"],
    log:
        f"{LOGS}/coco/resize.log",
    benchmark:
        f"{BENCH}/coco/resize.tsv"
    threads: config["coco"]["resize_workers"]
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 500 * threads,
    conda:
        ENV
    shell:
        "python {params.script} --tsv {input.tsv} --images-dir {input.images}"
        " --out-dir {params.out_dir} --size {params.size} --marker {output} --workers {threads} > {log} 2>&1"


rule coco_fid_stats:
    """val2014_30k_stats.npz: mu and sigma of the resized images' Inception pool3 features, read the
    way pytorch-fid reads image files."""
    input:
        resized=f"{COCO}/val2014_512x512_30k/.done",
        tsv=f"{COCO}/val2014_30k.tsv",
        **verified_checkpoint("inception"),
        preprocessing=FID_MODULE,
    output:
        f"{COCO}/val2014_30k_stats.npz",
    params:
        script=script("coco_fid_stats.py"),
        images_dir=lambda wildcards, input: os.path.dirname(input.resized),
        batch_size=config["coco"]["fid_batch_size"],
        device=config["coco"]["device"],
    log:
        f"{LOGS}/coco/fid_stats.log",
    benchmark:
        f"{BENCH}/coco/fid_stats.tsv"
    threads: 4
    resources:
        mem_mb=16000,
    conda:
        ENV
    shell:
        "python {params.script} --images-dir {params.images_dir} --tsv {input.tsv}"
        " --inception {input.inception} --out {output} --batch-size {params.batch_size}"
        " --device {params.device} > {log} 2>&1"
