"""The runs of a submission (target submission): submission.runs independent runs of the benchmark,
results/<run_name>/<i>/, each with its own seed; every run's MLPerf log checked; the folder
the MLPerf tools expect (results/<system>/stable_diffusion/result_<i>.txt, systems/<system>.json),
with the package checker, the RCP checker and the result summarizer run on it."""

SUBMISSION_DIR = f"{RESULTS}/{RUN}/submission"


rule submission:
    """Target: every run trained, evaluated, logged and checked, and the submission folder checked."""
    input:
        f"{SUBMISSION_DIR}/checks/report.txt",


rule package_submission:
    """Lay the runs' MLPerf logs out as a submission and run the MLPerf package checker, RCP checker
    and result summarizer on it; their verdicts are the report (a failing verdict is reported, not hidden)."""
    input:
        logs=expand(f"{RESULTS}/{RUN}/{{i}}/mlperf.log", i=RUN_INDICES),
        checks=expand(f"{RESULTS}/{RUN}/{{i}}/mlperf_check.txt", i=RUN_INDICES),
        system=f"{SUBMISSION_DIR}/system.yaml",
    output:
        report(f"{SUBMISSION_DIR}/checks/report.txt", category="Submission", caption="report/submission.rst"),
    params:
        script=script("package_submission.py"),
        package=f"{SUBMISSION_DIR}/package",
        reports=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/submission/{RUN}.log",
    benchmark:
        f"{BENCH}/submission/{RUN}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "python {params.script} --logs {input.logs} --system {input.system}"
        " --package {params.package} --reports {params.reports} > {log} 2>&1"


rule submission_system:
    """The submission's identity: submitter, division, system description (submission.system)."""
    output:
        f"{SUBMISSION_DIR}/system.yaml",
    params:
        text=yaml_text({"division": config["mlperf"]["division"], "system": config["submission"]["system"]}),
    log:
        f"{LOGS}/submission/{RUN}.system.log",
    benchmark:
        f"{BENCH}/submission/{RUN}.system.tsv"
    threads: 1
    resources:
        mem_mb=100,
    conda:
        ENV
    shell:
        WRITE_TEXT
