#!/usr/bin/env bash
# The MLflow tracking server of the cluster, on the head node (run by head_start_ray_commands).
#
#   backend store   PostgreSQL: by default Debian's server on the head (setup_postgres.sh, the
#                   local socket, peer authentication); MLFLOW_BACKEND_STORE_URI in
#                   ~/.raytrain-at.env names another one (an RDS address: postgresql://USER@HOST/
#                   mlflow, its password in ~/.pgpass, never in a file of this repository).
#                   When the database holds no tables the latest dump that backup_mlflow.sh wrote
#                   (s3://$RAYTRAIN_AT_BUCKET/mlflow-backup/postgres/, or $MLFLOW_BACKUP_STORE) is
#                   restored first: downloaded to a temporary file, its SHA-256 checked, restored
#                   in one transaction. The server refuses to start (one line, exit 1) when that
#                   fails, when the dumps cannot be listed, or when there is no dump although the
#                   store was initialised before (its INITIALISED marker); set
#                   RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY=1 to start empty anyway. The very first start
#                   (no marker, no dump) writes the marker. A sqlite:/// URI (one machine, no
#                   dumps) is taken as given.
#   authentication  MLflow's basic-auth app: every API call needs the account of
#                   mlflow_credentials.sh (its file, 0600), unauthenticated ones get 401; /health
#                   stays open. The users live in $MLFLOW_HOME/basic_auth.db, re-created when the
#                   credentials change.
#   artifacts       proxied by the server to s3://$RAYTRAIN_AT_BUCKET/mlflow-artifacts, so clients
#                   (workers, your laptop) need no S3 credentials, only the head's IAM role does.
#                   $AWS_ENDPOINT_URL, when set, names an S3-compatible store instead of AWS S3
#                   (the rehearsal's, tests/support/cluster_rehearsal.sh); the s3:// URIs stay
#                   the same.
#   network         bound to the head's private IP (workers reach it there) and to 127.0.0.1
#                   (what `ray attach cluster.yaml -p 5000` forwards to: Ray's SSH tunnel ends at
#                   localhost on the head); never 0.0.0.0. gunicorn serves both addresses (uvicorn,
#                   MLflow's default, binds only one). The security group opens only SSH to the
#                   outside, and MLflow answers only Host headers naming these two addresses.
#
# Idempotent: a running server (pid file + live process) is left alone. Logs go to ~/mlflow.log.
# Usage: start_mlflow.sh            start unless running, then wait until /health answers
#        start_mlflow.sh --stop     stop the server this script started
set -euo pipefail

ENV_FILE=${RAYTRAIN_AT_ENV_FILE:-$HOME/.raytrain-at.env}
# shellcheck disable=SC1090
[[ -f "$ENV_FILE" ]] && . "$ENV_FILE"
PROJECT=${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}
MLFLOW=${MLFLOW_BIN:-$PROJECT/.venv/bin/mlflow}
MLFLOW_HOME=${MLFLOW_HOME:-$HOME/mlflow}
PORT=${MLFLOW_PORT:-5000}
LOG=${MLFLOW_LOG:-$HOME/mlflow.log}
PID_FILE=$MLFLOW_HOME/mlflow.pid
WORKERS=${MLFLOW_WORKERS:-4}

running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid=$(cat "$PID_FILE")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && grep -qa mlflow "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

if [[ "${1:-}" == "--stop" ]]; then
    if pid=$(running_pid); then
        # setsid made the server its own process group: stop the CLI and its gunicorn workers.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "[mlflow] stopped (pid $pid)"
    fi
    rm -f "$PID_FILE"
    exit 0
fi

if pid=$(running_pid); then
    echo "[mlflow] already running (pid $pid)"
    exit 0
fi

refuse() { echo "[mlflow] refusing to start: $*" >&2; exit 1; }

BUCKET=${RAYTRAIN_AT_BUCKET:-}
if [[ -z "${MLFLOW_ARTIFACTS_DESTINATION:-}" && ( -z "$BUCKET" || "$BUCKET" == CHANGE-ME* ) ]]; then
    echo "[mlflow] RAYTRAIN_AT_BUCKET is not set: set your bucket in cluster.yaml" >&2
    exit 2
fi
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-s3://$BUCKET/mlflow-artifacts}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg2:///mlflow?host=/var/run/postgresql}
HOST_IP=${MLFLOW_HOST_IP:-${RAYTRAIN_AT_HEAD_IP:-}}
if [[ -z "$HOST_IP" ]]; then
    HOST_IP=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
fi
case "$HOST_IP" in
    ""|0.0.0.0|"*") echo "[mlflow] refusing to bind to '$HOST_IP': need the head's private IP" >&2
                    exit 2 ;;
esac

CREDENTIALS=${RAYTRAIN_AT_MLFLOW_CREDENTIALS:-$HOME/.raytrain-at/mlflow-credentials}
[[ -s "$CREDENTIALS" ]] || refuse "no MLflow credentials at $CREDENTIALS" \
    "(scripts/cluster/mlflow_credentials.sh writes them)"
ADMIN=$(sed -n 's/^MLFLOW_TRACKING_USERNAME=//p' "$CREDENTIALS")
SECRET=$(sed -n 's/^MLFLOW_TRACKING_PASSWORD=//p' "$CREDENTIALS")
[[ -n "$ADMIN" && -n "$SECRET" ]] || refuse "$CREDENTIALS holds no username and password"

mkdir -p "$MLFLOW_HOME"
chmod 700 "$MLFLOW_HOME"
BACKUPS=${MLFLOW_BACKUP_STORE:-}
[[ -n "$BACKUPS" ]] || BACKUPS=${BUCKET:+s3://$BUCKET/mlflow-backup/postgres}
BACKUPS=${BACKUPS:-$MLFLOW_HOME/backups}
BACKUP_TOOL=("$PROJECT/.venv/bin/python" "$(dirname "$0")/mlflow_backups.py")
[[ -x "${BACKUP_TOOL[0]}" ]] || BACKUP_TOOL=("$(dirname "$MLFLOW")/python" "${BACKUP_TOOL[1]}")
# libpq (psql, pg_restore) takes the URI without SQLAlchemy's driver suffix; messages name the
# database without any password an URI may carry.
PG_URI=${BACKEND/#postgresql+psycopg2:/postgresql:}
SHOWN=$(sed -E 's#//[^/@]*@#//#; s#\?.*##' <<< "$BACKEND")

restore_if_empty() {
    local tables latest rc folder
    tables=$(psql -XtAq -d "$PG_URI" -c "select count(*) from information_schema.tables
        where table_schema = current_schema()" 2>&1) \
        || refuse "PostgreSQL $SHOWN does not answer: $(head -n 1 <<< "$tables")"
    (( tables == 0 )) || return 0
    rc=0
    latest=$("${BACKUP_TOOL[@]}" latest "$BACKUPS") || rc=$?
    if (( rc == 3 )); then
        rc=0
        "${BACKUP_TOOL[@]}" initialised "$BACKUPS" || rc=$?
        if (( rc == 0 )) && [[ "${RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY:-0}" != 1 ]]; then
            refuse "$SHOWN is empty and $BACKUPS has no dump, though the store was initialised" \
                "(restore one by hand, or set RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY=1 to start empty)"
        fi
        (( rc == 0 || rc == 3 )) || refuse "cannot read $BACKUPS"
        echo "[mlflow] $SHOWN is empty and has no dump yet: a new store" >> "$LOG"
        "${BACKUP_TOOL[@]}" mark "$BACKUPS" || refuse "cannot write the marker to $BACKUPS"
        return 0
    fi
    (( rc == 0 )) || refuse "cannot list the dumps in $BACKUPS"
    folder=$(mktemp -d "$MLFLOW_HOME/restore.XXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$folder'" EXIT
    local reason
    # One line in all: the tool's own message goes into the refusal.
    reason=$("${BACKUP_TOOL[@]}" get "$BACKUPS" "$latest" "$folder/mlflow.dump" 2>&1) \
        || refuse "downloading $BACKUPS/$latest failed (${reason#\[mlflow-backups\] }):" \
                  "$SHOWN stays empty"
    pg_restore --list "$folder/mlflow.dump" > /dev/null 2>&1 \
        || refuse "$BACKUPS/$latest is not a pg_dump archive: $SHOWN stays empty"
    # One transaction: a restore that fails half-way leaves the database empty, so the next
    # start refuses again instead of serving a partial store.
    if ! pg_restore --no-owner --no-privileges --exit-on-error --single-transaction \
            -d "$PG_URI" "$folder/mlflow.dump" >> "$LOG" 2>&1; then
        refuse "restoring $BACKUPS/$latest into $SHOWN failed (see $LOG): it stays empty"
    fi
    echo "[mlflow] restored $SHOWN from $BACKUPS/$latest"
    rm -rf "$folder"
}
case "$BACKEND" in
    postgresql*) restore_if_empty ;;
    sqlite:///*) ;;
    *) refuse "MLFLOW_BACKEND_STORE_URI must be postgresql://... or sqlite:///..." ;;
esac

# The basic-auth app: its configuration names the admin (never the password: the server reads
# that from its environment when it creates the user) and keeps the users beside the server.
AUTH_DB=$MLFLOW_HOME/basic_auth.db
AUTH_KEY=$MLFLOW_HOME/basic_auth.key
# The admin's password is set once, when the user store is created: new credentials (a new
# file) need a new user store.
fingerprint=$(printf '%s:%s' "$ADMIN" "$SECRET" | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$AUTH_KEY" 2>/dev/null)" != "$fingerprint" ]]; then
    rm -f "$AUTH_DB"
    (umask 077; echo "$fingerprint" > "$AUTH_KEY")
fi
AUTH_CONFIG=$MLFLOW_HOME/basic_auth.ini
(umask 077; cat > "$AUTH_CONFIG" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$AUTH_DB
admin_username = $ADMIN
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
)

# MLflow's S3 client (boto3) takes its endpoint from MLFLOW_S3_ENDPOINT_URL.
if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
    export MLFLOW_S3_ENDPOINT_URL=${MLFLOW_S3_ENDPOINT_URL:-$AWS_ENDPOINT_URL}
fi
# The second address, loopback, unless the head's address is loopback already (the local twin,
# cluster_local.yaml, or the rehearsal): gunicorn would bind the same address twice and fail.
EXTRA_BIND="--bind 127.0.0.1:$PORT "
[[ "$HOST_IP" == 127.0.0.1 ]] && EXTRA_BIND=""
# Host headers MLflow answers (DNS-rebinding guard): the two addresses it listens on.
export MLFLOW_SERVER_ALLOWED_HOSTS="localhost,localhost:$PORT,127.0.0.1,127.0.0.1:$PORT,$HOST_IP,$HOST_IP:$PORT"
echo "[mlflow] $(date -u +%FT%TZ) starting: backend ${BACKEND%%:*}, artifacts $ARTIFACTS," \
     "listening on $HOST_IP:$PORT and 127.0.0.1:$PORT" >> "$LOG"
# --timeout: gunicorn's default 30 s would cut off large proxied artifact uploads (weights).
# The password and the session key reach the server's environment only (not its command line,
# which `ps` shows to every user).
MLFLOW_AUTH_CONFIG_PATH=$AUTH_CONFIG MLFLOW_AUTH_ADMIN_PASSWORD=$SECRET \
MLFLOW_FLASK_SERVER_SECRET_KEY=$(tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 40 || true) \
setsid nohup "$MLFLOW" server --app-name basic-auth \
    --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ARTIFACTS" \
    --host "$HOST_IP" --port "$PORT" --workers "$WORKERS" \
    --gunicorn-opts "${EXTRA_BIND}--timeout 600" \
    >> "$LOG" 2>&1 < /dev/null &
echo $! > "$PID_FILE"

for _ in $(seq 120); do
    if curl -fsS -m 2 "http://$HOST_IP:$PORT/health" >/dev/null 2>&1; then
        echo "[mlflow] running (pid $(cat "$PID_FILE")): http://$HOST_IP:$PORT, log $LOG"
        exit 0
    fi
    running_pid >/dev/null || break
    sleep 0.5
done
echo "[mlflow] did not come up; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
