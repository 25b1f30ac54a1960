#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the integration tests and for trying the sbatch
# scripts: munged, slurmctld and two slurmd daemons simulating nodes pnode1 and pnode2, from
# Debian's packages (Slurm 22.05). Needs root; installs the packages with apt when missing.
#
#   slurm/local_cluster.sh start    # idempotent: a running cluster is left as it is
#   slurm/local_cluster.sh status   # exit 0 when both nodes are up and idle or busy
#   slurm/local_cluster.sh stop     # stops every daemon this script started and waits until
#                                   # they have exited (SIGKILL after PRETRAIN_SLURM_STOP_TIMEOUT
#                                   # s, default 30; exit 1 if one survives even that)
#
# Everything lives under $STATE (default /var/lib/pretrain-slurm); the config is also linked to
# /etc/slurm/slurm.conf (only when that file is absent or ours) so plain sbatch/squeue find it.
# Pitfalls already met are in ../shared/FINDINGS.md ("A real Slurm cluster on one machine").
set -euo pipefail

STATE=${PRETRAIN_SLURM_STATE:-/var/lib/pretrain-slurm}
CONF=$STATE/slurm.conf
NODES=(pnode1 pnode2)
CTLD_PORT=${PRETRAIN_SLURM_PORT:-6817}
# How long `stop` waits for a daemon to exit after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT=${PRETRAIN_SLURM_STOP_TIMEOUT:-30}
MARKER="# written by pretrain slurm/local_cluster.sh"

die() { echo "local_cluster: $*" >&2; exit 1; }
log() { echo "local_cluster: $*"; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
}

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install Slurm"
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurmctld slurmd slurm-client munge)
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
    } || die "apt-get could not install ${pkgs[*]}"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$STATE"/{ctld,log,spool} /etc/slurm
    cat > "$CONF" <<EOF
$MARKER
ClusterName=pretrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No systemd and no cgroups here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule at once (defaults wait seconds between passes).
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_min_interval=0
SelectType=select/linear
# A request no node can satisfy is refused at submission instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
KillWait=30
SlurmdTimeout=120
NodeName=pnode1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$(nproc) State=UNKNOWN
NodeName=pnode2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=pnode[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -e /etc/slurm/slurm.conf ]] || grep -qF "$MARKER" /etc/slurm/slurm.conf 2>/dev/null; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    else
        log "/etc/slurm/slurm.conf is not ours: left alone; export SLURM_CONF=$CONF to use this cluster"
    fi
    # Node names must resolve (MASTER_ADDR comes from `scontrol show hostnames`).
    grep -qE "^127\.0\.0\.1[[:space:]].*\bpnode1\b" /etc/hosts \
        || echo "127.0.0.1 ${NODES[*]}  $MARKER" >> /etc/hosts
}

start_munge() {
    if pgrep -x munged >/dev/null && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start"
}

nodes_ready() {
    # Both nodes answer and are schedulable (idle, mixed or allocated; not down/drained/unknown).
    local out
    out=$(SLURM_CONF=$CONF sinfo -h -N -o "%N %t" 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -qE "^$node (idle|mix|alloc|comp)\$" <<<"$out" || return 1
    done
}

start() {
    need_root
    install_packages
    if nodes_ready; then
        log "already running (nodes ${NODES[*]})"
        return
    fi
    write_config
    start_munge
    export SLURM_CONF=$CONF
    pid_alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF" </dev/null >/dev/null 2>&1
    for node in "${NODES[@]}"; do
        pid_alive "$STATE/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node" </dev/null >/dev/null 2>&1
    done
    for _ in $(seq 120); do
        if nodes_ready; then
            log "up: nodes ${NODES[*]} (config $CONF, logs $STATE/log)"
            return
        fi
        # A node that registered after a restart can be left DOWN with a stale reason.
        scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes did not come up; see $STATE/log"
}

# Exists and is not a zombie (`kill -0` succeeds on a zombie, and an exited daemon reparented to an
# init that does not reap stays one).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]
}

# wait_gone SECONDS PID...: 0 once every PID has exited; 1 after SECONDS, the rest in SURVIVORS.
wait_gone() {
    local deadline=$((SECONDS + $1)) pid
    shift
    while :; do
        SURVIVORS=()
        for pid in "$@"; do alive "$pid" && SURVIVORS+=("$pid"); done
        (( ${#SURVIVORS[@]} == 0 )) && return 0
        (( SECONDS < deadline )) || return 1
        sleep 0.1
    done
}

# terminate NAME PID...: SIGTERM, then wait until they are gone: a signal only asks, and whoever
# runs `stop` expects the daemons to have exited when it returns (a restart reuses their ports;
# the tests check that none is left). SIGKILL after $STOP_TIMEOUT s; fail if even that does not
# end them.
terminate() {
    local what=$1
    shift
    (( $# > 0 )) || return 0
    kill "$@" 2>/dev/null || true
    wait_gone "$STOP_TIMEOUT" "$@" && return 0
    log "$what (pid ${SURVIVORS[*]}) still running $STOP_TIMEOUT s after SIGTERM: SIGKILL"
    kill -9 "${SURVIVORS[@]}" 2>/dev/null || true
    wait_gone 10 "${SURVIVORS[@]}" && return 0
    die "stop failed: $what (pid ${SURVIVORS[*]}) still running 10 s after SIGKILL"
}

stop() {
    need_root
    local pids=() f pid
    for f in "$STATE"/slurmd-*.pid "$STATE"/slurmctld.pid; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        # A stale file (daemon gone, pid reused) must not make us kill an unrelated process.
        [[ $(ps -o comm= -p "$pid" 2>/dev/null) == slurm* ]] && pids+=("$pid")
    done
    # Also daemons started from our config whose pid file went missing.
    while read -r pid; do pids+=("$pid"); done < <(pgrep -f "^(slurmctld|slurmd) -f $CONF" || true)
    terminate "slurmctld/slurmd" "${pids[@]}"
    # Job processes left by a stopped slurmd (tests cancel their jobs; this is the safety net).
    mapfile -t pids < <(pgrep -x slurmstepd || true)
    terminate slurmstepd "${pids[@]}"
    # munged last: the Slurm daemons authenticate through it while they shut down.
    mapfile -t pids < <(pgrep -x munged || true)
    terminate munged "${pids[@]}"
    rm -f "$STATE"/*.pid
    log "stopped"
}

status() {
    if nodes_ready; then
        SLURM_CONF=$CONF sinfo -N
        return 0
    fi
    echo "local_cluster: not running" >&2
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
