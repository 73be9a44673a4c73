#!/usr/bin/env bash
# Prepare a site's directory for deploy/central/compose.yaml (run once, as root, on the central host).
#
#   init-site.sh [--site SITE] [--postgres] SITE_DIR BROKER_NAME [BROKER_NAME...]
#
#   SITE_DIR     the site's own files, outside the repository (e.g. /srv/faceattend); becomes FACEATTEND_HOME
#   BROKER_NAME  every DNS name / IP address the doors use to reach the broker; the first one goes into the
#                doors' configs (mqtts://BROKER_NAME:8883)
#   --site       the site id (default: main)
#   --postgres   use PostgreSQL (compose.postgres.yaml) instead of SQLite
#
# Makes: TLS material (deploy/mosquitto/make-certs.sh), the broker's auth directory (the shipped ACL, an empty
# password file), server.yaml with a random admin token (mode 0400), postgres.password with --postgres, an empty
# provisioned/ directory and compose.env. Files that exist are kept, so running it again is harmless.
# Ownership: the server container runs as uid 10001, group 1883; the broker as uid 1883 (eclipse-mosquitto).
set -euo pipefail

SERVER_UID=10001
BROKER_GID=1883
BROKER_UID=1883

here=$(cd "$(dirname "$0")" && pwd)
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

site_id=main
postgres=0
while [ $# -gt 0 ]; do
    case $1 in
        --site) site_id=${2:?--site needs a value}; shift 2 ;;
        --postgres) postgres=1; shift ;;
        -h|--help) usage ;;
        --*) echo "init-site: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || usage
home=$1; shift
broker_name=$1
if ! [[ $site_id =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; then
    echo "init-site: --site $site_id is not a valid id ([A-Za-z0-9][A-Za-z0-9_.-]{0,63})" >&2
    exit 2
fi

as_root=0
[ "$(id -u)" -eq 0 ] && as_root=1
own() { if [ "$as_root" -eq 1 ]; then chown "$@"; fi; }
random_secret() { openssl rand -hex 32; }

umask 027
mkdir -p "$home"
chmod 0750 "$home"

"$here/../mosquitto/make-certs.sh" "$home" "$@"
own "$BROKER_UID:$BROKER_GID" "$home/broker-certs/broker.key"
own "$SERVER_UID:$BROKER_GID" "$home/server-certs/client.key"

mkdir -p "$home/broker-auth"
[ -f "$home/broker-auth/acl" ] || install -m 0640 "$here/../mosquitto/acl" "$home/broker-auth/acl"
[ -f "$home/broker-auth/passwords" ] || install -m 0640 /dev/null "$home/broker-auth/passwords"
chmod 0750 "$home/broker-auth"
# the server writes (provisioning), the broker reads through the group
own -R "$SERVER_UID:$BROKER_GID" "$home/broker-auth"

mkdir -p "$home/provisioned"
chmod 0700 "$home/provisioned"
own "$SERVER_UID:$BROKER_GID" "$home/provisioned"

if [ "$postgres" -eq 1 ]; then
    if [ ! -f "$home/postgres.password" ]; then
        (umask 077 && random_secret >"$home/postgres.password")
    fi
    database_url="postgresql+psycopg://faceattend:$(cat "$home/postgres.password")@postgres:5432/faceattend"
else
    database_url=/var/lib/faceattend/db/faceattend.db
fi

if [ ! -f "$home/server.yaml" ]; then
    token=$(random_secret)
    (
        umask 077
        sed -e "s|@SITE@|$site_id|" -e "s|@DATABASE_URL@|$database_url|" -e "s|@ADMIN_TOKEN@|$token|" \
            "$here/server.yaml.example" >"$home/server.yaml"
    )
    chmod 0400 "$home/server.yaml"
    own "$SERVER_UID:$BROKER_GID" "$home/server.yaml"
    echo "init-site: wrote $home/server.yaml (the admin token is in it: api.token)"
else
    echo "init-site: keeping $home/server.yaml"
fi

if [ ! -f "$home/compose.env" ]; then
    cat >"$home/compose.env" <<EOF
COMPOSE_PROJECT_NAME=faceattend
FACEATTEND_HOME=$home
FACEATTEND_BROKER_PUBLIC_URL=mqtts://$broker_name:8883
EOF
    chmod 0640 "$home/compose.env"
fi

[ "$as_root" -eq 1 ] || echo "init-site: not root: file owners not set for the containers (see docs/deployment.md)" >&2
compose="docker compose --env-file $home/compose.env -f $here/compose.yaml"
[ "$postgres" -eq 1 ] && compose="$compose -f $here/compose.postgres.yaml"
cat <<EOF
init-site: $home is ready. Next:
  $compose build
  $compose run --rm server init
  $compose up -d
  $compose run --rm server provision-device --device <door-id> --camera door=/dev/video0
Keep $home/ca/ca.key offline once the certificates are issued; back up $home (docs/deployment.md).
EOF
