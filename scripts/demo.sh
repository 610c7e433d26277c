#!/usr/bin/env bash
# Runs embsync's main job locally, end to end, and leaves it running to play with.
#
# It installs what is missing (scripts/setup.sh), builds the worker and the local embeddings
# provider, starts Postgres 18 + pgvector (data in .run/pg, port 54329 unless taken), loads the
# sample tables (scripts/sample-data.sql), starts the provider and `wrangler dev` on
# 127.0.0.1:8787 (unless taken), triggers one cron run, prints its sync report and a dry run, and
# then keeps everything running until Ctrl-C, which stops wrangler, the provider and Postgres.
#
# Everything it writes lives in .run/ (git-ignored): wrangler.log, provider.log (the provider's
# request log), provider.out, wrangler-state/ (local KV) and pg/.
# Set EMBSYNC_DEMO_PG_DIR to keep the Postgres data elsewhere (when running as root from a
# directory the postgres user cannot reach, such as /root, point it under /tmp).
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
cd "$REPO"

RUN_DIR="$REPO/.run"
PG_DIR="${EMBSYNC_DEMO_PG_DIR:-$RUN_DIR/pg}"
PG_PORT=54329
WORKER_PORT=8787
CRON='*/5+*+*+*+*'

WRANGLER_LOG="$RUN_DIR/wrangler.log"
PROVIDER_LOG="$RUN_DIR/provider.log"
PROVIDER_OUT="$RUN_DIR/provider.out"
WRANGLER_STATE="$RUN_DIR/wrangler-state"

WRANGLER_PID=""
PROVIDER_PID=""
TAIL_PID=""
PG_STARTED=""

say() {
    printf '\n==> [demo] %s\n' "$*"
}

# Stops what the demo started, in reverse order. Runs on every exit, including Ctrl-C.
# shellcheck disable=SC2317 # Only called from the EXIT trap, which shellcheck cannot see.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    say "stopping"
    if alive "$TAIL_PID"; then
        kill "$TAIL_PID" 2>/dev/null || true
    fi
    if alive "$WRANGLER_PID"; then
        echo "stopping wrangler (pid $WRANGLER_PID)"
        stop_wrangler "$WRANGLER_PID"
    fi
    if alive "$PROVIDER_PID"; then
        echo "stopping the provider (pid $PROVIDER_PID)"
        stop_process "$PROVIDER_PID"
    fi
    if [ -n "$PG_STARTED" ]; then
        "$REPO/scripts/pg.sh" stop "$PG_DIR" || true
    fi
    if [ "$status" -ne 0 ] && [ "$status" -ne 130 ]; then
        echo "demo.sh failed (exit status $status); logs are in $RUN_DIR" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Prints an error and exits (the trap then stops what was started).
die() {
    printf '\ndemo.sh: %s\n' "$*" >&2
    exit 1
}

# Exit status 0 when something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Pretty-prints JSON from stdin with jq when available, else python3; prints it as it is when it
# is not JSON.
pretty_json() {
    local input
    input="$(cat)"
    if command -v jq >/dev/null 2>&1 && jq . <<<"$input" 2>/dev/null; then
        return 0
    fi
    if python3 -m json.tool <<<"$input" 2>/dev/null; then
        return 0
    fi
    printf '%s\n' "$input"
}

mkdir -p "$RUN_DIR"

# Install and build.
say "setup"
"$REPO/scripts/setup.sh"
# What env.sh locates (PG_BIN in .venv, ...) may have been installed just now.
# shellcheck source=scripts/env.sh
. "$REPO/scripts/env.sh"
say "building the worker (worker-build --release)"
worker-build --release
[ -f build/worker/shim.mjs ] || die "worker-build did not produce build/worker/shim.mjs"
say "building the local provider"
cargo build -p local-provider
PROVIDER_BIN="$(provider_bin)"
[ -x "$PROVIDER_BIN" ] || die "the provider binary is not at $PROVIDER_BIN"

# Postgres. A server left running on the demo's data directory by an earlier run that did not
# stop cleanly is stopped first, so that the port check below only sees other people's servers.
say "starting Postgres"
if "$REPO/scripts/pg.sh" status "$PG_DIR" >/dev/null 2>&1; then
    "$REPO/scripts/pg.sh" stop "$PG_DIR"
fi
if port_in_use "$PG_PORT"; then
    PG_PORT="$(free_port)"
    echo "port 54329 is taken; using $PG_PORT"
fi
PG_STARTED=1
"$REPO/scripts/pg.sh" start "$PG_DIR" "$PG_PORT"
DATABASE_URL="$("$REPO/scripts/pg.sh" url "$PG_PORT")"

say "loading the sample tables (scripts/sample-data.sql)"
"$PG_BIN/psql" "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -f "$REPO/scripts/sample-data.sql"

# The local OpenAI-compatible provider prints `listening on http://127.0.0.1:PORT` first.
say "starting the local embeddings provider"
: >"$PROVIDER_OUT"
"$PROVIDER_BIN" --port 0 --log "$PROVIDER_LOG" </dev/null >"$PROVIDER_OUT" 2>&1 &
PROVIDER_PID=$!
provider_origin="$(listening_address "$PROVIDER_OUT" "$PROVIDER_PID")" || {
    cat "$PROVIDER_OUT" >&2
    die "the provider did not print 'listening on http://...' (output above, $PROVIDER_OUT)"
}
PROVIDER_PORT="${provider_origin##*:}"
OPENAI_BASE_URL="http://127.0.0.1:$PROVIDER_PORT/v1"
echo "provider: $OPENAI_BASE_URL (pid $PROVIDER_PID, request log $PROVIDER_LOG)"

# wrangler dev with the prebuilt worker. The token protects /dry-run and /sync.
TOKEN="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
if port_in_use "$WORKER_PORT"; then
    WORKER_PORT="$(free_port)"
    echo "port 8787 is taken; using $WORKER_PORT"
fi
ORIGIN="http://127.0.0.1:$WORKER_PORT"
say "starting wrangler dev on $ORIGIN (log $WRANGLER_LOG)"
: >"$WRANGLER_LOG"
SKIP_WORKER_BUILD=1 NO_COLOR=1 "$NODE22" "$WRANGLER_JS" dev \
    --ip 127.0.0.1 --port "$WORKER_PORT" \
    --persist-to "$WRANGLER_STATE" \
    --test-scheduled --show-interactive-dev-session=false \
    --var "DATABASE_URL:$DATABASE_URL" \
    --var "OPENAI_API_KEY:local-test-key" \
    --var "OPENAI_BASE_URL:$OPENAI_BASE_URL" \
    --var "SYNC_API_TOKEN:$TOKEN" \
    </dev/null >"$WRANGLER_LOG" 2>&1 &
WRANGLER_PID=$!

wait_healthy "$ORIGIN" "$WRANGLER_PID" "$WRANGLER_LOG" 300 \
    || die "wrangler dev did not answer $ORIGIN/health (log above, $WRANGLER_LOG)"
echo "health: $(curl -fsS -m 5 "$ORIGIN/health")"

# One cron run, as Cloudflare would trigger it every five minutes. The endpoint answers "ok"
# whatever happened, so the outcome is read from the worker's log.
say "triggering a cron run: GET /__scheduled?cron=$CRON"
curl -sS -m 600 "$ORIGIN/__scheduled?cron=$CRON" || echo "(the request failed)"
echo
# The worker logs one JSON event per line; the run's end is the `report` event.
report_line=""
for _ in $(seq 1 600); do
    report_line="$(grep -m 1 '"event":"report"' "$WRANGLER_LOG" || true)"
    [ -z "$report_line" ] || break
    alive "$WRANGLER_PID" || break
    sleep 0.2
done

say "sync report (from $WRANGLER_LOG)"
# The messages of the batch and source events, then the report itself.
grep -E '"event":"(batch|source)"' "$WRANGLER_LOG" | sed -E 's/.*"message":"(([^"\\]|\\.)*)".*/\1/' || true
if [ -n "$report_line" ]; then
    printf '%s\n' "$report_line" | sed -E 's/^[^{]*//; s/.*"report"://; s/\}[^}]*$//' | pretty_json
else
    echo "no report event in $WRANGLER_LOG; its last lines:"
    tail -n 30 "$WRANGLER_LOG"
fi

say "dry run: GET /dry-run (nothing left to embed right after the sync)"
curl -sS -m 120 -H "Authorization: Bearer $TOKEN" "$ORIGIN/dry-run" | pretty_json

say "embsync is running"
cat <<EOF
Worker:    $ORIGIN   (wrangler pid $WRANGLER_PID, log $WRANGLER_LOG)
Postgres:  $DATABASE_URL   (data $PG_DIR)
Provider:  $OPENAI_BASE_URL   (request log $PROVIDER_LOG)
Token:     $TOKEN

Try:
  curl $ORIGIN/health
  curl -H "Authorization: Bearer $TOKEN" $ORIGIN/dry-run
  curl -X POST -H "Authorization: Bearer $TOKEN" $ORIGIN/sync
  curl "$ORIGIN/__scheduled?cron=$CRON"
  open $ORIGIN/status.html in a browser (any user name, the token as the password)
  scripts/pg.sh psql $PG_PORT -c "select source_table, source_column, count(*) from embedding_cache group by 1, 2"
  scripts/pg.sh psql $PG_PORT -c "update config_option set description = 'Cutter with catch tray, heavy duty' where id = 6"

Following $WRANGLER_LOG below. Press Ctrl-C to stop wrangler, the provider and Postgres.
EOF

tail -n 0 -f "$WRANGLER_LOG" &
TAIL_PID=$!

# Waits for wrangler; Ctrl-C interrupts the wait and the trap stops everything.
set +e
wait "$WRANGLER_PID"
wrangler_status=$?
set -e
WRANGLER_PID=""
echo "wrangler dev exited on its own (status $wrangler_status); see $WRANGLER_LOG" >&2
exit 1
