#!/usr/bin/env bash
# Test certificates for TLS between providers and consumers, made with
# Debian's openssl (installed when missing):
#
#   scripts/make-test-certs.sh [DIR]        (default: ./certs)
#
# Writes DIR/ca.pem (a test CA), DIR/server.pem + server.key (for
# localhost and 127.0.0.1, signed by the CA) and DIR/client.pem +
# client.key (a consumer certificate for mutual TLS). Keys are EC P-256,
# valid 30 days. For tests and local runs only: the CA key is thrown away.
set -euo pipefail
dir="${1:-certs}"
if ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$work/ca.key"
# A name of its own per run: two sets made by this script are two CAs to a
# verifier (same-named CAs would fail as a bad signature, not an unknown issuer).
openssl req -x509 -new -key "$work/ca.key" -sha256 -days 30 -subj "/CN=rpc test CA $(date +%s)-$$" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca.pem" 2>/dev/null

leaf() { # name, subject alt names, extended key usage
  key "$dir/$1.key"
  openssl req -new -key "$dir/$1.key" -subj "/CN=$1" -out "$work/$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$2" "$3" >"$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$dir/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -CAserial "$work/ca.srl" \
    -days 30 -sha256 -extfile "$work/$1.ext" -out "$dir/$1.pem" 2>/dev/null
}

leaf server "DNS:localhost,IP:127.0.0.1" serverAuth
leaf client "DNS:consumer" clientAuth
echo "wrote $dir/ca.pem, $dir/server.pem, $dir/server.key, $dir/client.pem, $dir/client.key"
