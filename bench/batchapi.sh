#!/usr/bin/env bash
# Batch API benchmark (issue 11): a backfill of N values through OpenAI's Batch API, against the
# local provider's /v1/files and /v1/batches.
#
# Usage:
#   bench/batchapi.sh [N]     N distinct values in the source (default 100000)
#
# Set up like bench/throughput.sh (a throwaway Postgres 18 + pgvector, the local provider, the
# prebuilt worker under `wrangler dev` from a copy of build/ and of wrangler.toml without
# [build], all stopped on exit). The config sends a model through the Batch API from 10,000
# pending values (`batchApi.minValues`), so both models' N values go that way. Then:
#   1. `POST /sync`: the run plans, uploads the request files, creates one batch per file and
#      pauses (`pendingBatches`); the time it took is printed.
#   2. The provider completes every batch BENCH_COMPLETION_MS (default 3000) after its creation
#      (`/_admin/batch`); the script polls `GET /_admin/batches` until all are `completed`.
#   3. `POST /sync` again until the run is finished (the worker chains invocations while an
#      output is left partly read at the invocation's time budget): this reads the output files,
#      streamed, and stores the vectors.
# It prints the time from the batches' completion to all values stored (the last batch ended
# in embedding_sync_batches) and to the run finished (its end builds the HNSW indexes), and
# workerd's memory while reading the output: the resident memory (VmRSS) of the wrangler's
# workerd processes sampled every 100 ms from /proc during step 3 (the largest sample of the
# largest process, and its idle value before step 3), and their peak (VmHWM) at the end; and
# the isolate's WebAssembly memory, which the worker logs after each trigger (`memory` event). It
# checks that the cache holds N rows with both embeddings, that no value went the synchronous
# way (the provider's request log has no embeddings request), and that the report's usage is
# all at the batch price.
#
# The local provider makes the output's vectors while it sends them (OpenAI serves a stored
# file), so the time to stored includes the provider's work on the same machine.
#
# Environment:
#   BENCH_SKIP_BUILD=1       skip setup.sh and both builds (they are already done)
#   BENCH_DIMS=256,128       request shorter vectors (default: the models' full 3072 and 1536)
#   BENCH_COMPLETION_MS=n    the provider's in-progress time of a batch (default 3000)
#   BENCH_KEEP=1             keep the temporary directory (Postgres data and logs) on success
#   BENCH_RESULTS=FILE       also write the figures as a JSON line to FILE
set -euo pipefail

# shellcheck source=scripts/env.sh disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
# shellcheck source=scripts/lib.sh disable=SC1091
. "$REPO/scripts/lib.sh"
BENCH_NAME=bench/batchapi.sh
BENCH_TAG=batchapi
# shellcheck source=bench/lib.sh disable=SC1091
. "$REPO/bench/lib.sh"
cd "$REPO"

N="$(bench_n "${1:-}")"
# The tree the worker is built from (a dirty tree is marked).
COMMIT="$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- src crates || echo '+changes')"
[ "$N" -ge 10000 ] || die "N must be at least 10000 (batchApi.minValues)"
COMPLETION_MS="${BENCH_COMPLETION_MS:-3000}"
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
WRANGLER_PID=""
PROVIDER_PID=""
SAMPLER_PID=""
bench_stop_on_exit wrangler WRANGLER_PID
bench_stop_on_exit process PROVIDER_PID
bench_stop_on_exit process SAMPLER_PID

psql_db() {
    "$PG_BIN/psql" "$DATABASE_URL" -X -q -A -t -v ON_ERROR_STOP=1 "$@"
}

bench_build
bench_copy_worker
bench_start_pg

say "creating $TABLE with $N distinct values"
{
    echo "CREATE EXTENSION IF NOT EXISTS vector;"
    source_table_sql "$TABLE" "$COLUMN"
} | psql_db -v n="$N"

start_provider provider
PROVIDER_PID="$STARTED_PID"
PROVIDER_ORIGIN="$STARTED_ORIGIN"
curl -fsS -m 60 -X POST -H 'content-type: application/json' \
    -d "{\"validatingMs\": 200, \"completionMs\": $COMPLETION_MS, \"finalizingMs\": 200}" \
    "$PROVIDER_ORIGIN/_admin/batch" >/dev/null

TOKEN="$(bench_token)"
SOURCES="{\"version\":\"1.0\",\"models\":{\"large\":$LARGE_JSON,\"small\":$SMALL_JSON},\"batchSize\":2048,\"batchApi\":{\"enabled\":true,\"minValues\":10000},\"sources\":[{\"name\":\"bench\",\"table\":\"$TABLE\",\"column\":\"$COLUMN\",\"enabled\":true}]}"
PORT="$(free_port)"
LOG="$LOGS/wrangler.log"
WRANGLER_PID="$(start_wrangler "$PORT" "$DATABASE_URL" "$LOG" "$WORK/state" \
    --var "EMBEDDING_SOURCES:$SOURCES" --var "OPENAI_BASE_URL:$PROVIDER_ORIGIN/v1")"
wait_healthy "http://127.0.0.1:$PORT" "$WRANGLER_PID" "$LOG" || die "wrangler dev did not answer (log $LOG)"
mapfile -t WORKERDS < <(workerds_of "$WRANGLER_PID")
[ "${#WORKERDS[@]}" -ge 1 ] || die "no workerd process under wrangler $WRANGLER_PID"

# POST /sync; prints the HTTP status, the body goes to $1.
post_sync() {
    curl -sS -m 900 -o "$1" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/sync"
}

# VmRSS (kB) of each workerd, in MiB, the largest.
rss_now() {
    local pid
    for pid in "${WORKERDS[@]}"; do
        awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true
    done | sort -n | tail -n 1
}
peak_hwm() {
    local pid
    for pid in "${WORKERDS[@]}"; do
        awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true
    done | sort -n | tail -n 1 | awk '{ printf "%.0f", $1 / 1024 }'
}

say "1. POST /sync: plan, upload and create the batches"
t0="$(now)"
code="$(post_sync "$LOGS/sync-1.json")"
submit_s="$(elapsed "$t0")"
[ "$code" = 200 ] || die "POST /sync answered $code: $(cat "$LOGS/sync-1.json")"
status="$(json 'd["status"]' <"$LOGS/sync-1.json")"
pending="$(json 'd.get("pendingBatches")' <"$LOGS/sync-1.json")"
[ "$status" = paused ] || die "the first trigger should pause for its batches, not end $status: $(cat "$LOGS/sync-1.json")"
say "   submitted in $submit_s s: $pending"

say "2. waiting for the provider to complete the batches"
while :; do
    batches="$(curl -fsS -m 60 "$PROVIDER_ORIGIN/_admin/batches")"
    open="$(json 'sum(1 for b in d if b["status"] != "completed")' <<<"$batches")"
    [ "$open" = 0 ] && break
    sleep 0.5
done
t_completed="$(now)"
nbatches="$(json 'len(d)' <<<"$batches")"
say "   $nbatches batches completed"

say "3. POST /sync until the run is finished (reading the output)"
rss_idle_kb="$(rss_now)"
(while :; do printf '%s %s\n' "$(now)" "$(rss_now)"; sleep 0.1; done) >"$LOGS/rss.txt" &
SAMPLER_PID=$!
finished=0
for i in $(seq 2 30); do
    code="$(post_sync "$LOGS/sync-$i.json")"
    say "   POST /sync $i: $code after $(elapsed "$t_completed") s"
    [ "$code" = 200 ] || [ "$code" = 409 ] || die "POST /sync answered $code: $(cat "$LOGS/sync-$i.json")"
    finished="$(psql_db -c "SELECT count(*) FROM embedding_sync_runs WHERE finished_at IS NOT NULL")"
    [ "$finished" -ge 1 ] && break
    sleep 1
done
[ "$finished" -ge 1 ] || die "the run did not finish"
# When the last batch was read to its end (its values stored), and when the run finished (after
# the run's end: orphans, HNSW indexes), as Postgres recorded them.
t_stored="$(psql_db -c "SELECT extract(epoch FROM max(finished_at)) FROM embedding_sync_batches")"
t_finished="$(psql_db -c "SELECT extract(epoch FROM max(finished_at)) FROM embedding_sync_runs")"
stop_process "$SAMPLER_PID"
SAMPLER_PID=""
stored_s="$(awk -v a="$t_completed" -v b="$t_stored" 'BEGIN { printf "%.1f", b - a }')"
finished_s="$(awk -v a="$t_completed" -v b="$t_finished" 'BEGIN { printf "%.1f", b - a }')"
rss_peak_mib="$(awk '{ if ($2 > m) m = $2 } END { printf "%.0f", m / 1024 }' "$LOGS/rss.txt")"
rss_idle_mib="$(awk -v k="$rss_idle_kb" 'BEGIN { printf "%.0f", k / 1024 }')"
hwm_mib="$(peak_hwm)"
# The largest WebAssembly memory the worker logged after a trigger (`memory` events): the
# isolate's linear memory, which only grows, so its high-water mark.
wasm_mibs() { grep '"event":"memory"' "$LOG" | sed 's/.*"wasmBytes":\([0-9]*\).*/\1/' | awk '{ printf "%.0f\n", $1 / 1048576 }'; }
wasm_submit_mib="$(wasm_mibs | head -n 1)"
wasm_mib="$(wasm_mibs | tail -n 1)"

# Checks.
report="$LOGS/sync-$i.json"
[ "$(json 'd["status"]' <"$report")" = finished ] || die "the last trigger did not finish the run: $(cat "$report")"
rows="$(psql_db -c "SELECT count(*) FROM embedding_cache WHERE embedding_large IS NOT NULL AND embedding_small IS NOT NULL")"
[ "$rows" = "$N" ] || die "$rows complete cache rows, not $N"
embeddings="$(curl -fsS -m 60 "$PROVIDER_ORIGIN/_admin/requests" | json 'sum(1 for r in d if r.get("path", "").endswith("/embeddings"))')"
[ "$embeddings" = 0 ] || die "$embeddings requests went the synchronous way"
all_batch="$(json 'all(d["usage"][m]["batchPromptTokens"] == d["usage"][m]["promptTokens"] > 0 for m in ("large", "small"))' <"$report")"
[ "$all_batch" = True ] || die "the usage is not all Batch API usage: $(json 'd["usage"]' <"$report")"
cost="$(json 'd["usage"]["costUsd"]' <"$report")"
invocations="$(json 'd["invocations"]' <"$report")"

loadavg="$(cut -d' ' -f1-3 /proc/loadavg)"
cat <<EOF

## bench/batchapi.sh: $N values through the Batch API ($(date -u +%Y-%m-%d), worker built from $COMMIT)
machine: $(nproc) cpus, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); load average after the run $loadavg
dimensions: ${BENCH_DIMS:-3072,1536}; provider in progress ${COMPLETION_MS} ms per batch

| what | figure |
| --- | ---: |
| plan, upload and create ($nbatches batches) | $submit_s s |
| batches completed to all $N values stored (the last batch ended) | $stored_s s |
| batches completed to the run finished (with its end: indexes) | $finished_s s |
| invocations of the run | $invocations |
| workerd RSS while reading: idle before / largest sample | $rss_idle_mib MiB / $rss_peak_mib MiB |
| workerd peak RSS (VmHWM) at the end | $hwm_mib MiB |
| the isolate's WebAssembly memory (high-water mark): after step 1 / after step 3 | ${wasm_submit_mib:-?} MiB / ${wasm_mib:-?} MiB |
| report's costUsd (batch price) | \$$cost |
EOF
if [ -n "${BENCH_RESULTS:-}" ]; then
    printf '{"n": %s, "dims": "%s", "batches": %s, "submit_s": %s, "stored_s": %s, "finished_s": %s, "rss_idle_mib": %s, "rss_peak_mib": %s, "hwm_mib": %s, "wasm_mib": %s, "invocations": %s}\n' \
        "$N" "${BENCH_DIMS:-3072,1536}" "$nbatches" "$submit_s" "$stored_s" "$finished_s" "$rss_idle_mib" "$rss_peak_mib" "$hwm_mib" "${wasm_mib:-null}" "$invocations" >>"$BENCH_RESULTS"
fi
