#!/usr/bin/env bash
# The demo pipeline on a live one-node SLURM cluster, through the same executor plugin and train
# launch path as profiles/slurm (here profiles/slurm-ci: demo config, CPU partition).
#
# Checks, each failing the script:
#   1. every rule ran and the pipeline finished (snakemake's exit status);
#   2. training ran as one SLURM job with 2 tasks: slurmctld recorded the train job with
#      NumTasks=2, and ranks 0 and 1 of 2 logged that they took their rank from SLURM's task
#      environment (SLURM_PROCID/SLURM_NTASKS);
#   3. preemption (unless SDCORE_SLURM_PREEMPT=0): the first train job is sent SIGTERM after its
#      first checkpoint, exits after writing resume.pt, and Snakemake's retry resumes it in a second
#      SLURM job;
#   4. the run's MLPerf log passes the official checker in the open division.
# The cluster is stopped on every exit path. Prints the SLURM job table of the run.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${SDCORE_SLURM_DEMO_DIR:-/tmp/sdcore-slurm-demo}
PREEMPT=${SDCORE_SLURM_PREEMPT:-1}
RUN=demo                                   # run_name of profiles/demo/demo-config.yaml
RUN_DIR=$WORK/results/$RUN
export PATH=$REPO/.venv/bin:$PATH:/usr/sbin
export NO_ALBUMENTATIONS_UPDATE=1

log() { echo "[slurm-demo] $*"; }
fail() { echo "[slurm-demo] FAILED: $*" >&2; exit 1; }

WATCHER_PID=""
cleanup() {
    local status=$?
    if [[ -n $WATCHER_PID ]]; then kill "$WATCHER_PID" 2>/dev/null || true; fi
    bash "$REPO/.ci/slurm/stop_cluster.sh" || status=1
    exit "$status"
}
trap cleanup EXIT

# SLURM job ids of this run's train jobs, oldest first (the plugin puts the rule in the comment).
train_job_ids() { squeue -h --states=all -o '%i %k' | awk '$2 ~ /^rule_train_model/ {print $1}' | sort -n; }

# Send SIGTERM to the ranks of the first train job once it has written its first checkpoint, as a
# preemption would. Runs in the background while Snakemake drives the pipeline.
preempt_first_train_job() {
    local job
    while :; do
        job=$(train_job_ids | head -n1)
        if [[ -n $job ]] && compgen -G "$RUN_DIR/checkpoints/step_*.pt" >/dev/null; then
            log "preempting train job $job (SIGTERM to its tasks)"
            scancel --signal=TERM "$job"
            return
        fi
        sleep 1
    done
}

bash "$REPO/.ci/slurm/start_cluster.sh"
# A copy of the workflow, so this run neither sees nor disturbs outputs of a local demo in the
# repository (paths in the workflow are relative to its directory; sdcore is imported from the
# repository's editable install).
rm -rf "$WORK"
mkdir -p "$WORK"
cp -r "$REPO"/{Snakefile,config.yaml,rules,profiles,workflow_scripts,envs} "$WORK"/
cd "$WORK"
if [[ $PREEMPT == 1 ]]; then
    preempt_first_train_job &
    WATCHER_PID=$!
fi

log "snakemake --profile profiles/slurm-ci (in $WORK)"
start=$(date +%s)
snakemake --profile profiles/slurm-ci --slurm-logdir "$WORK/slurm_logs" \
    || fail "the pipeline failed on SLURM"
log "pipeline finished in $(($(date +%s) - start)) s"

log "SLURM job table of the run:"
squeue --states=all --sort=i -o '%.6i %.40k %.10T %.9M %.6D %.9C %.8l %R' | tee "$WORK/slurm_jobs.txt"

mapfile -t train_jobs < <(train_job_ids)
((${#train_jobs[@]} >= 1)) || fail "no train job was submitted to SLURM"
final_job=${train_jobs[-1]}
scontrol show job "$final_job" | tee "$WORK/train_job.txt"
grep -q "NumTasks=2 " "$WORK/train_job.txt" || fail "train job $final_job was not allocated 2 tasks"

train_log=$WORK/logs/train/$RUN.log
[[ -f $train_log ]] || fail "no train log at $train_log"
# sdcore.train logs on every rank where its rank came from: "launcher slurm" means from
# SLURM_PROCID/SLURM_NTASKS, which only srun sets.
for rank in 0 1; do
    grep -E "rank $rank of 2 \(local rank $rank, launcher slurm," "$train_log" \
        || fail "rank $rank did not log a SLURM launch with 2 tasks in $train_log"
done
log "training ran as 2 SLURM tasks of job $final_job"

if [[ $PREEMPT == 1 ]]; then
    ((${#train_jobs[@]} == 2)) || fail "expected a preempted and a resumed train job, got: ${train_jobs[*]}"
    grep -q "JobState=FAILED" <(scontrol show job "${train_jobs[0]}") \
        || fail "the preempted train job ${train_jobs[0]} did not fail"
    grep -E "resumed from .*resume.pt" "$train_log" || fail "the retried train job did not resume"
    log "train job ${train_jobs[0]} was preempted and job $final_job resumed it"
fi

log "MLPerf compliance check (open division) of $RUN_DIR/mlperf.log"
python -m mlperf_logging.compliance_checker --usage training --ruleset 5.0.0 \
    --log_output "$WORK/mlperf_check_open.txt" "$RUN_DIR/mlperf.log" \
    || fail "the MLPerf log does not pass the checker (see $WORK/mlperf_check_open.txt)"
cat "$RUN_DIR/summary.txt"
log "all SLURM demo checks passed"
