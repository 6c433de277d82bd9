#!/usr/bin/env bash
# The MLflow tracking server of the cluster, on the head node (run by head_start_ray_commands);
# what each part does and why is in docs/cluster.md, "The registry".
#   backend store   PostgreSQL (Debian's on the head via setup_postgres.sh, or the RDS address
#                   MLFLOW_BACKEND_STORE_URI names in ~/.raytrain-at.env; sqlite:/// taken as
#                   given); an empty database first gets the latest checked dump, or the server
#                   refuses to start (raytrain_at/registry/store_dumps.py restore-if-empty)
#   authentication  MLflow's basic-auth app with the account of mlflow_credentials.sh; 401
#                   without it; only /health is open
#   artifacts       proxied to s3://$RAYTRAIN_AT_BUCKET/mlflow-artifacts ($AWS_ENDPOINT_URL:
#                   an S3-compatible store instead, as in the rehearsal)
#   network         the head's private IP and 127.0.0.1 (Ray's SSH tunnel), never 0.0.0.0;
#                   only Host headers naming these two are answered
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
BACKUP_TOOL=("$PROJECT/.venv/bin/python" -m raytrain_at.registry.store_dumps)
[[ -x "${BACKUP_TOOL[0]}" ]] || BACKUP_TOOL[0]=$(dirname "$MLFLOW")/python
# libpq (psql, pg_restore) takes the URI without SQLAlchemy's driver suffix; messages name the
# database without any password an URI may carry.
PG_URI=${BACKEND/#postgresql+psycopg2:/postgresql:}
SHOWN=$(sed -E 's#//[^/@]*@#//#; s#\?.*##' <<< "$BACKEND")

case "$BACKEND" in
    # An empty database gets the latest dump, or the server does not start (store_dumps.py).
    postgresql*) { reason=$("${BACKUP_TOOL[@]}" restore-if-empty "$BACKUPS" "$PG_URI" \
                            --shown "$SHOWN" --work "$MLFLOW_HOME" --log "$LOG" 2>&1 1>&3) \
                       || refuse "${reason#\[mlflow-backups\] }"; } 3>&1 ;;
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
