#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing slurm/submit.sh for real (CI, as root, no
# systemd needed). The node is this machine under its short hostname; it plays every role.
#   bash scripts/slurm_local.sh install   apt-get the Debian Slurm packages (no-op when present)
#   bash scripts/slurm_local.sh start     write slurm.conf, start slurmctld + slurmd, wait for idle
#   bash scripts/slurm_local.sh stop      cancel all jobs, stop the daemons (and munged if ours)
#   bash scripts/slurm_local.sh status    sinfo + squeue
# Environment:
#   SLURM_LOCAL_DIR      config, state, spool, pid and log files (default /tmp/gymtrl-slurm)
#   SLURM_LOCAL_AUTH     none (default: auth/none + cred/none, no munged) or munge
#   SLURM_LOCAL_TIMEOUT  seconds start waits for the node to be idle (default 60)
#   SLURM_LOCAL_CTLD_PORT / SLURM_LOCAL_SLURMD_PORT   (default 6817 / 6818)
# Clients (sbatch, srun, squeue...) find the config through /etc/slurm/slurm.conf, a symlink to
# $SLURM_LOCAL_DIR/slurm.conf that start makes when that path is free or already a symlink;
# otherwise export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf (start prints it).
# Each cold start wipes the saved state (jobs, job ids restart at 1); logs are kept under log/.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/gymtrl-slurm}
AUTH=${SLURM_LOCAL_AUTH:-none}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin  # slurmctld, slurmd, munged live in sbin

say() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

node_name() { local h; h=$(uname -n); echo "${h%%.*}"; }

daemon_pid() {  # daemon_pid NAME: the pid in $DIR/run/NAME.pid if that process is NAME, else fail
    local pid comm
    pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$1"* ]] || return 1
    echo "$pid"
}

pid_alive() { daemon_pid "$1" >/dev/null; }  # pid_alive NAME

log_tails() {
    local f logs=("$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log)
    [[ $AUTH != munge ]] || logs+=(/var/log/munge/munged.log)
    for f in "${logs[@]}"; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        grep -v -e 'pmix' -e 'MPI: Cannot create context' "$f" | tail -n 25 >&2  # (PMIx: not installed, harmless)
    done
}

node_state() { sinfo -h -N -n "$(node_name)" -o %T 2>/dev/null | head -n 1; }

installed() {
    local b
    for b in slurmctld slurmd sbatch srun sinfo squeue scontrol; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
    if [[ $AUTH == munge ]]; then command -v munged >/dev/null 2>&1 || return 1; fi
    return 0
}

# (no sinfo -V here: without a config file Slurm clients try DNS SRV records for a configless
# controller, which can hang for a minute)
pkg_version() { dpkg-query -W -f='slurm ${Version}' slurmctld 2>/dev/null || echo 'slurm (not from dpkg)'; }

cmd_install() {
    if installed; then
        say "Slurm already installed ($(pkg_version))"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install needs root (apt-get)"
    say "installing ${PACKAGES[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' postinst would start munged/slurmctld/slurmd through init.d with the default
    # /etc/slurm/slurm.conf (absent, so the postinst fails); a policy-rc.d saying 101 stops that.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold "${PACKAGES[@]}")
    if ! "${apt[@]}" >/tmp/slurm_local_apt.log 2>&1; then
        say "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>/tmp/slurm_local_apt.log 2>&1 || true
        "${apt[@]}" >>/tmp/slurm_local_apt.log 2>&1 \
            || { tail -n 30 /tmp/slurm_local_apt.log >&2; die "apt-get install failed (log: /tmp/slurm_local_apt.log)"; }
    fi
    installed || die "Slurm binaries still missing after apt-get (log: /tmp/slurm_local_apt.log)"
    say "installed $(pkg_version)"
}

write_conf() {
    local node cpu_line mem
    node=$(node_name)
    # slurmd -C prints this machine's real topology: NodeName=x CPUs=.. Boards=.. ... RealMemory=..
    cpu_line=$(slurmd -C 2>/dev/null | head -n 1) || true
    if [[ $cpu_line != NodeName=* ]]; then
        mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
        cpu_line="NodeName=$node CPUs=$(nproc) RealMemory=$mem"
    fi
    cpu_line="NodeName=$node ${cpu_line#NodeName=* }"  # the name slurmd -N gets
    local auth_type=auth/none cred_type=cred/none
    if [[ $AUTH == munge ]]; then auth_type=auth/munge; cred_type=cred/munge; fi
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster on $node.
ClusterName=gymtrl
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=$auth_type
CredType=$cred_type
# A requeued job may start again once its old credential expires (default 120 s): 10 s keeps tests short.
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
MinJobAge=600
InactiveLimit=0
KillWait=30
$cpu_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    : >"$DIR/plugstack.conf"
}

link_etc_conf() {
    mkdir -p /etc/slurm
    if [[ -L $ETC_CONF || ! -e $ETC_CONF ]]; then
        ln -sfn "$CONF" "$ETC_CONF"
    elif ! [[ $ETC_CONF -ef $CONF ]]; then
        say "WARNING: $ETC_CONF is someone else's file; clients need: export SLURM_CONF=$CONF"
    fi
}

ensure_host_resolves() {
    local node
    node=$(node_name)
    if ! getent hosts "$node" >/dev/null 2>&1; then
        say "hostname $node does not resolve; adding '127.0.0.1 $node' to /etc/hosts"
        echo "127.0.0.1 $node" >>/etc/hosts
    fi
}

start_munged() {
    local sock=/run/munge/munge.socket.2
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running"
        return 0
    fi
    command -v munged >/dev/null 2>&1 || die "munged missing: run '$0 install'"
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --socket="$sock" --pid-file=/run/munge/munged.pid \
        --log-file=/var/log/munge/munged.log || { log_tails; die "munged failed to start"; }
    local i
    for ((i = 0; i < 50; i++)); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$DIR/run/munged.pid"  # so that stop stops it
            return 0
        fi
        sleep 0.1
    done
    log_tails
    die "munged started but munge -n | unmunge fails"
}

healthy() {  # both daemons ours and alive, controller answers, node usable
    pid_alive slurmctld && pid_alive slurmd || return 1
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    [[ $(node_state) =~ ^(idle|allocated|mixed|completing)$ ]]
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "start needs root (slurmd runs jobs as their users)"
    installed || die "Slurm not installed: run '$0 install' first"
    [[ $AUTH == none || $AUTH == munge ]] || die "SLURM_LOCAL_AUTH must be none or munge, not '$AUTH'"
    if [[ -f $CONF ]] && healthy; then
        say "already running: node $(node_name) is $(node_state) (config $CONF)"
        return 0
    fi
    if pid_alive slurmctld || pid_alive slurmd; then
        say "daemons up but not healthy; restarting"
        cmd_stop
    fi
    local t0=$SECONDS
    say "cold start in $DIR (fresh state; earlier logs moved to log/old)"
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log/old"
    local f
    for f in "$DIR"/log/*.log; do
        if [[ -e $f ]]; then mv -f "$f" "$DIR/log/old/"; fi
    done
    ensure_host_resolves
    write_conf
    link_etc_conf
    [[ $AUTH == munge ]] && start_munged
    say "starting slurmctld"
    slurmctld -c -f "$CONF" || { log_tails; die "slurmctld failed to start"; }
    say "starting slurmd (node $(node_name))"
    slurmd -f "$CONF" -N "$(node_name)" || { log_tails; die "slurmd failed to start"; }
    say "waiting up to ${TIMEOUT}s for node $(node_name) to be idle"
    local state=""
    while ((SECONDS - t0 < TIMEOUT)); do
        state=$(node_state || true)
        if [[ $state == idle ]]; then
            say "ready in $((SECONDS - t0))s: partition debug, node $(node_name), $(sinfo -h -N -o '%c CPUs, %m MB' | head -n 1)"
            [[ $ETC_CONF -ef $CONF ]] || say "clients need: export SLURM_CONF=$CONF"
            return 0
        fi
        if ((SECONDS - t0 > 3)) && ! { pid_alive slurmctld && pid_alive slurmd; }; then
            echo "[slurm_local] ERROR: slurmctld or slurmd exited" >&2
            break
        fi
        sleep 0.5
    done
    echo "[slurm_local] ERROR: node $(node_name) not idle after $((SECONDS - t0))s (state: '${state:-unknown}')" >&2
    sinfo -N -l >&2 2>&1 || true
    scontrol show node "$(node_name)" >&2 2>&1 || true
    log_tails
    exit 1
}

stop_daemon() {  # stop_daemon NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local name=$1 pid i
    pid=$(daemon_pid "$name") || { rm -f "$DIR/run/$name.pid"; return 1; }
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) still running after 15 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/run/$name.pid"
}

cmd_stop() {
    local any=0 name i
    if pid_alive slurmctld && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        say "cancelling jobs"
        squeue -h -o %i 2>/dev/null | xargs -r scancel --full >/dev/null 2>&1 || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    for name in slurmd slurmctld munged; do
        if stop_daemon "$name"; then any=1; fi
    done
    if ((any)); then say "stopped"; else say "not running"; fi
}

cmd_status() {
    if ! pid_alive slurmctld; then
        say "slurmctld not running (dir $DIR)"
        pid_alive slurmd && say "slurmd running (pid $(daemon_pid slurmd))"
        return 1
    fi
    say "slurmctld pid $(daemon_pid slurmctld), slurmd $(pid_alive slurmd && echo "pid $(daemon_pid slurmd)" || echo 'NOT running'), config $CONF"
    sinfo
    squeue
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 install|start|stop|status   (env: SLURM_LOCAL_DIR, SLURM_LOCAL_AUTH=none|munge)" >&2
        exit 2
        ;;
esac
