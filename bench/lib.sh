# shellcheck shell=bash
# The scaffolding bench/sync.sh and bench/throughput.sh share: a working directory kept on
# failure, the EXIT trap that stops what the bench started, the builds, a copy of the built worker
# that edits of the repository do not reload, a throwaway Postgres, the source table, the local
# provider and `wrangler dev`.
#
# Set BENCH_NAME (for messages, e.g. bench/sync.sh) and BENCH_TAG (say's prefix, and the
# temporary directory's name), source it after scripts/env.sh and scripts/lib.sh, check the
# argument with `N="$(bench_n "${1:-}")"`, then call `bench_init`, which sets
#   WORK (a temporary directory), LOGS ($WORK/logs), PG_DIR, PG_LOG
# and installs the EXIT trap. What the trap stops is registered by the variable that holds its
# pid (read when the bench exits, so a pid set later, or cleared after an early stop, counts):
#   bench_stop_on_exit wrangler WRANGLER_PID
#   bench_stop_on_exit process PROVIDER_PID
# Postgres started by `bench_start_pg` is stopped too. On success the working directory is
# removed (unless BENCH_KEEP is set); otherwise the logs are kept and their path printed.

say() {
    printf '==> [%s] %s\n' "$BENCH_TAG" "$*" >&2
}

die() {
    printf '%s: %s\n' "$BENCH_NAME" "$*" >&2
    exit 1
}

# Checks the bench's argument N (distinct values, default 100000, at least 1000) and prints it.
bench_n() {
    local n="${1:-100000}"
    case "$n" in
        '' | *[!0-9]*)
            echo "usage: $BENCH_NAME [N]   (N: number of distinct values, default 100000)" >&2
            exit 2
            ;;
    esac
    [ "$n" -ge 1000 ] || { echo "$BENCH_NAME: N must be at least 1000" >&2; exit 2; }
    printf '%s\n' "$n"
}

BENCH_STOP_WRANGLERS=()
BENCH_STOP_PROCESSES=()
PG_STARTED=""

# The working directory and the EXIT trap (see the top).
bench_init() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/embsync-$BENCH_TAG.XXXXXX")"
    # Postgres may run as another user (as root it must), who has to reach the data directory.
    chmod 755 "$WORK"
    LOGS="$WORK/logs"
    mkdir -p "$LOGS"
    PG_DIR="$WORK/pg"
    PG_LOG="$PG_DIR/postgres.log"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# bench_stop_on_exit wrangler|process VAR: stop the pid in $VAR when the bench exits.
bench_stop_on_exit() {
    case "$1" in
        wrangler) BENCH_STOP_WRANGLERS+=("$2") ;;
        process) BENCH_STOP_PROCESSES+=("$2") ;;
        *) die "bench_stop_on_exit: unknown kind $1" ;;
    esac
}

# shellcheck disable=SC2317 # Only called from the EXIT trap.
bench_cleanup() {
    local status=$? var
    trap - EXIT INT TERM
    # Wranglers first: their workers talk to the providers and Postgres.
    for var in "${BENCH_STOP_WRANGLERS[@]}"; do
        stop_wrangler "${!var:-}"
    done
    for var in "${BENCH_STOP_PROCESSES[@]}"; do
        stop_process "${!var:-}"
    done
    if [ -n "$PG_STARTED" ]; then
        "$REPO/scripts/pg.sh" stop "$PG_DIR" >&2 || true
    fi
    if [ "$status" -eq 0 ] && [ -z "${BENCH_KEEP:-}" ]; then
        rm -rf "$WORK"
    else
        [ -f "$PG_LOG" ] && cp "$PG_LOG" "$LOGS/postgres.log" 2>/dev/null
        rm -rf "$PG_DIR"
        echo "$BENCH_NAME: logs kept in $LOGS" >&2
        [ "$status" -eq 0 ] || echo "$BENCH_NAME failed (exit status $status)" >&2
    fi
    exit "$status"
}

# Prefixes each line of stdin with the epoch time it was read at.
stamp() {
    python3 -u -c 'import sys, time
for line in sys.stdin:
    sys.stdout.write("%.3f %s" % (time.time(), line))
    sys.stdout.flush()'
}

# Reads a JSON document from stdin and prints the value at a Python expression over `d`.
json() {
    python3 -c 'import json, sys
d = json.load(sys.stdin)
print(eval(sys.argv[1]))' "$1"
}

# A random bearer token for SYNC_API_TOKEN.
bench_token() {
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

# Runs setup.sh and builds the worker (release) and the local provider, unless
# BENCH_SKIP_BUILD is set; then checks both are there and sets PROVIDER_BIN.
bench_build() {
    if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
        say "setup and builds (log $LOGS/build.log)"
        {
            "$REPO/scripts/setup.sh"
            worker-build --release
            cargo build -p local-provider
        } >"$LOGS/build.log" 2>&1 || { tail -n 40 "$LOGS/build.log" >&2; die "setup or build failed"; }
    fi
    [ -f "$REPO/build/worker/shim.mjs" ] || die "no build/worker/shim.mjs: run worker-build --release (or drop BENCH_SKIP_BUILD)"
    PROVIDER_BIN="$(provider_bin)"
    [ -x "$PROVIDER_BIN" ] || die "the provider binary is not at $PROVIDER_BIN"
}

# wrangler dev rebuilds and reloads the worker when src/ or the bundle changes, which would kill
# an invocation mid-run if anyone edits or rebuilds the repository during the bench. So it runs a
# copy of the built worker ($WORK/build), with a copy of wrangler.toml that has no [build]
# section ($WORK/wrangler.toml).
bench_copy_worker() {
    cp -a "$REPO/build" "$WORK/build"
    python3 - "$REPO/wrangler.toml" "$WORK/wrangler.toml" "$WORK/build/worker/shim.mjs" "$BENCH_NAME" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"(?ms)^\[build\]\n.*?(?=^\[)", "", text)
text = re.sub(r'(?m)^main = .*$', 'main = "%s"' % sys.argv[3], text)
open(sys.argv[2], "w").write("# %s: wrangler.toml without [build], running a copy of the build.\n" % sys.argv[4] + text)
PY
}

# Starts a throwaway Postgres 18 + pgvector in $PG_DIR on a free port; sets PG_PORT and
# DATABASE_URL. The EXIT trap stops it.
bench_start_pg() {
    say "starting Postgres (data $PG_DIR)"
    PG_PORT="$(free_port)"
    PG_STARTED=1
    "$REPO/scripts/pg.sh" start "$PG_DIR" "$PG_PORT" >&2
    DATABASE_URL="$("$REPO/scripts/pg.sh" url "$PG_PORT")"
}

# The SQL that creates the bench's source table $1 with text column $2 holding psql variable
# :n distinct values, and analyzes it. Pipe it to psql with `-v n=N`.
source_table_sql() {
    local table="$1" column="$2"
    cat <<SQL
CREATE TABLE $table (id bigint PRIMARY KEY, $column text);
INSERT INTO $table
SELECT i, format('Product %s %s, %s steel bracket with %s finish and %s mm bolts',
                 i, upper(substr(md5(i::text), 1, 8)),
                 (ARRAY['stainless', 'galvanised', 'carbon', 'tool'])[1 + i % 4],
                 (ARRAY['matte', 'polished', 'powder-coated', 'brushed', 'anodised'])[1 + i % 5],
                 4 + i % 17)
FROM generate_series(1, :n) AS i;
ANALYZE $table;
SQL
}

# start_provider NAME [ARGS...]: starts the local provider with ARGS, logging to
# $LOGS/NAME.out (its address) and $LOGS/NAME.err (its request log, time-stamped); sets
# STARTED_PID and STARTED_ORIGIN. Register the pid with bench_stop_on_exit.
start_provider() {
    local name="$1"
    shift
    "$PROVIDER_BIN" --port 0 "$@" </dev/null >"$LOGS/$name.out" 2> >(stamp >"$LOGS/$name.err") &
    STARTED_PID=$!
    STARTED_ORIGIN="$(listening_address "$LOGS/$name.out" "$STARTED_PID")" \
        || die "the provider did not start ($LOGS/$name.out)"
}

# start_wrangler PORT DATABASE_URL LOG STATE [ARGS...]: starts `wrangler dev` with the copy of
# the prebuilt worker (bench_copy_worker) on PORT, with DATABASE_URL, a bench API key, the token
# $TOKEN and the further wrangler ARGS (`--var NAME:VALUE`: EMBEDDING_SOURCES, OPENAI_BASE_URL,
# ...); its output, time-stamped, goes to LOG. Prints the pid. BENCH_WRANGLER_CONFIG names
# another wrangler.toml (default: bench_copy_worker's); BENCH_INSPECTOR_PORT the inspector's port
# (default: a free one).
start_wrangler() {
    local port="$1" url="$2" log="$3" state="$4"
    shift 4
    # An empty env file keeps .dev.vars/.env out; each instance needs its own inspector port;
    # `--log-level log` keeps the worker's console.log lines (`Batch i of N`, `Sync report:`).
    : >"$WORK/empty.env"
    SKIP_WORKER_BUILD=1 NO_COLOR=1 "$NODE22" "$WRANGLER_JS" dev \
        --config "${BENCH_WRANGLER_CONFIG:-$WORK/wrangler.toml}" --env-file "$WORK/empty.env" \
        --ip 127.0.0.1 --port "$port" --inspector-port "${BENCH_INSPECTOR_PORT:-$(free_port)}" \
        --persist-to "$state" \
        --show-interactive-dev-session=false --log-level log \
        --var "DATABASE_URL:$url" \
        --var "OPENAI_API_KEY:local-bench-key" \
        --var "SYNC_API_TOKEN:$TOKEN" \
        "$@" \
        </dev/null > >(stamp >"$log") 2>&1 &
    echo $!
}

# The workerd processes under a wrangler pid (descendants whose command is workerd; wrangler
# runs two: its own entry worker and the user worker).
workerds_of() {
    local pid="$1" child
    for child in $(pgrep -P "$pid" || true); do
        if [ "$(cat "/proc/$child/comm" 2>/dev/null)" = workerd ]; then
            printf '%s\n' "$child"
        fi
        workerds_of "$child"
    done
}
