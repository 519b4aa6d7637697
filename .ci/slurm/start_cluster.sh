#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on this machine, for CI.
#
# Why it looks like this: CI runs as root on a single sandboxed host without systemd, cgroups or a
# database, so the cluster uses process tracking through /proc, no task plugin and no accounting
# (squeue is the status command; MinJobAge is long so finished jobs stay visible to it). The node
# description is what `slurmd -C` reads off this host. slurm.conf goes to the default path
# /etc/slurm/slurm.conf because the Snakemake job step strips SLURM_* variables (SLURM_CONF too)
# before it runs a rule's shell, and the srun inside the train rule must still find the cluster.
# Daemon state and logs live in $SDCORE_SLURM_STATE; stop_cluster.sh undoes all of it.
set -euo pipefail

STATE=${SDCORE_SLURM_STATE:-/tmp/sdcore-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by sdcore .ci/slurm/start_cluster.sh"
PARTITION=cpu

log() { echo "[start_cluster] $*"; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd munged sinfo; do
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if ((${#missing[@]})); then
        log "installing Debian's slurmctld slurmd munge slurm-client (missing: ${missing[*]})"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already answers"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.started-here"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    log "munged did not come up"; exit 1
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script; refusing to overwrite it"; exit 1
    fi
    local host node_line
    host=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node_line=$(/usr/sbin/slurmd -C | head -n1)
    local real_memory=${node_line##*RealMemory=}
    real_memory=${real_memory%% *}
    # Leave headroom so a small fluctuation in free memory never drains the node.
    node_line="${node_line% RealMemory=*} RealMemory=$((real_memory * 9 / 10))"
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=sdcore-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=60
SlurmdTimeout=300
InactiveLimit=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for_idle_node() {
    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null | head -n1 || true)
        case $state in
            idle|mix|alloc) log "node is $state"; return ;;
            drain*|down*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "node never became idle (last state: '${state}')"
    tail -n 30 "$STATE/slurmctld.log" "$STATE/slurmd.log" || true
    exit 1
}

install_packages
export PATH=$PATH:/usr/sbin
if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid"; then
    log "cluster already running"
else
    # Clear whatever a half-started or crashed earlier cluster left, then start afresh.
    bash "$(dirname "${BASH_SOURCE[0]}")/stop_cluster.sh"
    rm -rf "$STATE/ctld" "$STATE/spool"
    mkdir -p "$STATE/ctld" "$STATE/spool"
    start_munge
    write_config
    slurmctld
    slurmd
fi
wait_for_idle_node
sinfo
