#!/usr/bin/env bash
# Start (or check) a local two-node Slurm cluster with accounting, all on this host.
#
#   sudo slurm/start-cluster.sh            # logs on stderr, exports on stdout
#   eval "$(sudo slurm/start-cluster.sh)"  # ...and set SLURM_CONF in this shell
#   source /var/tmp/sft-slurm/env.sh       # later shells
#
# Idempotent: installs missing Debian packages, writes configs from the templates next to
# this script into the state dir, starts whichever of munged, mariadbd, slurmdbd,
# slurmctld, slurmd(node1), slurmd(node2) is not running yet, and waits until both nodes
# are up. Stop with slurm/stop-cluster.sh (it only stops what this script started).
#
# Environment:
#   SFT_SLURM_STATE      state dir (default /var/tmp/sft-slurm)
#   SFT_SLURM_PORT_BASE  first of 6 TCP ports on 127.0.0.1 (default 16817):
#                        +0 slurmctld, +1 slurmd node1, +2 slurmd node2, +3 slurmdbd, +4 mariadb
#   SFT_SLURM_NODE_CPUS  CPUs per node (default 2; oversubscription is fine)
#   SFT_SLURM_NODE_GPUS  fake (count-only) GPUs per node (default 2)
#   SFT_SLURM_NODE_MEM_MB  RealMemory per node (default: half the host memory, in MB)
#   SFT_SLURM_TIMEOUT    seconds to wait for the nodes (default 60)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${SFT_SLURM_STATE:-/var/tmp/sft-slurm}
PORT_BASE=${SFT_SLURM_PORT_BASE:-16817}
NODE_CPUS=${SFT_SLURM_NODE_CPUS:-2}
NODE_GPUS=${SFT_SLURM_NODE_GPUS:-2}
TIMEOUT=${SFT_SLURM_TIMEOUT:-60}
CLUSTER=sftlocal
NODES=(node1 node2)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

CTLD_PORT=$PORT_BASE
NODE1_PORT=$((PORT_BASE + 1))
NODE2_PORT=$((PORT_BASE + 2))
DBD_PORT=$((PORT_BASE + 3))
MYSQL_PORT=$((PORT_BASE + 4))

ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
CONF=$ETC/slurm.conf
MUNGE_SOCKET=$RUN/munge.socket
MYSQL_SOCKET=$RUN/mysqld.sock
T0=$SECONDS

log() { echo "[start-cluster +$((SECONDS - T0))s] $*" >&2; }
die() { echo "[start-cluster] ERROR: $*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root (the daemons and the package install need it)"

# ---------------------------------------------------------------- packages
pkg_installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }

POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
restore_policy() {
    if [[ -n $POLICY_BACKUP ]]; then
        mv -f "$POLICY_BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Keep the package scripts from starting the system services (we run our own daemons).
    if [[ -e $POLICY ]]; then
        POLICY_BACKUP=$(mktemp "$POLICY.sft-backup.XXXXXX")
        cp -p "$POLICY" "$POLICY_BACKUP"
    fi
    trap restore_policy EXIT
    printf '#!/bin/sh\n# temporary, written by sft slurm/start-cluster.sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
               -o Dpkg::Options::=--force-confold install --no-install-recommends)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${apt[@]}" "${missing[@]}" >"$STATE/apt.log" 2>&1; then
        log "apt-get install failed, running apt-get update and retrying"
        apt-get -q -o DPkg::Lock::Timeout=300 update >>"$STATE/apt.log" 2>&1 || true
        "${apt[@]}" "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
            || { tail -20 "$STATE/apt.log" >&2; die "apt-get install failed (see $STATE/apt.log)"; }
    fi
    restore_policy
    POLICY_BACKUP=""
    trap - EXIT
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || die "package $p did not install"; done
}

# ---------------------------------------------------------------- helpers
source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

wait_for() { # seconds description command...
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.2
    done
}

# Run a daemon without the fds this script inherited or opened (lock, callers' pipes).
# (Programs that do not daemonize themselves are run as "spawn setsid -f PROG".)
spawn() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-"; fi
        done
        exec "$@"
    )
}

render() { # template output
    sed -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@CTLD_HOST@|$HOST|g" \
        -e "s|@HOSTNAME@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@NODE1_PORT@|$NODE1_PORT|g" -e "s|@NODE2_PORT@|$NODE2_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@MYSQL_PORT@|$MYSQL_PORT|g" \
        -e "s|@NODE_CPUS@|$NODE_CPUS|g" -e "s|@NODE_GPUS@|$NODE_GPUS|g" -e "s|@GPU_FILES@|$GPU_FILES|g" -e "s|@NODE_MEM_MB@|$NODE_MEM_MB|g" \
        -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1" >"$2"
}

# ---------------------------------------------------------------- layout + configs
mkdir -p "$STATE"
chmod 755 "$STATE"
# One start/stop at a time (e.g. two pytest sessions starting the cluster together).
# Daemons are started through spawn, which closes every fd above 2 (this lock included).
exec 9>"$STATE/.lock"
flock -w 600 9 || die "could not lock $STATE/.lock"
install_packages

mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/spool/ctld" "$STATE/munge" "$STATE/mysql"
for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
# Fake GPU "devices" (see gres.conf.in): gres/gpu insists on a character device per GPU.
[[ $NODE_GPUS =~ ^[1-9][0-9]*$ ]] || die "SFT_SLURM_NODE_GPUS must be >= 1"
mkdir -p "$STATE/dev"
for ((i = 0; i < NODE_GPUS; i++)); do ln -sfn /dev/null "$STATE/dev/gpu$i"; done
if ((NODE_GPUS == 1)); then GPU_FILES=$STATE/dev/gpu0; else GPU_FILES="$STATE/dev/gpu[0-$((NODE_GPUS - 1))]"; fi
chmod 700 "$STATE/munge" "$STATE/mysql"
chmod 711 "$ETC"
chmod 755 "$RUN" "$LOG"

# Node names must resolve (MASTER_ADDR for torch.distributed is taken from the node list).
for n in "${NODES[@]}"; do
    if ! getent hosts "$n" >/dev/null; then
        log "adding '127.0.0.1 $n' to /etc/hosts"
        echo "127.0.0.1 $n  # sft local slurm cluster" >>/etc/hosts
    fi
done

HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST  # sft local slurm cluster" >>/etc/hosts
if [[ -n ${SFT_SLURM_NODE_MEM_MB:-} ]]; then
    NODE_MEM_MB=$SFT_SLURM_NODE_MEM_MB
else
    NODE_MEM_MB=$(awk '/^MemTotal:/ {m = int($2 / 1024 / 2); print (m < 1024 ? 1024 : m)}' /proc/meminfo)
fi
# Chosen once per state dir (see FirstJobId in slurm.conf.in); ~1 id per second, < MaxJobId.
if [[ ! -s $STATE/first_job_id ]]; then
    echo $(( ($(date +%s) - 1700000000) % 60000000 + 1000 )) >"$STATE/first_job_id"
fi
FIRST_JOB_ID=$(<"$STATE/first_job_id")
if [[ ! -s $ETC/db_pass ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$ETC/db_pass")
fi
DB_PASS=$(<"$ETC/db_pass")

# Render into temp files; a changed config restarts the Slurm daemons that are running.
CONFIG_CHANGED=0
for f in slurm.conf slurmdbd.conf gres.conf; do
    render "$HERE/$f.in" "$ETC/.$f.new"
    if ! cmp -s "$ETC/.$f.new" "$ETC/$f"; then
        CONFIG_CHANGED=1
    fi
done
if ((CONFIG_CHANGED)); then
    if [[ -e $RUN/slurmctld.pid || -e $RUN/slurmdbd.pid ]]; then
        log "config changed: restarting the Slurm daemons"
    fi
    stop_pids "$RUN/slurmctld.pid:slurmctld" "$RUN/slurmd.node1.pid:slurmd" "$RUN/slurmd.node2.pid:slurmd"
    stop_pids "$RUN/slurmdbd.pid:slurmdbd"
    for f in slurm.conf slurmdbd.conf gres.conf; do mv -f "$ETC/.$f.new" "$ETC/$f"; done
else
    rm -f "$ETC"/.*.new
fi
chmod 644 "$CONF" "$ETC/gres.conf"
chmod 600 "$ETC/slurmdbd.conf"
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- munged
if ! live_pid "$RUN/munged.pid" munged >/dev/null; then
    if [[ ! -s $STATE/munge/munge.key ]]; then
        (umask 077; dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$STATE/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "starting munged"
    spawn munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$STATE/munge/munged.seed" --num-threads=2 \
        || die "munged failed to start (see $LOG/munged.log)"
    wait_for 10 munge munge --socket="$MUNGE_SOCKET" -n \
        || die "munged does not answer on $MUNGE_SOCKET (see $LOG/munged.log)"
fi

# ---------------------------------------------------------------- mariadb
MYSQL_CLIENT=(mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root)
if ! live_pid "$RUN/mariadb.pid" mariadbd >/dev/null; then
    if [[ ! -d $STATE/mysql/mysql ]]; then
        log "initialising MariaDB data dir"
        mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    log "starting mariadbd"
    rm -f "$MYSQL_SOCKET"
    spawn setsid -f mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$MYSQL_SOCKET" \
        --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --max-connections=100 \
        </dev/null >>"$LOG/mariadb.log" 2>&1
    wait_for 60 mariadb "${MYSQL_CLIENT[@]}" -e 'SELECT 1' \
        || die "mariadbd did not come up (see $LOG/mariadb.log)"
    wait_for 5 mariadb-pid live_pid "$RUN/mariadb.pid" mariadbd || die "mariadbd wrote no pid file"
fi
"${MYSQL_CLIENT[@]}" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
    || die "could not create the slurm database user"

# ---------------------------------------------------------------- slurmdbd
dbd_up() { sacctmgr -n -P show cluster format=cluster; }
if ! live_pid "$RUN/slurmdbd.pid" slurmdbd >/dev/null; then
    log "starting slurmdbd"
    spawn slurmdbd || die "slurmdbd failed to start (see $LOG/slurmdbd.log)"
fi
wait_for 60 slurmdbd dbd_up || die "slurmdbd does not answer (see $LOG/slurmdbd.log)"
if ! dbd_up | grep -qx "$CLUSTER"; then
    log "creating accounting cluster $CLUSTER"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
fi
if [[ -z $(sacctmgr -n -P show account sft format=account) ]]; then
    sacctmgr -i add account sft Cluster="$CLUSTER" Description="sft launcher" Organization=sft >/dev/null \
        || die "sacctmgr add account failed"
fi
if [[ -z $(sacctmgr -n -P show assoc where account=sft user=root format=user) ]]; then
    sacctmgr -i add user root Account=sft Cluster="$CLUSTER" >/dev/null || die "sacctmgr add user failed"
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if ! live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    log "starting slurmctld"
    spawn slurmctld || die "slurmctld failed to start (see $LOG/slurmctld.log)"
fi
wait_for 30 slurmctld scontrol ping || die "slurmctld does not answer (see $LOG/slurmctld.log)"
for n in "${NODES[@]}"; do
    if ! live_pid "$RUN/slurmd.$n.pid" slurmd >/dev/null; then
        log "starting slurmd $n"
        spawn slurmd -N "$n" || die "slurmd $n failed to start (see $LOG/slurmd.$n.log)"
    fi
done

node_state() { sinfo -h -N -n "$1" -o '%t' 2>/dev/null | head -1; }
nodes_up() {
    local n s
    for n in "${NODES[@]}"; do
        s=$(node_state "$n")
        [[ $s == idle || $s == mix || $s == alloc || $s == comp ]] || return 1
    done
}
resumed=0
end=$((SECONDS + TIMEOUT))
until nodes_up; do
    if ((SECONDS > end)); then
        sinfo -N -l >&2 || true
        die "nodes did not become idle within ${TIMEOUT}s (see $LOG/slurmd.*.log, $LOG/slurmctld.log)"
    fi
    # A node left drained/down by an earlier run (slurmd killed, ...) is put back once.
    if ((!resumed && SECONDS - T0 > 5)); then
        for n in "${NODES[@]}"; do
            case $(node_state "$n") in
                drain | drng | down | fail)
                    log "resuming $n ($(node_state "$n"))"
                    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;;
            esac
        done
        resumed=1
    fi
    sleep 0.3
done

# Fallback for shells without SLURM_CONF: point the default config path at ours, but only
# when nothing else is there (never replace a real /etc/slurm/slurm.conf).
if [[ -d /etc/slurm && ( ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ) ]]; then
    if [[ ! -e /etc/slurm/slurm.conf || $(readlink /etc/slurm/slurm.conf) == "$STATE"/* ]]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
fi

cat >"$STATE/env.sh" <<EOF
# Local SFT Slurm cluster ($STATE). Source this file to use it.
export SLURM_CONF=$CONF
EOF
chmod 644 "$STATE/env.sh"
log "cluster '$CLUSTER' is up: partitions debug (default) and short; nodes ${NODES[*]}"
sinfo >&2
echo "export SLURM_CONF=$CONF"
