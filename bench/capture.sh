#!/usr/bin/env bash
# Change capture benchmark (issue 12): what a sync costs with "changes": "scan" and "capture",
# and what writers pay for the capture's triggers.
#
# Usage:
#   bench/capture.sh [SIZES]    SIZES: distinct values per source, comma-separated
#                               (default 10000,1000000)
#
# It starts a throwaway Postgres 18 + pgvector (scripts/pg.sh) on a free port, or uses
# BENCH_PG_URL (a database URL of a server it may create databases on), and builds
# crates/embsync-store/examples/capture_bench.rs (release): the real driver over the real store,
# natively over TCP, with an in-process provider that answers at once (4 and 2 dimensions), so
# the figures are the sync's own cost: Postgres and the driver, no provider, no worker.
#
# 1. The sync, per size N: two tables with the same N distinct values, one scanned, one
#    captured. After the initial sync: five no-op runs each (every run a whole `invoke`: lease,
#    run, plan or capture step, finish), then five runs each after an UPDATE of 1% of the rows
#    (a new value each); the median of each.
# 2. What writers pay, at 100,000 rows (each statement five times on a fresh table, median; the
#    three tables take turns in each round):
#    a bulk INSERT, an UPDATE of the column, an UPDATE of another column, a DELETE, and 10,000
#    single-row INSERTs (one transaction, a statement each), on a table without triggers, a
#    captured one (embsync's triggers, installed by a capture_bench run: statement-level for
#    INSERT and DELETE, a row trigger with a WHEN for UPDATE), and one with a per-row
#    trigger of the kind the peers use (AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW, queueing
#    the row's id).
#
# Environment:
#   BENCH_PG_URL=...        use this server instead of starting one
#   BENCH_SKIP_BUILD=1      the example is built already
set -euo pipefail

# shellcheck source=scripts/env.sh disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
# shellcheck source=scripts/lib.sh disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZES="${1:-10000,1000000}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/embsync-capture-bench.XXXXXX")"
PG_DIR="$WORK/pg"
PG_STARTED=""

say() {
    printf '==> [bench] %s\n' "$*" >&2
}

# shellcheck disable=SC2317 # Only called from the EXIT trap.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$PG_STARTED" ]; then
        "$REPO/scripts/pg.sh" stop "$PG_DIR" >&2 || true
    fi
    rm -rf "$WORK"
    [ "$status" -eq 0 ] || echo "bench/capture.sh failed (exit status $status)" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
    say "building the capture_bench example (release)"
    cargo build -q -p embsync-store --example capture_bench --release
fi
BIN="$REPO/target/release/examples/capture_bench"

if [ -n "${BENCH_PG_URL:-}" ]; then
    SERVER_URL="$BENCH_PG_URL"
else
    say "starting Postgres (data $PG_DIR)"
    PG_PORT="$(free_port)"
    PG_STARTED=1
    "$REPO/scripts/pg.sh" start "$PG_DIR" "$PG_PORT" >&2
    SERVER_URL="$("$REPO/scripts/pg.sh" url "$PG_PORT")"
fi
DB="embsync_capture_bench_$$"
URL="${SERVER_URL%/*}/$DB"
psql -qX "$SERVER_URL" -c "CREATE DATABASE $DB" >/dev/null
psql -qX "$URL" -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
# shellcheck disable=SC2317
drop_db() { psql -qX "$SERVER_URL" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true; }
trap 'drop_db; cleanup' EXIT

sql() { psql -qX -v ON_ERROR_STOP=1 "$URL" "$@"; }

# The median of the numbers on stdin.
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)] }'; }

# The timed runs' milliseconds (second field of "run <ms> ...") from capture_bench's output.
run_ms() { awk '$1 == "run" { print $2 }'; }

echo
echo "## The sync: a whole run (median of 5), natively, instant provider"
echo
printf '| values | scan no-op | capture no-op | scan after 1%% updated | capture after 1%% updated |\n'
printf '|---:|---:|---:|---:|---:|\n'
IFS=',' read -r -a sizes <<<"$SIZES"
for n in "${sizes[@]}"; do
    for mode in scan capture; do
        t="${mode}_$n"
        say "creating $t with $n distinct values"
        sql <<SQL
CREATE TABLE $t (id bigint PRIMARY KEY, title text, other int NOT NULL DEFAULT 0);
INSERT INTO $t (id, title)
SELECT i, format('Product %s %s, %s steel bracket with %s finish', i, upper(substr(md5(i::text), 1, 8)),
                 (ARRAY['stainless', 'galvanised', 'carbon', 'tool'])[1 + i % 4],
                 (ARRAY['matte', 'polished', 'powder-coated', 'brushed', 'anodised'])[1 + i % 5])
FROM generate_series(1, $n) AS i;
ANALYZE $t;
SQL
        say "initial sync of $t, then 5 no-op runs"
        "$BIN" "$URL" "$t" "$mode" 5 >"$WORK/$t.noop"
        say "5 runs of $t, each after an UPDATE of 1% of its rows"
        # Each round changes another 1% (a new value per row), so every run has 1% to do.
        "$BIN" "$URL" "$t" "$mode" 5 \
            "UPDATE $t SET title = title || ' v' || (SELECT count(*) FROM embedding_sync_runs) WHERE id % 100 = (SELECT count(*) FROM embedding_sync_runs) % 100" \
            >"$WORK/$t.change"
        grep -q 'new=0 ' "$WORK/$t.change" && { echo "a run after the update found nothing new: $(cat "$WORK/$t.change")" >&2; exit 1; }
    done
    printf '| %s | %s ms | %s ms | %s ms | %s ms |\n' "$n" \
        "$(run_ms <"$WORK/scan_$n.noop" | median)" "$(run_ms <"$WORK/capture_$n.noop" | median)" \
        "$(run_ms <"$WORK/scan_$n.change" | median)" "$(run_ms <"$WORK/capture_$n.change" | median)"
    sql -c "DROP TABLE scan_$n, capture_$n" >/dev/null
done

# ---------------------------------------------------------------------------------------------
echo
echo "## What writers pay: 100,000 rows (median of 5 statements, each on a fresh table, the tables interleaved)"
echo
for t in w_plain w_capture w_row; do
    sql -c "CREATE TABLE $t (id bigserial PRIMARY KEY, title text, other int NOT NULL DEFAULT 0)" >/dev/null
done
sql >/dev/null <<'SQL'
CREATE TABLE w_row_queue (id bigint NOT NULL, queued_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION w_row_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO w_row_queue (id) VALUES (coalesce(NEW.id, OLD.id));
    RETURN NULL;
END $$;
CREATE TRIGGER w_row_enqueue AFTER INSERT OR UPDATE OR DELETE ON w_row FOR EACH ROW EXECUTE FUNCTION w_row_enqueue();
SQL
say "installing the capture on w_capture"
"$BIN" "$URL" w_capture install >/dev/null

# The milliseconds of one statement ($2) on table $1, after a fresh load when $3 is "load".
timed() {
    local t="$1" statement="$2" load="$3"
    sql >/dev/null <<SQL
TRUNCATE $t;
TRUNCATE w_row_queue;
DELETE FROM embedding_sync_change_log WHERE capture_id <> 0;
SQL
    sql -c "VACUUM ANALYZE embedding_sync_change_log, w_row_queue" >/dev/null
    if [ "$load" = load ]; then
        sql >/dev/null <<SQL
ALTER TABLE $t DISABLE TRIGGER USER;
INSERT INTO $t (title) SELECT 'row ' || i FROM generate_series(1, 100000) i;
ALTER TABLE $t ENABLE TRIGGER USER;
VACUUM ANALYZE $t;
SQL
    fi
    sql <<SQL | awk '/^Time: / { print $2 }' | tail -1
\timing on
${statement//TABLE/$t};
SQL
}

declare -A statements=(
    [1 INSERT 100,000 rows]="INSERT INTO TABLE (title) SELECT 'bulk ' || i FROM generate_series(1, 100000) i|fresh"
    [2 UPDATE the column, 100,000 rows]="UPDATE TABLE SET title = title || ' changed'|load"
    [3 UPDATE another column, 100,000 rows]="UPDATE TABLE SET other = other + 1|load"
    [4 DELETE 100,000 rows]="DELETE FROM TABLE|load"
    [5 10,000 single-row INSERTs]="DO \$\$ BEGIN FOR i IN 1..10000 LOOP INSERT INTO TABLE (title) VALUES ('one ' || i); END LOOP; END \$\$|fresh"
)
printf '| statement | no trigger | capture | per-row trigger | capture vs none | per-row vs none |\n'
printf '|---|---:|---:|---:|---:|---:|\n'
while IFS= read -r name; do
    spec="${statements[$name]}"
    statement="${spec%|*}"
    load="${spec##*|}"
    declare -A ms=() runs=()
    # Rounds interleave the three tables, so that a busy moment of a shared machine lands on
    # all three rather than on one.
    for _ in 1 2 3 4 5; do
        for t in w_plain w_capture w_row; do
            runs[$t]+="$(timed "$t" "$statement" "$load")"$'\n'
        done
    done
    for t in w_plain w_capture w_row; do
        ms[$t]="$(printf '%s' "${runs[$t]}" | median)"
    done
    printf '| %s | %.0f ms | %.0f ms | %.0f ms | %+.0f%% | %+.0f%% |\n' "${name#* }" "${ms[w_plain]}" "${ms[w_capture]}" "${ms[w_row]}" \
        "$(echo "(${ms[w_capture]} / ${ms[w_plain]} - 1) * 100" | bc -l)" "$(echo "(${ms[w_row]} / ${ms[w_plain]} - 1) * 100" | bc -l)"
done < <(printf '%s\n' "${!statements[@]}" | sort)
