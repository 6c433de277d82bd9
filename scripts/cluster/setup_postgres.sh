#!/usr/bin/env bash
# PostgreSQL for the cluster's MLflow store: Debian's/Ubuntu's `postgresql` package, and a
# database `mlflow` owned by a role named after the user who runs the MLflow server, reached over
# the Unix socket with peer authentication (no password exists, so none can leak; nothing listens
# on TCP beyond what the package's default cluster does on localhost).
#
# Usage: setup_postgres.sh                  the system cluster (the head node; uses sudo)
#        setup_postgres.sh --private DIR [--port PORT]
#                                           a throw-away cluster of its own in DIR, its socket in
#                                           DIR, no TCP at all (the cluster rehearsal and the fault
#                                           battery on one machine); run as root it runs the
#                                           server as the `postgres` user
#        setup_postgres.sh --stop DIR       stop that private cluster
# Prints the backend store URI for MLFLOW_BACKEND_STORE_URI on its last line. Idempotent.
set -euo pipefail

SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
PRIVATE=""
PORT=5432
STOP=""
while (( $# )); do
    case "$1" in
        --private) PRIVATE=${2:?--private needs a folder}; shift 2 ;;
        --port) PORT=${2:?--port needs a number}; shift 2 ;;
        --stop) STOP=${2:?--stop needs a folder}; shift 2 ;;
        *) echo "setup_postgres.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# Debian's server binaries live under /usr/lib/postgresql/VERSION/bin.
pg_bin() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n "$found" ]] && echo "$found"
}
as_owner() {  # run a server command as the (non-root) owner of the private cluster
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ -n "$STOP" ]]; then
    BIN=$(pg_bin) || exit 0
    [[ -f "$STOP/data/postmaster.pid" ]] && as_owner "$BIN/pg_ctl" -D "$STOP/data" -m fast -w \
        stop >/dev/null 2>&1 || true
    exit 0
fi

if ! BIN=$(pg_bin) || ! command -v psql >/dev/null || ! command -v pg_dump >/dev/null; then
    echo "[postgres] installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
    $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq postgresql postgresql-client >/dev/null
    BIN=$(pg_bin)
fi
ME=$(id -un)

if [[ -z "$PRIVATE" ]]; then
    # The package's own cluster (started by its systemd unit).
    $SUDO systemctl enable --now postgresql >/dev/null 2>&1 || $SUDO service postgresql start
    if ! $SUDO -u postgres psql -tAc "select 1 from pg_roles where rolname='$ME'" | grep -q 1; then
        $SUDO -u postgres createuser "$ME"
    fi
    if ! $SUDO -u postgres psql -tAc "select 1 from pg_database where datname='mlflow'" \
            | grep -q 1; then
        $SUDO -u postgres createdb -O "$ME" mlflow
    fi
    echo "[postgres] database mlflow owned by $ME on the local socket"
    echo "postgresql+psycopg2:///mlflow?host=/var/run/postgresql"
    exit 0
fi

mkdir -p "$PRIVATE"
DATA=$PRIVATE/data
if [[ $(id -u) -eq 0 ]]; then chown postgres "$PRIVATE"; fi
if [[ ! -f "$DATA/PG_VERSION" ]]; then
    as_owner "$BIN/initdb" -D "$DATA" -A peer --username=postgres >/dev/null
fi
if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -w -l "$PRIVATE/postgres.log" \
        -o "-c listen_addresses='' -k $PRIVATE -p $PORT" start >/dev/null
fi
psql_admin() { as_owner "$BIN/psql" -h "$PRIVATE" -p "$PORT" -U postgres -d postgres "$@"; }
# Peer authentication maps OS user -> role of the same name; as root the server's own user
# (postgres) is the superuser, so root gets a role of its own.
if [[ "$ME" != postgres ]] && ! psql_admin -tAc "select 1 from pg_roles where rolname='$ME'" \
        | grep -q 1; then
    psql_admin -qc "create role \"$ME\" login" >/dev/null
fi
if ! psql_admin -tAc "select 1 from pg_database where datname='mlflow'" | grep -q 1; then
    psql_admin -qc "create database mlflow owner \"$ME\"" >/dev/null
fi
echo "[postgres] private cluster in $PRIVATE (socket only, port $PORT), database mlflow of $ME"
echo "postgresql+psycopg2:///mlflow?host=$PRIVATE&port=$PORT"
