#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (munge + slurmctld + slurmd) from Debian's packages.
#
#   slurm/local_cluster.sh up       install the packages if missing, write the config, start the daemons
#   slurm/local_cluster.sh down     stop the daemons this script started (their pid files)
#   slurm/local_cluster.sh status   daemons, node state and queue; exit 0 only when the node accepts jobs
#
# Needs root and apt-get. Idempotent: `up` on a running cluster only checks it. The recipe is the one verified
# in the team's ENVIRONMENT.md (Debian 12, slurm 22.05): no accounting daemon (sacct does not work; submitit
# only warns), proctrack/linuxproc, task/none, cons_tres with CR_Core, one default partition. KillWait is short
# so a requeued or cancelled job is gone quickly. Paths can be moved with SPARK_SLURM_STATE (state, spool,
# logs, pid files; default /var/lib/spark-slurm).
set -euo pipefail

STATE=${SPARK_SLURM_STATE:-/var/lib/spark-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
MUNGE_PID=$MUNGE_SOCKET_DIR/munged.pid
CTLD_PID=$STATE/slurmctld.pid
SLURMD_PID=$STATE/slurmd.pid
PARTITION=${SPARK_SLURM_PARTITION:-debug}
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # alive PIDFILE: the process named in the pid file runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' needs root (it installs packages and starts daemons)"
}

install_packages() {
    local missing=()
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    apt-get update -qq
    # No init system runs services here: policy-rc.d stops the packages' scripts from trying to start them.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    [[ $created_policy -eq 1 ]] && rm -f "$policy"
    return 0
}

start_munge() {
    if [[ ! -s $KEY ]]; then
        log "creating the munge key $KEY"
        install -d -o munge -g munge -m 700 /etc/munge
        dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
    fi
    chown munge:munge "$KEY" && chmod 400 "$KEY"
    install -d -o munge -g munge -m 755 "$MUNGE_SOCKET_DIR"
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    if ! alive "$MUNGE_PID"; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    fi
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

write_config() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    install -d -m 755 "$CONF_DIR" "$STATE" "$STATE/ctld" "$STATE/d" "$STATE/log"
    local tmp
    tmp=$(mktemp "$CONF_DIR/slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
# Written by slurm/local_cluster.sh: a one-node cluster for the SparK suite's sweep and its tests.
ClusterName=spark-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Quick turnover: SIGKILL 10 s after SIGTERM (time for a stage to finish its step and save), finished jobs
# purged after 5 minutes, scheduler every few seconds.
KillWait=10
MinJobAge=300
SchedulerParameters=sched_interval=2,bf_interval=5
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    chmod 644 "$tmp" && mv "$tmp" "$CONF"
    log "wrote $CONF ($host: $cpus CPUs, ${mem_mb} MB)"
    return 0
}

node_state() {
    sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

wait_for_node() {
    local state=""
    for _ in $(seq 60); do
        state=$(node_state)
        case $state in
            idle*|mixed*|allocated*|completing*) return 0 ;;
            down*|drain*|fail*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "the node did not come up (state '${state:-unknown}'; see $STATE/log/)"
}

cmd_up() {
    need_root up
    install_packages
    start_munge
    local changed=0
    write_config && changed=1
    if [[ $changed -eq 1 ]] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
        log "config changed: restarting the daemons"
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    if ! alive "$CTLD_PID"; then
        log "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! alive "$SLURMD_PID"; then
        log "starting slurmd"
        /usr/sbin/slurmd
    fi
    wait_for_node
    log "up: partition $PARTITION, node $(hostname -s) $(node_state)"
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    alive "$2" || return 0
    local pid
    pid=$(cat "$2")
    log "stopping $1 (pid $pid)"
    kill "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    die "$1 (pid $pid) did not stop"
}

cmd_down() {
    need_root down
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_PID"
    log "down"
}

cmd_status() {
    local ok=0
    for entry in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        if alive "${entry#*:}"; then
            echo "${entry%%:*}: running (pid $(cat "${entry#*:}"))"
        else
            echo "${entry%%:*}: not running"
            ok=1
        fi
    done
    if command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then
        sinfo -N -o '%N %P %T %c %m'
        squeue -o '%i %j %T %M %r'
        case $(node_state) in idle*|mixed*|allocated*|completing*) ;; *) ok=1 ;; esac
    else
        echo "controller: not reachable"
        ok=1
    fi
    return $ok
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
