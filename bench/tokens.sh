#!/usr/bin/env bash
# CPU of counting tokens per batch of 100 values: the worker's estimate against the exact
# cl100k_base tokenizer (tiktoken-rs), and the exact tokenizer's load time; natively and as
# wasm32-wasip1 under Node 22's WASI. Runs crates/embsync-core/benches/tokens.rs in the bench
# profile (the workspace's release settings). Results are written up in BENCHMARKS.md.
#
# Usage: bench/tokens.sh [-- --runs N]
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$REPO"
[[ ${1:-} == -- ]] && shift

echo "machine: $(nproc) cpus, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1); $(rustc -V); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "native:"
cargo bench --quiet -p embsync-core --bench tokens -- "$@"
echo
echo "wasm32-wasip1 under $("$NODE22" --version):"
CARGO_TARGET_WASM32_WASIP1_RUNNER="$NODE22 --no-warnings $REPO/scripts/wasi-run.mjs" \
    cargo bench --quiet -p embsync-core --bench tokens --target wasm32-wasip1 -- "$@"
