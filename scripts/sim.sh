#!/usr/bin/env bash
# Runs the seeded fault simulation (crates/embsync-store/tests/sim.rs) for as long as you like,
# and prints how many seeds and steps ran clean.
#
# Usage:
#   scripts/sim.sh [DURATION_SECONDS]     seeds from SIM_SEEDS (default: the CI seeds), then
#                                         further seeds until DURATION_SECONDS have passed
# Environment (passed on to the test; see the top of tests/sim.rs):
#   SIM_SEEDS=a..b | n     the seeds (n: 1..=n)        SIM_SEED=n   that seed only (a replay)
#   SIM_STEPS=n            steps per seed (default 130)
#   SIM_FAULTS=ci|all|none|a,b,-c   fault classes (default ci: those the current code passes)
#   SIM_ALLOW=none|a,b     known-failing invariants tolerated (default: the KNOWN_FAILING list)
#   SIM_KEEP_GOING=1       report every failing seed instead of stopping at the first
#   EMBSYNC_TEST_PG_URL    a Postgres + pgvector to use; without it a throwaway one is started
# A failing seed prints itself, the step, the invariant and the step log, and the command that
# replays it exactly.
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
cd "$REPO"

if [ "$#" -gt 0 ]; then
    export SIM_DURATION="$1"
fi

PG_DIR=""
cleanup() {
    if [ -n "$PG_DIR" ]; then
        "$REPO/scripts/pg.sh" stop "$PG_DIR/pg" || true
        rm -rf "$PG_DIR"
    fi
}
trap cleanup EXIT

if [ -z "${EMBSYNC_TEST_PG_URL:-}" ]; then
    PG_DIR="$(mktemp -d)"
    chmod 755 "$PG_DIR"
    port="$(free_port)"
    "$REPO/scripts/pg.sh" start "$PG_DIR/pg" "$port" >&2
    EMBSYNC_TEST_PG_URL="$("$REPO/scripts/pg.sh" url "$port")"
    export EMBSYNC_TEST_PG_URL
fi

# The test prints the summary ("simulation: N seeds and M steps ran clean ...") and, for a
# failing seed, its step log.
cargo test -p embsync-store --test sim -- --nocapture
