#!/usr/bin/env bash
# Sync benchmark (issue 3): how embsync behaves on one large source, locally, end to end.
#
# Usage:
#   bench/sync.sh [N]     N distinct values in the source (default 100000)
#
# It sets everything up itself, like scripts/demo.sh: builds the worker once
# (`worker-build --release`) and the local provider (`cargo build -p local-provider`), starts a
# throwaway Postgres 18 + pgvector in a temporary directory on a free port, the provider (zero
# latency) and the prebuilt worker under `wrangler dev` (a copy of build/ and of wrangler.toml
# without its [build] section, so that edits or rebuilds in the repository during the bench do
# not reload the worker), and stops all of it on exit (also on failure or Ctrl-C). The worker gets one enabled source through
# EMBEDDING_SOURCES (batchSize 2048) and an invocation budget of SYNC_MAX_BATCHES batches.
#
# Then it measures and prints a table:
#   1. initial sync of N distinct values: `GET /__scheduled` again and again until
#      embedding_sync_runs has the run finished; values/s, invocations, provider requests;
#   2. no-op re-sync: `POST /sync` five times (best and median time), rows sent to the worker,
#      provider requests (must be 0);
#   3. re-sync after changing 1% and deleting 1% of the rows: time, new/stale, provider requests;
#   4. the bare Postgres time of the same set-wise diff (the worker's plan query, run in psql
#      with the same parameters; five warm runs, interleaved with the no-op runs so that both see
#      the same background load) and the ratio no-op re-sync / bare diff.
# and, after it, where the time of the initial sync and of the 1% re-sync went (per batch and per
# kind of statement, from the timestamped logs: bench/sync_breakdown.py), the bare diff's
# EXPLAIN ANALYZE, and the no-op's statements with the rows each returned.
#
# "Rows sent to the worker": the Postgres build here has no pg_stat_statements, so they are
# counted on the wire: a second `wrangler dev` reaches Postgres through bench/pgwire_count.py, a
# proxy that counts the DataRow messages Postgres sends; one no-op re-sync runs through it (the
# timed runs do not). That proxy also captures the worker's plan query byte for byte, which is
# what step 4 runs.
#
# Environment:
#   BENCH_MAX_BATCHES=20   invocation budget (SYNC_MAX_BATCHES) for the initial sync
#   BENCH_SKIP_BUILD=1     skip setup.sh and both builds (they are already done)
#   BENCH_DIMS=48,24       request shorter vectors (measures the sync, not vector generation)
#   BENCH_KEEP=1           keep the temporary directory (Postgres data and logs) on success
# The logs (wrangler, provider, Postgres, the proxy) are under the temporary directory, which is
# kept when the bench fails.
set -euo pipefail

# shellcheck source=scripts/env.sh disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
# shellcheck source=scripts/lib.sh disable=SC1091
. "$REPO/scripts/lib.sh"
BENCH_NAME=bench/sync.sh
BENCH_TAG=bench
# shellcheck source=bench/lib.sh disable=SC1091
. "$REPO/bench/lib.sh"
cd "$REPO"

N="$(bench_n "${1:-}")"
BATCH_SIZE=2048
MAX_BATCHES="${BENCH_MAX_BATCHES:-20}"
CRON='*/5+*+*+*+*'
TABLE=bench_items
COLUMN=title
LARGE=text-embedding-3-large
SMALL=text-embedding-3-small
# BENCH_DIMS="48,24" asks the provider for shorter vectors (the `dimensions` option), to measure
# the sync itself on sizes where generating 3072-d vectors would dominate (e.g. N = 1,000,000).
LARGE_TAG="$LARGE"
SMALL_TAG="$SMALL"
LARGE_JSON="\"$LARGE\""
SMALL_JSON="\"$SMALL\""
if [ -n "${BENCH_DIMS:-}" ]; then
    LARGE_DIMS="${BENCH_DIMS%,*}"
    SMALL_DIMS="${BENCH_DIMS#*,}"
    LARGE_TAG="$LARGE:$LARGE_DIMS"
    SMALL_TAG="$SMALL:$SMALL_DIMS"
    LARGE_JSON="{\"name\":\"$LARGE\",\"dimensions\":$LARGE_DIMS}"
    SMALL_JSON="{\"name\":\"$SMALL\",\"dimensions\":$SMALL_DIMS}"
fi

bench_init
WRANGLER_PID=""
COUNT_WRANGLER_PID=""
PROVIDER_PID=""
PROXY_PID=""
bench_stop_on_exit wrangler WRANGLER_PID
bench_stop_on_exit wrangler COUNT_WRANGLER_PID
bench_stop_on_exit process PROVIDER_PID
bench_stop_on_exit process PROXY_PID

psql_q() {
    "$PG_BIN/psql" "$DATABASE_URL" -X -q -A -t -v ON_ERROR_STOP=1 "$@"
}

provider_requests() {
    curl -fsS -m 60 "$PROVIDER_ORIGIN/_admin/requests" | json 'len(d)'
}

provider_reset() {
    curl -fsS -m 60 -X DELETE "$PROVIDER_ORIGIN/_admin/requests" >/dev/null
}

# Starts `wrangler dev` (see bench/lib.sh) on port $1, Postgres URL $2, log file $3, state
# directory $4, with the bench's source, provider and batch budget; prints the pid.
start_sync_wrangler() {
    start_wrangler "$@" --test-scheduled \
        --var "OPENAI_BASE_URL:$OPENAI_BASE_URL" \
        --var "EMBEDDING_SOURCES:$SOURCES_JSON" \
        --var "SYNC_MAX_BATCHES:$MAX_BATCHES"
}

# Waits for `wrangler dev` pid $2 with log $3 to answer $1/health; dies when it does not.
wait_worker() {
    wait_healthy "$@" || die "wrangler dev did not answer $1/health (log above, $3)"
}

# ---------------------------------------------------------------------------------------------
# Build and start everything.

bench_build
bench_copy_worker
bench_start_pg
# Every statement is logged with its duration (not its parameters: they hold the vectors), for
# the breakdown at the end. psql's statements carry application_name psql and are left out.
psql_q >/dev/null <<'SQL'
ALTER SYSTEM SET log_min_duration_statement = 0;
ALTER SYSTEM SET log_parameter_max_length = 0;
ALTER SYSTEM SET log_timezone = 'UTC';
ALTER SYSTEM SET log_line_prefix = '%m [%p] %a %q%u@%d ';
SELECT pg_reload_conf();
SQL

say "creating $TABLE with $N distinct values"
source_table_sql "$TABLE" "$COLUMN" | psql_q -v n="$N"

say "starting the local provider (zero latency)"
start_provider provider
PROVIDER_PID="$STARTED_PID"
PROVIDER_ORIGIN="$STARTED_ORIGIN"
OPENAI_BASE_URL="$PROVIDER_ORIGIN/v1"

say "starting the counting proxy in front of Postgres (for the rows sent to the worker)"
python3 -u "$REPO/bench/pgwire_count.py" "$PG_PORT" "$LOGS/wire.jsonl" </dev/null >"$LOGS/proxy.out" 2>&1 &
PROXY_PID=$!
PROXY_PORT="$(listening_address "$LOGS/proxy.out" "$PROXY_PID")" \
    || die "the counting proxy did not start ($LOGS/proxy.out)"

TOKEN="$(bench_token)"
SOURCES_JSON="{\"version\":\"1.0\",\"models\":{\"large\":$LARGE_JSON,\"small\":$SMALL_JSON},\"batchSize\":$BATCH_SIZE,\"sources\":[{\"name\":\"bench\",\"table\":\"$TABLE\",\"column\":\"$COLUMN\",\"enabled\":true}]}"

say "starting wrangler dev twice: the measured worker, and one through the counting proxy"
WORKER_PORT="$(free_port)"
ORIGIN="http://127.0.0.1:$WORKER_PORT"
WRANGLER_LOG="$LOGS/wrangler.log"
WRANGLER_PID="$(start_sync_wrangler "$WORKER_PORT" "$DATABASE_URL" "$WRANGLER_LOG" "$WORK/wrangler-state")"
COUNT_PORT="$(free_port)"
COUNT_ORIGIN="http://127.0.0.1:$COUNT_PORT"
COUNT_LOG="$LOGS/wrangler-counted.log"
COUNT_WRANGLER_PID="$(start_sync_wrangler "$COUNT_PORT" "postgres://postgres@127.0.0.1:$PROXY_PORT/postgres" "$COUNT_LOG" "$WORK/wrangler-state-counted")"
wait_worker "$ORIGIN" "$WRANGLER_PID" "$WRANGLER_LOG"
wait_worker "$COUNT_ORIGIN" "$COUNT_WRANGLER_PID" "$COUNT_LOG"

# The largest peak resident memory (VmHWM) among the given processes, in MiB.
peak_rss() {
    local pid
    for pid in "$@"; do
        awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true
    done | sort -n | tail -n 1 | awk '{ printf "%.0f", $1 / 1024 }'
}
mapfile -t WORKERD_PIDS < <(workerds_of "$WRANGLER_PID")
rss_idle="$(peak_rss "${WORKERD_PIDS[@]}")"

# Byte offsets of the logs, to cut out one phase.
mark() {
    printf '%s %s %s\n' "$(stat -c %s "$WRANGLER_LOG")" "$(stat -c %s "$LOGS/provider.err")" "$(stat -c %s "$PG_LOG")"
}

# Copies what the logs got since the marks $1 into $LOGS/$2.{wrangler,provider,pg}.
cut_logs() {
    local w p g
    read -r w p g <<<"$1"
    tail -c +"$((w + 1))" "$WRANGLER_LOG" >"$LOGS/$2.wrangler"
    tail -c +"$((p + 1))" "$LOGS/provider.err" >"$LOGS/$2.provider"
    tail -c +"$((g + 1))" "$PG_LOG" >"$LOGS/$2.pg"
}

# POSTs /sync to origin $1, saving the report in $2; prints the wall time in seconds.
post_sync() {
    local origin="$1" out="$2" code t
    read -r code t < <(curl -sS -m 900 -o "$out" -w '%{http_code} %{time_total}\n' \
        -X POST -H "Authorization: Bearer $TOKEN" "$origin/sync")
    [ "$code" = 200 ] || die "POST $origin/sync answered $code: $(cat "$out")"
    printf '%s\n' "$t"
}

# ---------------------------------------------------------------------------------------------
# 1. Initial sync, driven by the cron trigger until the run is finished.

say "1. initial sync of $N values (batchSize $BATCH_SIZE, SYNC_MAX_BATCHES $MAX_BATCHES)"
provider_reset
marks="$(mark)"
max_invocations=$(( (N / BATCH_SIZE + 1) / MAX_BATCHES + 20 ))
t_start="$(now)"
invocation_times=()
finished=0
for i in $(seq 1 "$max_invocations"); do
    t0="$(now)"
    curl -fsS -m 900 "$ORIGIN/__scheduled?cron=$CRON" >/dev/null || die "GET /__scheduled failed"
    invocation_times+=("$(elapsed "$t0")")
    say "   invocation $i: ${invocation_times[-1]} s"
    finished="$(psql_q -c "SELECT count(*) FROM embedding_sync_runs WHERE finished_at IS NOT NULL" 2>/dev/null || echo 0)"
    [ "$finished" -ge 1 ] && break
    if grep -q '^[0-9.]* Sync failed' "$WRANGLER_LOG"; then
        grep '^[0-9.]* Sync failed' "$WRANGLER_LOG" >&2
        die "the sync failed (log $WRANGLER_LOG)"
    fi
done
t_end="$(now)"
[ "$finished" -ge 1 ] || die "the run did not finish within $max_invocations invocations"
initial_secs="$(elapsed "$t_start" "$t_end")"
IFS='|' read -r run_status run_invocations run_embedded run_errors < <(psql_q -c \
    "SELECT status, invocations, report->'totals'->>'embedded', report->'totals'->>'errors' FROM embedding_sync_runs WHERE finished_at IS NOT NULL")
initial_requests="$(provider_requests)"
# Each value must have been sent once per model: inputs per model, in total and distinct.
initial_inputs="$(curl -fsS -m 120 "$PROVIDER_ORIGIN/_admin/requests" | python3 -c 'import json, sys
seen = {}
for r in json.load(sys.stdin):
    seen.setdefault(r["model"], []).extend(r["inputs"] if r["status"] == 200 else [])
print(", ".join("%s %d / %d" % (m.replace("text-embedding-3-", ""), len(v), len(set(v))) for m, v in sorted(seen.items())))')"
complete="$(psql_q -c "SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL")"
if [ "$run_status" != finished ] || [ "$run_embedded" != "$N" ] || [ "$complete" != "$N" ] || [ "$run_errors" != 0 ]; then
    die "initial sync: status $run_status, embedded $run_embedded, complete rows $complete, errors $run_errors (expected $N)"
fi
cut_logs "$marks" initial
rss_peak="$(peak_rss "${WORKERD_PIDS[@]}")"

# A database that has settled: autovacuum would have analysed and vacuumed the new rows by now.
# (The vectors' TOAST table is left alone: no statement here reads it.)
say "vacuum and analyse (the steady state autovacuum reaches)"
psql_q -c "VACUUM (ANALYZE, PROCESS_TOAST false) $TABLE, embedding_cache, embedding_cache_sources, embedding_cache_owned, embedding_sync_errors"

# ---------------------------------------------------------------------------------------------
# 2. No-op re-sync. First through the counting proxy (rows sent to the worker, and the exact plan
# query), then timed runs on the measured worker, interleaved with the bare diff (step 4).

say "2. no-op re-sync"
provider_reset
: >"$LOGS/wire.jsonl"
post_sync "$COUNT_ORIGIN" "$LOGS/noop-counted.json" >/dev/null
for _ in $(seq 1 50); do
    [ -s "$LOGS/wire.jsonl" ] && break
    sleep 0.1
done
[ -s "$LOGS/wire.jsonl" ] || die "the counting proxy saw no connection ($LOGS/proxy.out)"
sleep 0.5
read -r noop_rows noop_bytes noop_conns noop_statements < <(python3 -c 'import json, sys
conns = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(sum(c["dataRows"] for c in conns), sum(c["bytesToClient"] for c in conns), len(conns),
      sum(len(c["statements"]) for c in conns))' "$LOGS/wire.jsonl")
# The worker's plan query, as it sent it: the Parse message holding the set-wise counts.
python3 - "$LOGS/wire.jsonl" "$LOGS/plan.sql" <<'PY'
import json, sys
# The proxy keeps the full text of every statement the worker prepared.
for line in open(sys.argv[1]):
    for sql in json.loads(line).get("prepared", []):
        if "AS total" in sql and "fresh AS MATERIALIZED" in sql:
            open(sys.argv[2], "w").write(sql)
            sys.exit(0)
sys.exit("the worker's plan query was not seen by the proxy")
PY

# The timed runs: no-op re-syncs and bare diff queries, interleaved so that both see the same
# background load (the machine may be shared), after one warm-up of the bare query. The bare diff
# is the worker's plan query as captured on the wire, with the same parameters, run in psql
# (unnamed prepared statement via \bind, like the worker's extended-protocol query), timed with
# \timing: the query alone, no connection set-up.
{
    # The worker plans inside a transaction with SET LOCAL work_mem = '64MB' (see sql.rs,
    # PLAN_WORK_MEM); the bare query gets the same memory, so the ratio compares like with like.
    printf '%s\n' "SET work_mem = '64MB';" '\timing on'
    cat "$LOGS/plan.sql"
    printf ' \\bind %s %s %s %s \\g\n' "'$TABLE'" "'$COLUMN'" "'$LARGE_TAG'" "'$SMALL_TAG'"
} >"$LOGS/bare-diff.psql"
# Runs the bare diff once; prints its time in ms.
bare_diff() {
    psql_q -f "$LOGS/bare-diff.psql" >"$LOGS/bare-diff.out"
    sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' "$LOGS/bare-diff.out" | tail -n 1
}
ROUNDS=5
say "   timed: $ROUNDS rounds of (no-op POST /sync, bare diff in psql), after a warm-up of each"
post_sync "$ORIGIN" "$LOGS/noop-warmup.json" >/dev/null
bare_diff >/dev/null
bare_counts="$(grep -v '^Time' "$LOGS/bare-diff.out" | head -n 1)"
phase2_marks="$(mark)"
noop_times=()
bare_times=()
for i in $(seq 1 "$ROUNDS"); do
    t="$(post_sync "$ORIGIN" "$LOGS/noop-$i.json")"
    noop_times+=("$(awk -v t="$t" 'BEGIN { printf "%.1f", t * 1000 }')")
    python3 - "$LOGS/noop-$i.json" <<'PY' || die "no-op re-sync $i was not a no-op ($LOGS/noop-$i.json)"
import json, sys
r = json.load(open(sys.argv[1]))
t = r["totals"]
ok = r["status"] == "finished" and t["new"] == 0 and t["stale"] == 0 and t["embedded"] == 0 and t["batches"] == 0
sys.exit(0 if ok else 1)
PY
    bare_times+=("$(bare_diff)")
    [ -n "${bare_times[-1]}" ] || die "no timing from psql ($LOGS/bare-diff.out)"
    say "   round $i: no-op ${noop_times[-1]} ms, bare diff ${bare_times[-1]} ms"
done
cut_logs "$phase2_marks" noop
# Where the bare diff spends its time, for the record (not timed).
{
    printf '%s\n' "SET work_mem = '64MB';"
    printf 'EXPLAIN (ANALYZE, BUFFERS, TIMING) '
    cat "$LOGS/plan.sql"
    printf ' \\bind %s %s %s %s \\g\n' "'$TABLE'" "'$COLUMN'" "'$LARGE_TAG'" "'$SMALL_TAG'"
} | psql_q -f - >"$LOGS/plan-explain.txt"
noop_requests="$(provider_requests)"
# best median list
stats() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1; s = s (NR > 1 ? ", " : "") sprintf("%.0f", $1) }
        END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.0f %.0f %s\n", a[1], m, s }'
}
read -r noop_best noop_median noop_all < <(stats "${noop_times[@]}")
read -r bare_best bare_median bare_all < <(stats "${bare_times[@]}")
ratio="$(awk -v a="$noop_best" -v b="$bare_best" 'BEGIN { printf "%.2f", a / b }')"
ratio_median="$(awk -v a="$noop_median" -v b="$bare_median" 'BEGIN { printf "%.2f", a / b }')"
# The same query seen from the server (execute time in the Postgres log), inside the worker's
# no-op runs and in psql's runs: what the query costs either way, without any client.
read -r srv_worker srv_psql < <(python3 - "$LOGS/noop.pg" <<'PY'
import re, sys
best = {"worker": None, "psql": None}
rec = re.compile(r"^\S+ \S+ UTC \[\d+\] (\S*) .*?LOG:  duration: ([0-9.]+) ms  execute [^:]*: WITH src AS MATERIALIZED")
lines = open(sys.argv[1], encoding="utf-8", errors="replace").read().split("\n")
for i, line in enumerate(lines):
    m = rec.match(line)
    if not m:
        continue
    # The plan query's text follows on the next lines; it is the one with "AS total".
    body = "\n".join(lines[i + 1 : i + 30])
    if "AS total" not in body.split("\n20")[0]:
        continue
    who = "psql" if m.group(1) == "psql" else "worker"
    d = float(m.group(2))
    best[who] = d if best[who] is None else min(best[who], d)
print("%.0f %.0f" % (best["worker"] or 0, best["psql"] or 0))
PY
)
noop_source_ms="$(python3 -c 'import json, sys
print(sorted(json.load(open(f))["sources"][0]["durationMs"] for f in sys.argv[1:])[len(sys.argv[1:]) // 2])' "$LOGS"/noop-[0-9]*.json)"

# ---------------------------------------------------------------------------------------------
# 3. Change 1% and delete 1% of the rows, and sync once.

say "3. re-sync after changing 1% and deleting 1% of the rows"
changed="$(psql_q -c "WITH u AS (UPDATE $TABLE SET $COLUMN = $COLUMN || ' (revised)' WHERE id % 100 = 1 RETURNING 1) SELECT count(*) FROM u")"
deleted_rows="$(psql_q -c "WITH d AS (DELETE FROM $TABLE WHERE id % 100 = 2 RETURNING 1) SELECT count(*) FROM d")"
provider_reset
marks="$(mark)"
change_secs="$(post_sync "$ORIGIN" "$LOGS/change.json")"
cut_logs "$marks" change
change_requests="$(provider_requests)"
IFS=' ' read -r change_new change_stale change_embedded change_deleted change_status < <(json \
    '" ".join(str(x) for x in (d["totals"]["new"], d["totals"]["stale"], d["totals"]["embedded"], d["totals"]["deleted"], d["status"]))' \
    <"$LOGS/change.json")
[ "$change_status" = finished ] || die "the re-sync after the change did not finish ($LOGS/change.json)"

# ---------------------------------------------------------------------------------------------
# The table.

ms_of() { awk -v t="$1" 'BEGIN { printf "%.0f", t * 1000 }'; }
values_per_sec="$(awk -v n="$N" -v s="$initial_secs" 'BEGIN { printf "%.0f", n / s }')"
loadavg="$(cut -d' ' -f1-3 /proc/loadavg)"

cat <<EOF

embsync sync benchmark: N = $N distinct values, batchSize $BATCH_SIZE, SYNC_MAX_BATCHES $MAX_BATCHES, local provider at zero latency
machine: $(nproc) cpus, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); load average after the run $loadavg

| step | measurement | value |
| --- | --- | ---: |
| 1. initial sync | values | $N |
| | wall time (first cron call to the run finished) | ${initial_secs} s |
| | values/s | $values_per_sec |
| | invocations (\`/__scheduled\` calls; the run's count) | ${#invocation_times[@]}; $run_invocations |
| | time per invocation | $(t="${invocation_times[*]}"; printf '%s' "${t// / s, }") s |
| | provider requests | $initial_requests |
| | inputs sent per model, total / distinct | $initial_inputs |
| | workerd peak RSS: idle before / after the sync | $rss_idle MiB / $rss_peak MiB |
| 2. no-op re-sync | time of one \`POST /sync\`, best / median of $ROUNDS | $noop_best ms / $noop_median ms |
| | all $ROUNDS runs | $noop_all ms |
| | of which inside the source (report's durationMs, median) | $noop_source_ms ms |
| | the plan query inside it, server side (Postgres log, best) | $srv_worker ms |
| | rows sent to the worker (DataRow messages, all statements) | $noop_rows ($noop_bytes bytes from Postgres, $noop_statements statements, $noop_conns connection) |
| | provider requests | $noop_requests |
| 3. re-sync after 1% changed + 1% deleted | time of one \`POST /sync\` | $(ms_of "$change_secs") ms |
| | rows changed / deleted | $changed / $deleted_rows |
| | new / stale (report) | $change_new / $change_stale |
| | embedded / cache rows deleted | $change_embedded / $change_deleted |
| | provider requests | $change_requests |
| 4. bare diff query (psql, \`\\timing\`) | best / median of $ROUNDS warm runs | $bare_best ms / $bare_median ms |
| | all $ROUNDS runs | $bare_all ms |
| | server side (Postgres log, best) | $srv_psql ms |
| | **ratio no-op re-sync / bare diff**, best / median | **${ratio}x** / ${ratio_median}x (target <= 1.5x) |

The bare diff query is the worker's plan query as captured on the wire; its answer (total|new|reusable|embed_tokens|stale|deferred): $bare_counts
EOF

echo
echo "Where the time of the initial sync went:"
python3 "$REPO/bench/sync_breakdown.py" "$LOGS/initial.wrangler" "$LOGS/initial.provider" "$LOGS/initial.pg" "$initial_secs"
echo
echo "Where the time of the 1%-change re-sync went:"
python3 "$REPO/bench/sync_breakdown.py" "$LOGS/change.wrangler" "$LOGS/change.provider" "$LOGS/change.pg" "$change_secs"
echo
echo "The bare diff query's plan (EXPLAIN ANALYZE, one more run; $LOGS/plan-explain.txt while kept):"
sed 's/^/  /' "$LOGS/plan-explain.txt"
echo
echo "Statements of the no-op re-sync and the rows each sent to the worker (through the proxy):"
python3 -c 'import itertools, json, sys
for line in open(sys.argv[1]):
    # A simple query holding several statements (the schema check) is one line.
    for sql, group in itertools.groupby(json.loads(line)["statements"], key=lambda s: s["sql"]):
        group = list(group)
        tag = group[0]["tag"] if len(group) == 1 else "%d statements" % len(group)
        print("  %3d rows  %-17s %s" % (sum(s["rows"] for s in group), tag, sql[:100]))' "$LOGS/wire.jsonl"
