#!/usr/bin/env bash
# Stop the local Slurm cluster started by slurm/start-cluster.sh.
#
#   sudo slurm/stop-cluster.sh [--keep-jobs] [--purge]
#
# Only the processes whose pid files start-cluster.sh left in $SFT_SLURM_STATE/run are
# stopped (after checking that each pid still runs the expected program). Safe to run when
# nothing is running.
#   default      cancel queued/running jobs first (so no job step outlives the cluster)
#   --keep-jobs  leave jobs alone: running steps keep going and slurmd re-attaches on restart
#   --purge      also delete the state dir (configs, job state, accounting DB, logs); the
#                next start then begins from scratch with a new FirstJobId
set -euo pipefail

STATE=${SFT_SLURM_STATE:-/var/tmp/sft-slurm}
RUN=$STATE/run
KEEP_JOBS=0
PURGE=0
for arg in "$@"; do
    case $arg in
        --keep-jobs) KEEP_JOBS=1 ;;
        --purge) PURGE=1 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "[stop-cluster] $*" >&2; }

source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

if [[ ! -d $RUN ]]; then
    log "nothing to stop ($RUN does not exist)"
else
    [[ $EUID -eq 0 ]] || { log "must run as root"; exit 1; }
    exec 9>"$STATE/.lock"
    flock -w 600 9 || { log "could not lock $STATE/.lock"; exit 1; }
    export SLURM_CONF=$STATE/etc/slurm.conf
    if ((!KEEP_JOBS)) && live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null \
        && [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
        log "cancelling jobs: $(squeue -h -o %A | tr '\n' ' ')"
        squeue -h -o %A | xargs -r scancel 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    slurmds=()
    for pf in "$RUN"/slurmd.*.pid; do
        if [[ -e $pf ]]; then slurmds+=("$pf:slurmd"); fi
    done
    # slurmctld talks to slurmdbd (munge) while shutting down, so those go last.
    stop_pids "${slurmds[@]}" "$RUN/slurmctld.pid:slurmctld"
    stop_pids "$RUN/slurmdbd.pid:slurmdbd"
    stop_pids "$RUN/mariadb.pid:mariadbd" "$RUN/munged.pid:munged"
fi

if ((PURGE)) && [[ -d $STATE ]]; then
    if [[ ! -e $STATE/first_job_id && ! -e $STATE/etc/slurm.conf ]]; then
        log "refusing to remove $STATE: it does not look like a start-cluster.sh state dir"
        exit 1
    fi
    log "removing $STATE"
    if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$STATE"/* ]]; then
        rm -f /etc/slurm/slurm.conf
    fi
    rm -rf -- "$STATE"
fi
log "done"
