"""The demo mirror: every source of the pipeline generated locally and deterministically, in the
real formats (LAION parquet parts and images, COCO archives, tiny checkpoints, and under
published/ a stand-in of the dataset MLCommons publishes, which a local S3 endpoint can serve).

profiles/demo points the sources into the mirror directory. Those local sources are inputs of
the download rules (common.smk: source_input), so this rule is scheduled like any other; no rule
knows about the demo. With the real config no source lies in the mirror and the rule never runs.

The copies the download rules make are not refreshed when the mirror is regenerated (sources are
ancient(), like remote ones): after changing the demo's model config, delete demo/ and start over.
"""

rule demo_mirror:
    """Generate the demo's local mirror of every source (workflow_scripts/demo_mirror.py)."""
    input:
        f"{DATA}/config/mirror.yaml",
    output:
        manifest=f"{config['demo_mirror']['dir']}/MANIFEST.json",
        sources=mirror_sources(),
    params:
        script=script("demo_mirror.py"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        seed=config["demo_mirror"]["seed"],
    log:
        f"{LOGS}/demo_mirror.log",
    benchmark:
        f"{BENCH}/demo_mirror.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "python {params.script} --out {params.out_dir} --seed {params.seed}"
        " --config {input} > {log} 2>&1"
