#!/usr/bin/env bash
# Make the site's TLS material with openssl: a private CA, the broker's server certificate and the enrollment
# server's client certificate. Sites with a PKI of their own issue the same three things from it instead.
#
#   make-certs.sh [--renew] SITE_DIR BROKER_NAME [BROKER_NAME...]
#
# BROKER_NAME: every DNS name or IP address edges and consumers use to reach the broker (they verify it);
# `mosquitto` and `localhost` (the compose network, the host itself) are always added.
#
# Writes (existing files are kept; --renew re-issues the two leaf certificates with the existing CA):
#   SITE_DIR/ca/ca.key, ca.crt            the CA. ca.key signs every certificate the broker trusts on its
#                                         internal listener: keep it offline (it is never mounted anywhere)
#   SITE_DIR/broker-certs/ca.crt, broker.crt, broker.key        mounted into the broker
#   SITE_DIR/server-certs/ca.crt, client.crt, client.key        the enrollment server's (CN=enrollment-server)
# Private keys are created mode 0600; deploy/central/init-site.sh hands them to the containers' users.
set -euo pipefail

CA_DAYS=3650
LEAF_DAYS=825
SERVER_CN=enrollment-server

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

renew=0
if [ "${1:-}" = "--renew" ]; then renew=1; shift; fi
[ $# -ge 2 ] || usage
site=$1; shift
command -v openssl >/dev/null || { echo "make-certs: openssl is needed" >&2; exit 2; }

umask 077
mkdir -p "$site/ca" "$site/broker-certs" "$site/server-certs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

san="DNS:mosquitto,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

if [ ! -f "$site/ca/ca.key" ]; then
    newkey "$site/ca/ca.key"
    openssl req -x509 -new -key "$site/ca/ca.key" -sha256 -days "$CA_DAYS" -subj "/CN=faceattend site CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$site/ca/ca.crt"
    echo "make-certs: new CA $site/ca/ca.crt"
fi

# issue NAME CN EXTENSIONS [NOTE]: NAME.key (new) and NAME.crt signed by the CA
issue() {
    local key=$1.key crt=$1.crt cn=$2 ext=$3
    if [ -f "$crt" ] && [ "$renew" -eq 0 ]; then echo "make-certs: keeping $crt"; return; fi
    newkey "$key"
    printf '%s\n' "$ext" >"$tmp/ext"
    openssl req -new -key "$key" -subj "/CN=$cn" -out "$tmp/req.csr"
    openssl x509 -req -in "$tmp/req.csr" -CA "$site/ca/ca.crt" -CAkey "$site/ca/ca.key" -CAcreateserial \
        -sha256 -days "$LEAF_DAYS" -extfile "$tmp/ext" -out "$crt" 2>/dev/null
    chmod 644 "$crt"
    echo "make-certs: issued $crt (CN=$cn)${4:+, $4}"
}

issue "$site/broker-certs/broker" "${1}" \
    "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san" "$san"
issue "$site/server-certs/client" "$SERVER_CN" \
    "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

for d in broker-certs server-certs; do
    cp "$site/ca/ca.crt" "$site/$d/ca.crt"
    chmod 644 "$site/$d/ca.crt"
done
chmod 755 "$site/broker-certs" "$site/server-certs"
openssl verify -CAfile "$site/ca/ca.crt" "$site/broker-certs/broker.crt" "$site/server-certs/client.crt" >/dev/null
