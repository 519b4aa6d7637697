"""Training, evaluation, the MLPerf log check and the run summary (SPEC sections 3-5).

Layout of a run directory <results>/<run>/ and who declares what:
  config.yaml             the merged config of the run (rules/config.smk: run_config), what
                          train.py and evaluate.py read
  summary.json            train_model's only declared output, written last
  mlperf.log, loss.csv, loss.png, resume.pt, checkpoints/step_N.pt, eval/step_N.json
                          written by the trainer while it runs and deliberately undeclared:
                          Snakemake deletes the declared outputs of a failed job, and a preempted
                          or killed training must find its resume state, checkpoints and MLPerf
                          log intact when it is retried
  eval/step_N.json        also the output of rule evaluate (offline evaluation of one checkpoint);
                          the trainer writes it inline, so the rule runs only for checkpoints left
                          without one
  mlperf_check.txt        the compliance checker's verdict (rule check_mlperf_log)
  summary.txt             the printed summary (rule summarize_run)
"""


checkpoint train_model:
    """A Snakemake checkpoint: which checkpoints (and evaluations) a run leaves is known only once
    it has stopped, at the first checkpoint meeting the target or at max_samples."""
    input:
        config=f"{RUN_DIR}/config.yaml",
        latents=latents_manifests(),
        sd=checkpoint_file("sd"),
        clip=checkpoint_file("clip"),
        inception=checkpoint_file("inception"),
        prompts=f"{COCO}/val2014_30k.tsv",
        fid_stats=f"{COCO}/val2014_512x512_30k_stats.npz",
    output:
        f"{RUN_DIR}/summary.json",
    params:
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
        launcher=launcher(),
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    threads: LAUNCH["nproc_per_node"] * LAUNCH["cpus_per_task"]
    resources:
        **launch_resources(),
    conda:
        ENV
    shell:
        "{params.launcher} workflow_scripts/train.py --config {input.config} --run-dir {params.run_dir}"
        " 2>&1 | tee {log}"


rule evaluate:
    """Offline evaluation of one saved checkpoint, named by its file (MLPerf allows evaluating
    checkpoints in any order, outside the timed run). The checkpoint is ancient(): a step's
    weights never change, so only a missing result makes this job run."""
    input:
        checkpoint=ancient(f"{RUN_DIR}/checkpoints/{{ckpt}}.pt"),
        config=f"{RUN_DIR}/config.yaml",
        sd=checkpoint_file("sd"),
        clip=checkpoint_file("clip"),
        inception=checkpoint_file("inception"),
        prompts=f"{COCO}/val2014_30k.tsv",
        fid_stats=f"{COCO}/val2014_512x512_30k_stats.npz",
    output:
        f"{RUN_DIR}/eval/{{ckpt}}.json",
    params:
        launcher=launcher(),
    log:
        f"{LOGS}/eval/{{run}}/{{ckpt}}.log",
    benchmark:
        f"{BENCH}/eval/{{run}}/{{ckpt}}.tsv"
    threads: LAUNCH["nproc_per_node"] * LAUNCH["cpus_per_task"]
    resources:
        **launch_resources(),
    conda:
        ENV
    shell:
        "{params.launcher} workflow_scripts/evaluate.py --config {input.config} --checkpoint {input.checkpoint}"
        " --out {output} 2>&1 | tee {log}"


rule check_mlperf_log:
    """The compliance checker on the run's MLPerf log (found beside summary.json, which the
    trainer writes last)."""
    input:
        f"{RUN_DIR}/summary.json",
    output:
        f"{RUN_DIR}/mlperf_check.txt",
    params:
        mlperf_log=lambda wildcards, input: os.path.join(os.path.dirname(input[0]), "mlperf.log"),
        division=config["mlperf"]["division"],
    log:
        f"{LOGS}/train/{{run}}.check.log",
    benchmark:
        f"{BENCH}/train/{{run}}.check.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python workflow_scripts/check_mlperf_log.py --log {params.mlperf_log} --division {params.division}"
        " --out {output} > {log} 2>&1"


rule summarize_run:
    input:
        summary=f"{RUN_DIR}/summary.json",
        check=f"{RUN_DIR}/mlperf_check.txt",
        evaluations=run_evaluations,
    output:
        f"{RUN_DIR}/summary.txt",
    params:
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/train/{{run}}.summary.log",
    benchmark:
        f"{BENCH}/train/{{run}}.summary.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "python workflow_scripts/summarize_run.py --run-dir {params.run_dir} --out {output} 2>&1 | tee {log}"
