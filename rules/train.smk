"""Training, offline evaluation, the MLPerf log and its check, the run summary (SPEC sections 3-5).

A run directory <results>/<run>/ (<run> is run_name, or run_name/<i> for the runs of a submission):
  train_config.yaml, eval_config.yaml   the slices of the config that training and evaluation read
                                        (rule run_configs); editing any other key redoes neither
  train/summary.json    train_model's declared output, written last. Beside it the trainer keeps
                        state.pt, mlperf.log (the timed part), loss.csv, loss.png, deliberately
                        undeclared: Snakemake deletes the declared outputs of a failed job, and a
                        preempted or killed training must find its state intact when retried
  checkpoints/step_N.safetensors        UNet weights of every checkpoint (undeclared, as above)
  eval/step_N.json, step_N_samples.png  one evaluation per checkpoint (rule evaluate; the trainer
                                        itself in eval.mode inline)
  mlperf.log            the run's MLPerf log: training log + evaluations, run_stop at the first
                        checkpoint meeting the target (rule mlperf_log)
  mlperf_check.txt      the compliance checker's verdict on it (rule check_mlperf_log)
  summary.txt, eval.png the readable summary and the FID/CLIP plot (rule summarize_run)

Offline evaluation (eval.mode offline, the default) fans out one job per checkpoint, each a job of
its own shape (eval.launch). The checkpoints are known from the config (one every
ceil(checkpoint_every_samples / global batch) steps up to the sample budget), so a dry run lists
every evaluation before training starts. With eval.stop_on_target the evaluation jobs start with
the training job, wait for their checkpoint and the trainer stops once one of them meets the
target; evaluations of checkpoints never reached record that.
"""

rule train_model:
    """Train (or resume) one run: the timed part of the benchmark. One job of launch.nodes x
    launch.nproc_per_node ranks; preempted (SIGTERM/SIGUSR1) it saves its state and exits 75, and
    the retry resumes bit for bit."""
    input:
        config=f"{RUN_DIR}/train_config.yaml",
        latents=latent_index(),
        **(eval_inputs() if INLINE else verified_checkpoint("sd")),
        **({"text_embeddings": text_embeddings_index()} if PRECOMPUTED_TEXT else {}),
    output:
        f"{RUN_DIR}/train/summary.json",
    params:
        script=script("train.py"),
        run_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),
        launch=launcher(config["launch"]),
        inputs=lambda wildcards, input: ((EVAL_FLAGS if INLINE else "--sd-checkpoint {input.sd}")
                                         + (" --text-embeddings {input.text_embeddings}" if PRECOMPUTED_TEXT else "")
                                         ).format(input=input),
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    threads: launch_threads(config["launch"])
    resources:
        **launch_resources(config["launch"]),
    conda:
        ENV
    shell:
        "{params.launch} {params.script} --config {input.config} --run-dir {params.run_dir}"
        " --latents {input.latents} {params.inputs} > {log} 2>&1"


rule encode_text_embeddings:
    """Every caption of the training set encoded once by the frozen text encoder (train.text_embeddings:
    precomputed), so training skips the 354 M-parameter tower: one <shard>.ctx.safetensors per shard
    beside the index, at the training's precision and per-rank batch, bitwise what online encoding gives."""
    input:
        latents=latent_index(),
        config=f"{DATA}/config/text.yaml",
        **verified_checkpoint("sd"),
    output:
        text_embeddings_index(),
    params:
        script=script("encode_text_embeddings.py"),
        device=config["laion"]["latents"]["device"],
    log:
        f"{LOGS}/text_embeddings.log",
    benchmark:
        f"{BENCH}/text_embeddings.tsv"
    threads: 4
    resources:
        mem_mb=16000,
    conda:
        ENV
    shell:
        "python {params.script} --latents {input.latents} --sd-checkpoint {input.sd} --config {input.config}"
        " --out {output} --device {params.device} > {log} 2>&1"


rule evaluate:
    """FID, CLIP score and a sample grid of one checkpoint, outside the timed run (the MLPerf rules
    let checkpoints be evaluated offline, in any order). A job of eval.launch's shape."""
    input:
        config=f"{RUN_DIR}/eval_config.yaml",
        **({} if EARLY_STOP else {"trained": f"{RUN_DIR}/train/summary.json"}),
        **eval_inputs(),
    output:
        result=f"{RUN_DIR}/eval/{{ckpt}}.json",
        samples=report(f"{RUN_DIR}/eval/{{ckpt}}_samples.png", category="Sample images",
                       subcategory="{run}", caption="report/samples.rst"),
    params:
        script=script("evaluate.py"),
        checkpoint=lambda wildcards: f"{RESULTS}/{wildcards.run}/checkpoints/{wildcards.ckpt}.safetensors",
        wait=lambda wildcards: f"--wait-for-training {RESULTS}/{wildcards.run}/train/summary.json" if EARLY_STOP else "",
        launch=launcher(EVAL_LAUNCH),
        inputs=lambda wildcards, input: EVAL_FLAGS.format(input=input),
    log:
        f"{LOGS}/eval/{{run}}/{{ckpt}}.log",
    benchmark:
        f"{BENCH}/eval/{{run}}/{{ckpt}}.tsv"
    threads: launch_threads(EVAL_LAUNCH)
    resources:
        **launch_resources(EVAL_LAUNCH),
    conda:
        ENV
    shell:
        "{params.launch} {params.script} --config {input.config} --checkpoint {params.checkpoint}"
        " {params.inputs} {params.wait} --out {output.result} > {log} 2>&1"


rule mlperf_log:
    """The run's MLPerf log: the training log with each evaluated checkpoint's eval_start,
    eval_accuracy (FID, CLIP) and eval_stop, and run_stop at the first checkpoint meeting the target
    (status success; aborted if none). Evaluation time is not training time: see README, Timing."""
    input:
        trained=f"{RUN_DIR}/train/summary.json",
        evaluations=run_evaluations,
    output:
        f"{RUN_DIR}/mlperf.log",
    params:
        script=script("mlperf_log.py"),
        train_log=lambda wildcards, input: os.path.join(os.path.dirname(input.trained), "mlperf.log"),
        evaluations=lambda wildcards, input: f"--evaluations {input.evaluations}" if input.evaluations else "",
        fid_target=config["eval"]["fid_target"],
        clip_target=config["eval"]["clip_target"],
        mode=config["eval"]["mode"],
    log:
        f"{LOGS}/train/{{run}}.mlperf_log.log",
    benchmark:
        f"{BENCH}/train/{{run}}.mlperf_log.tsv"
    threads: 1
    resources:
        mem_mb=500,
    conda:
        ENV
    shell:
        "python {params.script} --mode {params.mode} --train-log {params.train_log} {params.evaluations}"
        " --fid-target {params.fid_target} --clip-target {params.clip_target} --out {output} > {log} 2>&1"


rule check_mlperf_log:
    """The official compliance checker (training, ruleset 5.0.0) on the run's MLPerf log."""
    input:
        f"{RUN_DIR}/mlperf.log",
    output:
        report(f"{RUN_DIR}/mlperf_check.txt", category="Results", subcategory="{run}", caption="report/check.rst"),
    params:
        script=script("check_mlperf_log.py"),
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
        "python {params.script} --log {input} --division {params.division} --out {output} > {log} 2>&1"


rule summarize_run:
    """The readable end of a run: throughput, loss, FID/CLIP per checkpoint with the targets, the
    time to train, the checker's verdict; and the plot of FID and CLIP per checkpoint."""
    input:
        trained=f"{RUN_DIR}/train/summary.json",
        mlperf_log=f"{RUN_DIR}/mlperf.log",
        check=f"{RUN_DIR}/mlperf_check.txt",
        evaluations=run_evaluations,
    output:
        text=report(f"{RUN_DIR}/summary.txt", category="Results", subcategory="{run}", caption="report/summary.rst"),
        plot=report(f"{RUN_DIR}/eval.png", category="Results", subcategory="{run}", caption="report/eval_plot.rst"),
        loss=report(f"{RUN_DIR}/loss.png", category="Results", subcategory="{run}", caption="report/loss.rst"),
    params:
        script=script("summarize_run.py"),
        run_dir=lambda wildcards, output: os.path.dirname(output.text),
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
        "python {params.script} --run-dir {params.run_dir} --out {output.text} --plot {output.plot} --loss {output.loss}"
        " > {log} 2>&1"


rule sample_images:
    """Images of one checkpoint for the prompts of sample.prompts, as a captioned grid:
    snakemake results/<run>/samples/step_N.png (python -m sdcore.sample does the same by hand)."""
    input:
        trained=f"{RUN_DIR}/train/summary.json",
        config=f"{RUN_DIR}/eval_config.yaml",
        **verified_checkpoint("sd"),
    output:
        f"{RUN_DIR}/samples/{{ckpt}}.png",
    params:
        checkpoint=lambda wildcards: f"{RESULTS}/{wildcards.run}/checkpoints/{wildcards.ckpt}.safetensors",
        prompts=" ".join(f"--prompt {shlex.quote(prompt)}" for prompt in config["sample"]["prompts"]),
        steps=config["sample"]["ddim_steps"],
        guidance=config["sample"]["guidance_scale"],
        seed=config["sample"]["seed"],
        precision=config["sample"]["precision"],
    log:
        f"{LOGS}/samples/{{run}}/{{ckpt}}.log",
    benchmark:
        f"{BENCH}/samples/{{run}}/{{ckpt}}.tsv"
    threads: 2
    resources:
        mem_mb=16000,
    conda:
        ENV
    shell:
        "python -m sdcore.sample --checkpoint {params.checkpoint} --config {input.config} --sd-checkpoint {input.sd}"
        " {params.prompts} --steps {params.steps} --guidance-scale {params.guidance} --seed {params.seed}"
        " --precision {params.precision} --out {output} > {log} 2>&1"
