#!/usr/bin/env bash
# A one-node Slurm on this machine (the node is "localhost"), to run cluster/slurm/train.sbatch
# for real in tests/test_slurm.py, or by hand:
#
#   scripts/slurm_local.sh start DIR    # install slurm-wlm + munge once, configure, start the daemons
#   export SLURM_CONF=DIR/slurm.conf    # for sinfo, sbatch, squeue, scontrol
#   scripts/slurm_local.sh stop DIR     # stop the daemons that `start DIR` started
#
# Everything it writes (config, munge key and socket, state, spool, pid files, logs) lives in DIR;
# only the Debian packages are installed system-wide. Runs as root (slurmd must). Built for
# containers: no systemd, no cgroups (proctrack/linuxproc, task/none). A second `start` with the
# daemons up only waits for the node. Each wait is bounded (SLURM_LOCAL_WAIT_S, default 60 s); an
# error goes to stderr as "slurm_local: WHAT" and the tail of the daemon's log. Ports: SLURMCTLD_PORT,
# SLURMD_PORT (default 6817, 6818).
set -euo pipefail

ACTION=${1:-}
DIR=${2:-}
[[ $ACTION == start || $ACTION == stop ]] && [[ -n $DIR ]] || {
    echo "usage: $0 start|stop DIR" >&2
    exit 64
}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}    # bound on each wait for a daemon or the node

die() {
    echo "slurm_local: $*" >&2
    exit 1
}

# The pid in DIR/NAME.pid if that process is alive.
running() {
    local pid
    pid=$(cat "$DIR/$1.pid" 2>/dev/null) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

log_tail() {
    printf '\n--- %s (last lines)\n' "$1"
    tail -n 15 "$1" 2>/dev/null || echo "(no log)"
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do  # the reverse of the start order
        pid=$(running "$name") || continue
        kill "$pid"
        if ! await bash -c "! kill -0 $pid"; then
            echo "slurm_local: $name ($pid) still up after ${WAIT_S}s: SIGKILL" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
        echo "stopped $name ($pid)"
    done
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    echo "installing slurm-wlm and munge (apt-get; log in $DIR/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 slurm-wlm munge)
    # A stale or empty package index is the usual failure: refresh it once and retry.
    if ! "${apt[@]}" >"$DIR/apt.log" 2>&1; then
        apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        "${apt[@]}" >>"$DIR/apt.log" 2>&1 \
            || die "apt-get could not install slurm-wlm: $(grep -v '^\s*$' "$DIR/apt.log" | tail -n 1)"
    fi
}

write_conf() {
    # The node as slurmd detects it (CPUs, RealMemory): declaring more would drain it.
    local hw cpus mem
    hw=$(slurmd -C 2>/dev/null | head -n 1) || true
    cpus=$(grep -o 'CPUs=[0-9]*' <<<"$hw" | cut -d= -f2) || true
    mem=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2) || true
    cpus=${cpus:-$(nproc)}
    mem=${mem:-$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))}
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster, everything under $DIR.
ClusterName=distkd-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups in a container: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A restarted slurmd takes its node back; finished jobs stay visible to scontrol for 10 minutes.
ReturnToService=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# Wait up to WAIT_S seconds for a command to succeed.
await() {
    local i
    for ((i = 0; i < 2 * WAIT_S; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

start_munged() {
    running munged >/dev/null && return 0
    if [[ ! -s $DIR/munge/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 755 "$DIR/munge"  # the socket is for every user; the key file stays 0600
    # --force: munged refuses, by default, paths whose parents (e.g. /tmp) others can write to.
    munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munge.seed" \
        || die "munged did not start:$(log_tail "$DIR/munged.log")"
    await bash -c "munge -n -S '$SOCKET' | unmunge -S '$SOCKET'" \
        || die "munged did not answer on $SOCKET in ${WAIT_S}s:$(log_tail "$DIR/munged.log")"
}

# The node is up and takes jobs: idle, or busy with a job when `start` runs a second time.
node_up() {
    [[ $(sinfo -h -n localhost -o %T 2>/dev/null) =~ ^(idle|mixed|allocated|completing)$ ]]
}

start() {
    [[ $(id -u) == 0 ]] || die "needs root: slurmd runs the jobs (and apt-get installs slurm-wlm)"
    install
    if ! running slurmctld >/dev/null || ! running slurmd >/dev/null; then
        write_conf
    fi
    export SLURM_CONF=$CONF
    start_munged
    if ! running slurmctld >/dev/null; then
        # -c: a fresh cluster every start, no jobs recovered from an earlier run's state
        slurmctld -c -f "$CONF" || die "slurmctld did not start:$(log_tail "$DIR/slurmctld.log")"
        await scontrol ping || die "slurmctld did not come up in ${WAIT_S}s:$(log_tail "$DIR/slurmctld.log")"
    fi
    if ! running slurmd >/dev/null; then
        # -N: the node is "localhost" whatever this machine's hostname is
        slurmd -c -N localhost -f "$CONF" || die "slurmd did not start:$(log_tail "$DIR/slurmd.log")"
    fi
    await node_up || die "slurmd did not come up: node localhost is" \
        "'$(sinfo -h -n localhost -o %T 2>/dev/null)', not idle, after ${WAIT_S}s:" \
        "$(log_tail "$DIR/slurmd.log")$(log_tail "$DIR/slurmctld.log")"
    sinfo
    echo "slurm is up: export SLURM_CONF=$CONF"
}

"$ACTION"
