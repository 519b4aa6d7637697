#!/usr/bin/env bash
# The demo pipeline on a live one-node SLURM cluster, through the same executor plugin and train
# launch path as profiles/slurm (here profiles/slurm-ci: demo config, CPU partition), with the
# training job interrupted three ways on the way.
#
# Checks, each failing the script:
#   1. every rule ran and the pipeline finished (snakemake's exit status);
#   2. training ran as one SLURM job with 2 tasks: slurmctld recorded the train job with
#      NumTasks=2, and ranks 0 and 1 of 2 logged that they took their rank from SLURM's task
#      environment (SLURM_PROCID/SLURM_NTASKS, "launcher slurm");
#   3. faults (unless SDCORE_SLURM_PREEMPT=0), each followed by Snakemake's retry of the train
#      job, which must log "resumed <run_dir> at step N (...), attempt K":
#        a. preemption: the first train job gets SIGTERM (scancel --signal=TERM) after its first
#           checkpoint; it saves train/state.pt and exits 75;
#        b. SIGKILL (scancel --signal=KILL) of the second train job, a few steps after it resumed:
#           nothing is saved, the retry resumes from the last state;
#        c. drain (unless SDCORE_SLURM_FAULTS=0): the node is drained (scontrol update
#           state=drain) during the third train job, which must keep running; then that job is
#           killed as a maintenance would; its retry must wait (PENDING) while the node is drained
#           and resume once the node is resumed (scontrol update state=resume);
#      every interrupted job must end FAILED (preempted, exit 75) or CANCELLED (killed), the last
#      one COMPLETED;
#   4. the run's MLPerf log passes the official checker in the open division;
#   5. when the local demo of the same checkout ran (demo/results/demo in the repository, CI step 3)
#      on the same latent shards, the faulted SLURM run ends bitwise equal to it: loss history
#      and the weights of every checkpoint.
# The cluster is stopped on every exit path. Prints the SLURM job table of the run and the resume
# lines. With SDCORE_SLURM_FAULT_TABLE=FILE, the faults' rows of benchmarks/faults.py's table are
# written there (python benchmarks/faults.py --slurm).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${SDCORE_SLURM_DEMO_DIR:-/tmp/sdcore-slurm-demo}
PREEMPT=${SDCORE_SLURM_PREEMPT:-1}
FAULTS=${SDCORE_SLURM_FAULTS:-1}
TABLE=${SDCORE_SLURM_FAULT_TABLE:-}
RUN=demo                                   # run_name of profiles/demo/demo-config.yaml
RUN_DIR=$WORK/demo/results/$RUN            # paths.results of the demo config: demo/results
TRAIN_LOG=$WORK/demo/logs/train/$RUN.log
LOCAL_RUN=$REPO/demo/results/$RUN          # the local demo of CI step 3, if it ran
export PATH=$REPO/.venv/bin:$PATH:/usr/sbin
export NO_ALBUMENTATIONS_UPDATE=1

log() { echo "[slurm-demo] $*"; }

# Rows of the fault table: name, tried; survived is decided at the end (or 0 on a failure).
ROWS=()
table_rows() {
    local survived=$1 row
    [[ -n $TABLE ]] || return 0
    : >"$TABLE"
    for row in "${ROWS[@]}"; do
        echo "| slurm: $row | 1 | $survived | 0 |" >>"$TABLE"
    done
}
fail() {
    echo "[slurm-demo] FAILED: $*" >&2
    table_rows 0
    exit 1
}

WATCHER_PID=""
NODE=""
# End process $1 and its descendants (the watcher's loops run in command-substitution subshells).
kill_tree() {
    local child
    for child in $(pgrep -P "$1" || true); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
cleanup() {
    local status=$?
    if [[ -n $WATCHER_PID ]]; then kill_tree "$WATCHER_PID"; fi
    if [[ -n $NODE ]]; then scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true; fi
    bash "$REPO/.ci/slurm/stop_cluster.sh" || status=1
    exit "$status"
}
trap cleanup EXIT

# SLURM job ids of this run's train jobs, oldest first (the plugin puts the rule in the comment).
train_job_ids() { squeue -h --states=all -o '%i %k' | awk '$2 ~ /^rule_train_model/ {print $1}' | sort -n; }
job_state() { squeue -h --states=all -j "$1" -o '%T' 2>/dev/null | head -n1; }
loss_rows() { local n; n=$(wc -l <"$RUN_DIR/train/loss.csv" 2>/dev/null || echo 1); echo $((n - 1)); }
node_state() { sinfo -h -N -n "$NODE" -o '%T' | head -n1; }

# The train job after $1 (or the first), once it runs.
next_train_job() {
    local after=${1:-0} job
    while :; do
        job=$(train_job_ids | awk -v a="$after" '$1 > a' | head -n1)
        if [[ -n $job && $(job_state "$job") == RUNNING ]]; then echo "$job"; return; fi
        sleep 1
    done
}

RESUMED_RE="resumed .* at step [0-9]+ \([0-9]+ samples\), attempt [0-9]+"
# Wait until the running job's train log says it resumed (each job rewrites the log).
wait_resumed() { until grep -qE "$RESUMED_RE" "$TRAIN_LOG" 2>/dev/null; do sleep 1; done; }
# Once job $1 has stopped, keep its train log as train_job_$1.log (the retry writes a new one).
keep_log() {
    local job=$1
    for _ in $(seq 120); do [[ $(job_state "$job") == RUNNING ]] || break; sleep 0.5; done
    mv "$TRAIN_LOG" "$WORK/train_job_$job.log"
}

# The faults, in the background while Snakemake drives the pipeline; writes what it did to
# $WORK/faults.log (the checks at the end read it).
inject_faults() {
    local job1 job2 job3 job4 rows
    job1=$(next_train_job)
    until compgen -G "$RUN_DIR/checkpoints/step_*.safetensors" >/dev/null; do sleep 1; done
    log "fault a: preempting train job $job1 (SIGTERM to its tasks) after its first checkpoint"
    scancel --signal=TERM "$job1"
    echo "preempted $job1" >>"$WORK/faults.log"
    keep_log "$job1"

    job2=$(next_train_job "$job1")
    wait_resumed
    rows=$(($(loss_rows) + 6))
    until (($(loss_rows) >= rows)); do sleep 0.5; done
    log "fault b: SIGKILL of train job $job2 at step $(loss_rows)"
    scancel --signal=KILL "$job2"
    echo "killed $job2" >>"$WORK/faults.log"
    keep_log "$job2"
    [[ $FAULTS == 1 ]] || return 0

    job3=$(next_train_job "$job2")
    wait_resumed
    rows=$(($(loss_rows) + 6))
    until (($(loss_rows) >= rows)); do sleep 0.5; done
    log "fault c: draining node $NODE during train job $job3 (step $(loss_rows))"
    scontrol update NodeName="$NODE" State=DRAIN Reason="sdcore fault campaign"
    sleep 5
    echo "drained $job3 $(job_state "$job3") $(node_state)" >>"$WORK/faults.log"
    log "node $NODE is $(node_state); job $job3 is $(job_state "$job3"); now killing it as a maintenance would"
    scancel --signal=KILL "$job3"
    keep_log "$job3"
    until job4=$(train_job_ids | awk -v a="$job3" '$1 > a' | head -n1) && [[ -n $job4 ]]; do sleep 1; done
    sleep 15
    echo "waiting $job4 $(job_state "$job4") $(node_state)" >>"$WORK/faults.log"
    log "retry $job4 is $(job_state "$job4") on the drained node; resuming the node"
    scontrol update NodeName="$NODE" State=RESUME
    echo "resumed-node $job4" >>"$WORK/faults.log"
}

bash "$REPO/.ci/slurm/start_cluster.sh"
NODE=$(sinfo -h -N -o '%N' | head -n1)
# A copy of the workflow, so this run neither sees nor disturbs outputs of a local demo in the
# repository (paths in the workflow are relative to its directory; sdcore is imported from the
# repository's editable install).
rm -rf "$WORK"
mkdir -p "$WORK"
# (sdcore/ too: rules take some of its modules as inputs, e.g. sdcore/fid.py)
cp -r "$REPO"/{Snakefile,config.yaml,rules,profiles,workflow_scripts,envs,sdcore} "$WORK"/
find "$WORK/sdcore" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK"
RETRIES=1
if [[ $PREEMPT == 1 ]]; then
    ROWS+=("scancel --signal=TERM of the train job after its first checkpoint (preemption), retry resumes")
    ROWS+=("scancel --signal=KILL of the resumed train job, retry resumes")
    RETRIES=2
    if [[ $FAULTS == 1 ]]; then
        ROWS+=("scontrol update state=drain during training (job runs on), job killed, retry waits for state=resume and resumes")
        RETRIES=3
    fi
    inject_faults &
    WATCHER_PID=$!
fi

log "snakemake --profile profiles/slurm-ci --retries $RETRIES (in $WORK)"
start=$(date +%s)
snakemake --profile profiles/slurm-ci --retries "$RETRIES" --slurm-logdir "$WORK/slurm_logs" \
    || fail "the pipeline failed on SLURM"
log "pipeline finished in $(($(date +%s) - start)) s"

log "SLURM job table of the run:"
squeue --states=all --sort=i -o '%.6i %.40k %.10T %.9M %.6D %.9C %.8l %R' | tee "$WORK/slurm_jobs.txt"

mapfile -t train_jobs < <(train_job_ids)
((${#train_jobs[@]} >= 1)) || fail "no train job was submitted to SLURM"
final_job=${train_jobs[-1]}
scontrol show job "$final_job" | tee "$WORK/train_job.txt"
grep -q "NumTasks=2 " "$WORK/train_job.txt" || fail "train job $final_job was not allocated 2 tasks"
grep -q "JobState=COMPLETED" "$WORK/train_job.txt" || fail "the last train job $final_job did not complete"

[[ -f $TRAIN_LOG ]] || fail "no train log at $TRAIN_LOG"
# sdcore.train logs on every rank where its rank came from: "launcher slurm" means from
# SLURM_PROCID/SLURM_NTASKS, which only srun sets.
for rank in 0 1; do
    grep -E "rank $rank of 2 \(local rank $rank of 2, launcher slurm," "$TRAIN_LOG" \
        || fail "rank $rank did not log a SLURM launch with 2 tasks in $TRAIN_LOG"
done
log "training ran as 2 SLURM tasks of job $final_job"

if [[ $PREEMPT == 1 ]]; then
    expected=$((RETRIES + 1))
    ((${#train_jobs[@]} == expected)) || fail "expected $expected train jobs (one per fault, then the last), got: ${train_jobs[*]}"
    # the preempted job exits 75 (FAILED); a job whose tasks got SIGKILL from scancel ends CANCELLED
    for job in "${train_jobs[@]:0:RETRIES}"; do
        grep -qE "JobState=(FAILED|CANCELLED)" <(scontrol show job "$job") || fail "the interrupted train job $job did not fail"
    done
    grep -q "JobState=FAILED" <(scontrol show job "${train_jobs[0]}") || fail "the preempted train job did not fail"
    cat "$WORK/faults.log"
    grep -q "preempted at step" "$WORK/train_job_${train_jobs[0]}.log" \
        || fail "the first train job did not save its state on SIGTERM"
    if [[ $FAULTS == 1 ]]; then
        grep -qiE "^drained [0-9]+ RUNNING drain" "$WORK/faults.log" \
            || fail "the train job did not keep running on the draining node"
        grep -qiE "^waiting [0-9]+ PENDING drain" "$WORK/faults.log" \
            || fail "the retry did not wait while the node was drained"
    fi
    log "resume lines of the retried train jobs:"
    for job in "${train_jobs[@]:1}"; do
        file=$WORK/train_job_$job.log
        [[ $job == "$final_job" ]] && file=$TRAIN_LOG
        line=$(grep -oE "$RESUMED_RE" "$file" | tail -n1) || fail "train job $job did not resume"
        echo "  job $job: $line"
    done
    log "train jobs ${train_jobs[*]}: each fault was resumed by Snakemake's retry; job $final_job finished the run"
fi

log "MLPerf compliance check (open division) of $RUN_DIR/mlperf.log"
python -m mlperf_logging.compliance_checker --usage training --ruleset 5.0.0 \
    --log_output "$WORK/mlperf_check_open.txt" "$RUN_DIR/mlperf.log" \
    || fail "the MLPerf log does not pass the checker (see $WORK/mlperf_check_open.txt)"

if [[ -f $LOCAL_RUN/train/loss.csv ]]; then
    log "comparing with the local demo run in $LOCAL_RUN"
    python - "$WORK/demo" "$REPO/demo" <<'EOF' || fail "the faulted SLURM run differs from the local demo run"
import hashlib, sys
from pathlib import Path

import torch

from sdcore.checkpoint import load_unet

slurm, local = Path(sys.argv[1]), Path(sys.argv[2])
shards = lambda root: {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted((root / "data/laion400m/latents").rglob("*.tar"))}
if shards(slurm) != shards(local):
    print("  the latent shards differ from the local demo's: no comparison")
    sys.exit(0)
run, ref = slurm / "results/demo", local / "results/demo"
assert (run / "train/loss.csv").read_text() == (ref / "train/loss.csv").read_text(), "loss.csv differs"
for path in sorted((ref / "checkpoints").glob("step_*.safetensors")):
    a, b = load_unet(run / "checkpoints" / path.name)[0], load_unet(path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{path.name} differs"
print("  loss history and every checkpoint bitwise equal to the local demo run")
EOF
fi
cat "$RUN_DIR/summary.txt"
table_rows 1
log "all SLURM demo checks passed"
