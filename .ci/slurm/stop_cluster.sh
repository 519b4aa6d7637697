#!/usr/bin/env bash
# Stop the CI cluster that start_cluster.sh started and leave nothing of it running.
#
# Idempotent: safe to call when nothing runs (it is the EXIT trap of run_demo_on_slurm.sh). Jobs
# are cancelled first, so their processes end through SLURM; then the daemons are stopped by the
# process ids in their pid files, munged only if start_cluster.sh started it; last, the generated
# slurm.conf is removed. Logs stay in $SDCORE_SLURM_STATE for post-mortems.
set -uo pipefail

STATE=${SDCORE_SLURM_STATE:-/tmp/sdcore-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by sdcore .ci/slurm/start_cluster.sh"
MUNGED_PID=/run/munge/munged.pid

log() { echo "[stop_cluster] $*"; }

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Send SIGTERM to the process in pid file $1, wait up to 15 s, then SIGKILL it.
stop_pidfile() {
    local pidfile=$1 name=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 75); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    log "$name did not exit on SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    rm -f "$pidfile"
}

cancel_jobs() {
    pid_alive "$STATE/slurmctld.pid" || return 0
    local jobs
    jobs=$(squeue -h -t RUNNING,PENDING,COMPLETING,SUSPENDED,CONFIGURING -o '%i' 2>/dev/null | tr '\n' ' ')
    [[ -z ${jobs// /} ]] && return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 90); do
        [[ -z $(squeue -h -t RUNNING,PENDING,COMPLETING,SUSPENDED,CONFIGURING -o '%i' 2>/dev/null) ]] && return 0
        sleep 1
    done
    log "jobs still listed after 90 s"
}

export PATH=$PATH:/usr/sbin
cancel_jobs
stop_pidfile "$STATE/slurmd.pid" slurmd
stop_pidfile "$STATE/slurmctld.pid" slurmctld
# A step daemon outlives slurmd only if its job was stuck; end those ids explicitly.
for pid in $(pgrep -x slurmstepd || true); do
    log "ending leftover slurmstepd $pid"
    kill -KILL "$pid" 2>/dev/null
done
if [[ -e $STATE/munged.started-here ]]; then
    stop_pidfile "$MUNGED_PID" munged
    rm -f "$STATE/munged.started-here"
fi
if [[ -e $CONF ]] && grep -qF "$MARKER" "$CONF"; then
    rm -f "$CONF"
fi
left=$(for name in slurmctld slurmd slurmstepd; do pgrep -a -x "$name"; done)
if [[ -n $left ]]; then
    log "SLURM processes are still running:"; echo "$left"
    exit 1
fi
log "stopped; no SLURM daemon is running"
