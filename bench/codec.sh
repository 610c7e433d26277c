#!/usr/bin/env bash
# Worker-side CPU per 1,000 dual embeddings (issue 4): runs crates/embsync-core/benches/codec.rs
# natively in the bench profile (the workspace's release settings: opt-level "s", LTO, one codegen
# unit, as the worker ships) and prints its table. Results are written up in BENCHMARKS.md.
#
# Usage:
#   bench/codec.sh                 wall-clock table: median and min of 15 runs (about 40 s)
#   bench/codec.sh -- --runs 31    anything after `--` goes to the bench (see codec.rs's header)
#   bench/codec.sh --callgrind     instructions per 1,000 dual embeddings under valgrind's
#                                  callgrind: repeatable whatever else the machine is doing
#                                  (about a minute; needs `apt-get install valgrind`)
#
# Wall-clock figures move with whatever else runs on the machine: the script prints the load
# average first. The callgrind figures do not; they are counted on 100 values (one body of 100
# per model, only the measured calls) and multiplied by 10, which matches a full 1,000-value
# count to within 0.5%.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="time"
if [[ ${1:-} == --callgrind ]]; then
    mode="callgrind"
    shift
fi
[[ ${1:-} == -- ]] && shift

echo "machine: $(nproc) cpus, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); $(rustc -V); load average $(cut -d' ' -f1-3 /proc/loadavg)"

if [[ $mode == time ]]; then
    exec cargo bench --quiet -p embsync-core --bench codec -- "$@"
fi

command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind" >&2; exit 1; }
bin=$(cargo bench --quiet -p embsync-core --bench codec --no-run --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[[ -x $bin ]] || { echo "could not find the built bench binary" >&2; exit 1; }

echo "instructions (Ir) per 1,000 dual embeddings, counted by callgrind on 100 values x 10"
echo
echo "| path | million instructions |"
echo "| --- | ---: |"
for row in "base64:base64 -> pgvector binary" "float:JSON floats -> pgvector binary" "text:JSON floats -> pgvector text" \
    "decode-base64:  part: decode_response, base64" "decode-float:  part: decode_response, floats" \
    "encode-binary:  part: floats -> Vector, bound" "encode-text:  part: pgvector text only"; do
    key=${row%%:*}
    label=${row#*:}
    # Only what runs inside codec::measured is counted: not building the bodies, not the setup.
    ir=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null --collect-atstart=no \
        --toggle-collect='codec::measured' "$bin" --bench --path "$key" --runs 1 --warmup 0 --values 100 --quiet "$@" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
    if [[ -z $ir || $ir == 0 ]]; then
        echo "callgrind counted nothing for $key: are the bench binary's symbols stripped?" >&2
        exit 1
    fi
    awk -v l="$label" -v n="$ir" 'BEGIN { printf "| %s | %.0f |\n", l, n * 10 / 1e6 }'
done
