#!/usr/bin/env bash
# Writes a throwaway certificate authority and two server certificates it signed, for the TLS
# tests (scripts/test.sh) and for trying TLS by hand.
#
# Usage: scripts/tls-certs.sh DIR
#
#   DIR/ca.crt                          the CA: what a client must trust (for `wrangler dev`,
#                                       NODE_EXTRA_CA_CERTS=DIR/ca.crt)
#   DIR/server.crt, DIR/server.key      for `localhost` and 127.0.0.1 (scripts/pg.sh start
#                                       DATA_DIR PORT --tls DIR serves it)
#   DIR/wrong-name.crt, wrong-name.key  for `wrong-name.invalid` only: signed by the same CA, but
#                                       naming another host
#
# EC P-256 keys, valid for two days. The CA's key is deleted once both certificates are signed,
# so nothing else can ever be signed with it. Needs the openssl command.
set -euo pipefail

die() {
    printf 'tls-certs.sh: %s\n' "$*" >&2
    exit 1
}

[ $# -eq 1 ] || {
    sed -n '5,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
command -v openssl >/dev/null || die "the openssl command is missing: install it (Debian: apt-get install openssl)"

dir="$1"
mkdir -p "$dir"
cd "$dir"
days=2
# openssl prints progress on stderr; it is kept only when a command fails.
log="$(mktemp)"
trap 'rm -f "$log" ca.key ./*.csr ./*.ext ca.srl' EXIT

run() {
    "$@" >"$log" 2>&1 || {
        cat "$log" >&2
        die "failed: $*"
    }
}

run openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -keyout ca.key -out ca.crt -subj "/CN=embsync throwaway test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# Signs a certificate NAME.crt (key NAME.key) for the subjectAltNames $2 with the CA.
issue() {
    local name="$1" sans="$2"
    run openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$name.key" -out "$name.csr" -subj "/CN=embsync test $name"
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$sans" >"$name.ext"
    run openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
        -extfile "$name.ext" -out "$name.crt"
    chmod 600 "$name.key"
    run openssl verify -CAfile ca.crt "$name.crt"
}

issue server "DNS:localhost,IP:127.0.0.1"
issue wrong-name "DNS:wrong-name.invalid"
printf '==> [tls-certs] CA %s/ca.crt; server certificates server.crt (localhost, 127.0.0.1) and wrong-name.crt\n' "$PWD"
