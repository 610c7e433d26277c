#!/usr/bin/env bash
# Throughput benchmark (issue 10): the initial sync at a real provider's latency and rate limit.
#
# Usage:
#   bench/throughput.sh [N]     N distinct values in the source (default 100000)
#
# Set up like bench/sync.sh (a throwaway Postgres 18 + pgvector, the local provider, the prebuilt
# worker under `wrangler dev` from a copy of build/ and of wrangler.toml without [build], all
# stopped on exit), then, in one run so that the figures compare as ratios on a shared machine,
# the initial sync of the same N values in each configuration, each on a fresh database (empty
# cache) and a fresh `wrangler dev`:
#   a. one batch at a time: `rate.maxConcurrency` 2 (one batch = one request per model), against
#      the provider at 300 ms + 1 ms per input in its rate-limit mode (3,000 requests and
#      1,000,000 tokens per minute per key and model);
#   b. requests in flight: the default window (`rate` absent), same provider;
#   z. zero latency and no rate limit (a second provider), the default window: to compare with
#      bench/sync.sh's figures;
#   q. fan-out over (local) Cloudflare Queues: wrangler.toml's queue blocks uncommented, ranges of
#      BENCH_RANGE_VALUES (default N/16, at least 500) values, consumed four at a time (local
#      queues deliver one batch at a time, so the ranges consumer gets max_batch_size 4 and
#      max_concurrency 1, and SYNC_QUEUE_CONSUMERS is 4), default window, same provider as a, b.
# Each run is driven by `POST /sync` (which chains invocations while SYNC_CHAIN_SECONDS last),
# again until embedding_sync_runs has the run finished; in q one `POST /sync` fans out and the
# consumers finish the run (the script waits for it). Per configuration it prints values/s,
# and, from the provider's request log (bench/throughput_log.py): the share of the binding rate
# limit used over the sync's duration, the share of 429s among requests, requests in flight
# (max / time-weighted mean), and checks each value was sent once per model (answered requests)
# and the run embedded exactly N values with no errors. workerd's CPU time (utime + stime of the
# wrangler's workerd processes, /proc/<pid>/stat, before and after) per 1,000 values.
#
# Environment:
#   BENCH_SKIP_BUILD=1     skip setup.sh and both builds (they are already done)
#   BENCH_DIMS=48,24       request shorter vectors (when generating 3072-d vectors in the local
#                          provider would be the bottleneck)
#   BENCH_CONFIGS="a b z"  which configurations to run, in this order (q: fan-out, not by default)
#   BENCH_RANGE_VALUES=n   values per range in q (default N/16, at least 500)
#   BENCH_RPM, BENCH_TPM   the provider's limits per key and model (default 3000 and 1000000; the
#                          issue's figures): lower ones make the rate limit bind on a slow machine
#   BENCH_KEEP=1           keep the temporary directory (Postgres data and logs) on success
#   BENCH_RESULTS=FILE     also write the figures as JSON lines to FILE
#   BENCH_PROFILE="b"      configurations whose sync runs under a V8 CPU profile of the worker's
#                          isolate (bench/cpu_profile.mjs, over wrangler's inspector): the profile
#                          is kept in the logs (profile-CFG.cpuprofile, opens in DevTools) and its
#                          summary printed (profile-CFG.txt); implies BENCH_KEEP
set -euo pipefail

# shellcheck source=scripts/env.sh disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
# shellcheck source=scripts/lib.sh disable=SC1091
. "$REPO/scripts/lib.sh"
BENCH_NAME=bench/throughput.sh
BENCH_TAG=throughput
# shellcheck source=bench/lib.sh disable=SC1091
. "$REPO/bench/lib.sh"
cd "$REPO"

N="$(bench_n "${1:-}")"
CONFIGS="${BENCH_CONFIGS:-a b z}"
RANGE_VALUES="${BENCH_RANGE_VALUES:-$(( N / 16 > 500 ? N / 16 : 500 ))}"
BATCH_SIZE=2048
LATENCY_MS=300
LATENCY_PER_INPUT_MS=1
RPM="${BENCH_RPM:-3000}"
TPM="${BENCH_TPM:-1000000}"
TABLE=bench_items
COLUMN=title
LARGE=text-embedding-3-large
SMALL=text-embedding-3-small
LARGE_JSON="\"$LARGE\""
SMALL_JSON="\"$SMALL\""
if [ -n "${BENCH_DIMS:-}" ]; then
    LARGE_JSON="{\"name\":\"$LARGE\",\"dimensions\":${BENCH_DIMS%,*}}"
    SMALL_JSON="{\"name\":\"$SMALL\",\"dimensions\":${BENCH_DIMS#*,}}"
fi

bench_init
[ -z "${BENCH_PROFILE:-}" ] || BENCH_KEEP=1
WRANGLER_PID=""
PROFILER_PID=""
PROVIDER_PID=""
ZERO_PROVIDER_PID=""
LOAD_PID=""
bench_stop_on_exit wrangler WRANGLER_PID
bench_stop_on_exit process PROVIDER_PID
bench_stop_on_exit process ZERO_PROVIDER_PID
bench_stop_on_exit process LOAD_PID
bench_stop_on_exit process PROFILER_PID

# psql on database $1.
psql_db() {
    local db="$1"
    shift
    "$PG_BIN/psql" "${DATABASE_URL%/*}/$db" -X -q -A -t -v ON_ERROR_STOP=1 "$@"
}

# utime + stime of the given processes, in clock ticks.
cpu_ticks() {
    local pid total=0 fields
    for pid in "$@"; do
        # Fields after the command (which may hold spaces): utime and stime are 14 and 15.
        fields="$(sed 's/^.*) //' "/proc/$pid/stat")"
        total=$((total + $(awk '{ print $12 + $13 }' <<<"$fields")))
    done
    echo "$total"
}

# ---------------------------------------------------------------------------------------------
# Build and start everything.

bench_build
bench_copy_worker
# Configuration q: the queue blocks of wrangler.toml uncommented; the ranges consumer takes
# batches of 4 (consumed side by side) one at a time, as local queues deliver them anyway.
python3 - "$WORK/wrangler.toml" "$WORK/wrangler-queues.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
begin, end = text.index("# --- queues begin\n"), text.index("# --- queues end\n")
block = re.sub(r"(?m)^# ?", "", text[begin + len("# --- queues begin\n"):end])
head, dlq = block.split("[[queues.consumers]]\nqueue = \"embsync-ranges-dlq\"")
for key, value in (("max_batch_size", "4"), ("max_concurrency", "1"), ("max_batch_timeout", "0")):
    head, n = re.subn(r"(?m)^%s = .*$" % key, "%s = %s" % (key, value), head)
    assert n == 1, key
block = head + "[[queues.consumers]]\nqueue = \"embsync-ranges-dlq\"" + dlq
open(sys.argv[2], "w").write("# bench/throughput.sh: with fan-out over local queues.\n" + text[:begin] + block + text[end:])
PY
bench_start_pg

say "creating $TABLE with $N distinct values (template database bench_source)"
"$PG_BIN/psql" "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE bench_source"
{
    echo "CREATE EXTENSION IF NOT EXISTS vector;"
    source_table_sql "$TABLE" "$COLUMN"
} | psql_db bench_source -v n="$N"

say "starting the providers: $LATENCY_MS ms + $LATENCY_PER_INPUT_MS ms/input, $RPM RPM, $TPM TPM per model; and one at zero latency"
start_provider provider --latency-ms "$LATENCY_MS" --latency-per-input-ms "$LATENCY_PER_INPUT_MS" \
    --rpm "$RPM" --tpm "$TPM"
PROVIDER_PID="$STARTED_PID"
PROVIDER_ORIGIN="$STARTED_ORIGIN"
start_provider provider-zero
ZERO_PROVIDER_PID="$STARTED_PID"
ZERO_ORIGIN="$STARTED_ORIGIN"

TOKEN="$(bench_token)"

# The load average, sampled every 5 s for the whole bench.
(while :; do printf '%s %s\n' "$(now)" "$(cut -d' ' -f1 /proc/loadavg)"; sleep 5; done) >"$LOGS/load.txt" &
LOAD_PID=$!
# The mean and max of the 1-minute load average sampled between epoch times $1 and $2.
load_between() {
    awk -v a="$1" -v b="$2" '$1 >= a && $1 <= b { s += $2; n++; if ($2 > m) m = $2 }
        END { if (n) printf "%.1f / %.1f", s / n, m; else printf "-" }' "$LOGS/load.txt"
}

TICKS="$(getconf CLK_TCK)"
RESULTS="$LOGS/results.jsonl"
: >"$RESULTS"

# Runs configuration $1 (a, b, z): fresh database, fresh wrangler dev, POST /sync until the run
# is finished; appends its figures to $RESULTS.
run_config() {
    local cfg="$1" rate="" origin_provider="$PROVIDER_ORIGIN" limits=("$RPM" "$TPM")
    local config="$WORK/wrangler.toml" vars=()
    case "$cfg" in
        a) rate=',"rate":{"maxConcurrency":2}' ;;
        b) ;;
        q)
            config="$WORK/wrangler-queues.toml"
            vars=("SYNC_FANOUT_MIN_VALUES:$RANGE_VALUES" "SYNC_FANOUT_RANGE_VALUES:$RANGE_VALUES" "SYNC_QUEUE_CONSUMERS:4")
            ;;
        z) origin_provider="$ZERO_ORIGIN"; limits=() ;;
        *) die "unknown configuration $cfg" ;;
    esac
    local db="bench_$cfg"
    "$PG_BIN/psql" "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $db TEMPLATE bench_source"
    local sources="{\"version\":\"1.0\",\"models\":{\"large\":$LARGE_JSON,\"small\":$SMALL_JSON},\"batchSize\":$BATCH_SIZE$rate,\"sources\":[{\"name\":\"bench\",\"table\":\"$TABLE\",\"column\":\"$COLUMN\",\"enabled\":true}]}"
    local port log inspector
    port="$(free_port)"
    inspector="$(free_port)"
    log="$LOGS/wrangler-$cfg.log"
    local var_args=() v
    for v in "${vars[@]}"; do
        var_args+=(--var "$v")
    done
    WRANGLER_PID="$(BENCH_WRANGLER_CONFIG="$config" BENCH_INSPECTOR_PORT="$inspector" start_wrangler "$port" "${DATABASE_URL%/*}/$db" "$log" "$WORK/state-$cfg" \
        --var "EMBEDDING_SOURCES:$sources" --var "OPENAI_BASE_URL:$origin_provider/v1" "${var_args[@]}")"
    wait_healthy "http://127.0.0.1:$port" "$WRANGLER_PID" "$log" || die "wrangler dev did not answer (log $log)"
    local workerds
    mapfile -t workerds < <(workerds_of "$WRANGLER_PID")
    [ "${#workerds[@]}" -ge 1 ] || die "no workerd process under wrangler $WRANGLER_PID"
    curl -fsS -m 60 -X DELETE "$origin_provider/_admin/requests" >/dev/null
    curl -fsS -m 60 -X DELETE "$origin_provider/_admin/ratelimit" >/dev/null || true

    local profiling=""
    case " ${BENCH_PROFILE:-} " in *" $cfg "*) profiling=1 ;; esac
    if [ -n "$profiling" ]; then
        "$NODE22" "$REPO/bench/cpu_profile.mjs" start "$inspector" "$LOGS/profile-$cfg.cpuprofile" >"$LOGS/profiler-$cfg.out" 2>&1 &
        PROFILER_PID=$!
        local tries=0
        until grep -q started "$LOGS/profiler-$cfg.out" 2>/dev/null; do
            kill -0 "$PROFILER_PID" 2>/dev/null || die "the profiler did not start: $(cat "$LOGS/profiler-$cfg.out")"
            tries=$((tries + 1))
            [ "$tries" -lt 100 ] || die "the profiler did not start in 10 s"
            sleep 0.1
        done
        say "   CPU profile of the worker's isolate: on"
    fi
    say "config $cfg: initial sync of $N values (rate: ${rate:-default})"
    local cpu0 cpu1 t_start t_end finished=0 i code
    cpu0="$(cpu_ticks "${workerds[@]}")"
    t_start="$(now)"
    for i in $(seq 1 20); do
        code="$(curl -sS -m 900 -o "$LOGS/sync-$cfg-$i.json" -w '%{http_code}' \
            -X POST -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$port/sync")"
        say "   POST /sync $i: $code after $(elapsed "$t_start") s"
        finished="$(psql_db "$db" -c "SELECT count(*) FROM embedding_sync_runs WHERE finished_at IS NOT NULL" 2>/dev/null || echo 0)"
        [ "$finished" -ge 1 ] && break
        [ "$code" = 200 ] || [ "$code" = 409 ] || die "POST /sync answered $code: $(cat "$LOGS/sync-$cfg-$i.json")"
        if [ "$cfg" = q ]; then
            # The consumers work and the last one finishes the run: wait for it (an hour at most).
            local waited=0
            while [ "$waited" -lt 7200 ]; do
                finished="$(psql_db "$db" -c "SELECT count(*) FROM embedding_sync_runs WHERE finished_at IS NOT NULL" 2>/dev/null || echo 0)"
                [ "$finished" -ge 1 ] && break
                sleep 0.5
                waited=$((waited + 1))
            done
            say "   the consumers finished the run after $(elapsed "$t_start") s"
            break
        fi
    done
    t_end="$(now)"
    cpu1="$(cpu_ticks "${workerds[@]}")"
    if [ -n "$profiling" ]; then
        kill -TERM "$PROFILER_PID"
        wait "$PROFILER_PID" || true
        PROFILER_PID=""
        "$NODE22" "$REPO/bench/cpu_profile.mjs" summary "$LOGS/profile-$cfg.cpuprofile" 40 >"$LOGS/profile-$cfg.txt"
        say "   CPU profile: $LOGS/profile-$cfg.txt"
        cat "$LOGS/profile-$cfg.txt" >&2
    fi
    [ "$finished" -ge 1 ] || die "config $cfg: the run did not finish"
    local run_status run_invocations run_embedded run_errors complete
    IFS='|' read -r run_status run_invocations run_embedded run_errors < <(psql_db "$db" -c \
        "SELECT status, invocations, report->'totals'->>'embedded', report->'totals'->>'errors' FROM embedding_sync_runs WHERE finished_at IS NOT NULL")
    complete="$(psql_db "$db" -c "SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL")"
    if [ "$run_status" != finished ] || [ "$run_embedded" != "$N" ] || [ "$complete" != "$N" ] || [ "$run_errors" != 0 ]; then
        die "config $cfg: status $run_status, embedded $run_embedded, complete rows $complete, errors $run_errors (expected $N)"
    fi
    curl -fsS -m 300 "$origin_provider/_admin/requests" >"$LOGS/requests-$cfg.json"
    local figures
    figures="$(python3 "$REPO/bench/throughput_log.py" "$LOGS/requests-$cfg.json" "$t_start" "$t_end" "$N" "${limits[@]}")"
    [ "$(json 'd["sent_once"]' <<<"$figures")" = True ] || die "config $cfg: a value was not sent exactly once per model: $figures"
    stop_wrangler "$WRANGLER_PID"
    WRANGLER_PID=""
    local cpu_ms
    cpu_ms="$(awk -v d="$((cpu1 - cpu0))" -v t="$TICKS" -v n="$N" 'BEGIN { printf "%.0f", d * 1000 / t / (n / 1000) }')"
    python3 -c 'import json, sys
d = json.loads(sys.argv[1])
d.update(config=sys.argv[2], invocations=int(sys.argv[3]), workerd_cpu_ms_per_1000=int(sys.argv[4]), load=sys.argv[5], n=int(sys.argv[6]))
print(json.dumps(d))' "$figures" "$cfg" "$run_invocations" "$cpu_ms" "$(load_between "$t_start" "$t_end")" "$N" >>"$RESULTS"
    say "   $(tail -n 1 "$RESULTS")"
}

for cfg in $CONFIGS; do
    run_config "$cfg"
done
[ -z "${BENCH_RESULTS:-}" ] || cp "$RESULTS" "$BENCH_RESULTS"

# ---------------------------------------------------------------------------------------------
# The table.
python3 - "$RESULTS" "$N" "$RPM" "$TPM" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
n = int(sys.argv[2])
names = {"a": "a. one batch at a time (maxConcurrency 2)", "b": "b. requests in flight (default window)",
         "z": "z. zero latency, no rate limit", "q": "q. fan-out over local queues (4 consumers)"}
print()
print("Initial sync of %d values (provider: 300 ms + 1 ms/input, %s RPM / %s TPM per model, except z)" % (n, format(int(sys.argv[3]), ","), format(int(sys.argv[4]), ",")))
print()
print("| configuration | wall s | values/s | invocations | requests | 429s (share) | binding limit used: of limit x time / of buckets | in flight max / mean | workerd CPU ms per 1,000 | load avg mean / max |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    used = "-"
    if "share_of_limit" in r:
        binding = "/".join(sorted({m["binding"] for m in r["models"].values()}))
        used = "%.0f%% / %.0f%% (%s)" % (100 * r["share_of_limit"], 100 * r["share_of_buckets"], binding)
    print("| %s | %.1f | %.0f | %d | %d | %d (%.1f%%) | %s | %d / %.2f | %d | %s |" % (
        names[r["config"]], r["duration_s"], r["values_per_s"], r["invocations"], r["requests"],
        r["429"], 100 * r["share_429"], used, r["in_flight_max"], r["in_flight_mean"],
        r["workerd_cpu_ms_per_1000"], r["load"]))
by = {r["config"]: r for r in rows}
print()
if "a" in by and "b" in by:
    print("b / a: %.2fx values/s" % (by["b"]["values_per_s"] / by["a"]["values_per_s"]))
if "b" in by and "q" in by:
    print("q / b: %.2fx values/s" % (by["q"]["values_per_s"] / by["b"]["values_per_s"]))
for r in rows:
    print("%s: %s" % (r["config"], json.dumps(r["models"])))
PY
