# Shared by start-cluster.sh and stop-cluster.sh (sourced; the caller defines `log`):
# daemons are tracked by pid files, and only a pid still running the expected program counts.

# pid from a pid file if that process is alive and runs the expected program.
live_pid() { # pidfile comm
    local pid
    [[ -r $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] && [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]] || return 1
    echo "$pid"
}

# True if any of the pids is still running (zombies count as gone).
alive() {
    local pid
    for pid in "$@"; do
        [[ -r /proc/$pid/status ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && return 0
    done
    return 1
}

# stop_pids PIDFILE:COMM ...: SIGTERM to each live one, wait (15 s), then SIGKILL; pid files removed.
stop_pids() {
    local spec pid pids=() i
    for spec in "$@"; do
        if pid=$(live_pid "${spec%%:*}" "${spec##*:}"); then
            log "stopping $(basename "${spec%%:*}" .pid) (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 150; i++)); do
        alive "${pids[@]}" || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if alive "$pid"; then
            log "pid $pid ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for spec in "$@"; do rm -f "${spec%%:*}"; done
}
