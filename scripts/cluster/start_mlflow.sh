#!/usr/bin/env bash
# The MLflow tracking server of the cluster, on the head node (run by head_start_ray_commands).
#
#   backend store   SQLite on the head's disk ($MLFLOW_HOME/mlflow.db); restored from
#                   s3://$RAYTRAIN_AT_BUCKET/mlflow-backup/mlflow.db when the file is missing and a
#                   backup exists (backup_mlflow.sh writes it). For a store that outlives the
#                   cluster, set MLFLOW_BACKEND_STORE_URI=postgresql://USER@HOST:5432/mlflow in
#                   ~/.raytrain-at.env (password in ~/.pgpass, never in a file of this repository;
#                   needs `pip install psycopg2-binary` in the venv).
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

BUCKET=${RAYTRAIN_AT_BUCKET:-}
if [[ -z "${MLFLOW_ARTIFACTS_DESTINATION:-}" && ( -z "$BUCKET" || "$BUCKET" == CHANGE-ME* ) ]]; then
    echo "[mlflow] RAYTRAIN_AT_BUCKET is not set: set your bucket in cluster.yaml" >&2
    exit 2
fi
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-s3://$BUCKET/mlflow-artifacts}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}
HOST_IP=${MLFLOW_HOST_IP:-${RAYTRAIN_AT_HEAD_IP:-}}
if [[ -z "$HOST_IP" ]]; then
    HOST_IP=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
fi
case "$HOST_IP" in
    ""|0.0.0.0|"*") echo "[mlflow] refusing to bind to '$HOST_IP': need the head's private IP" >&2
                    exit 2 ;;
esac

mkdir -p "$MLFLOW_HOME"
DB_FILE=${BACKEND#sqlite:///}
if [[ "$BACKEND" == sqlite:///* && ! -f "$DB_FILE" && -n "$BUCKET" ]] && command -v aws >/dev/null \
        && aws s3 ls "s3://$BUCKET/mlflow-backup/mlflow.db" >/dev/null 2>&1; then
    echo "[mlflow] restoring $DB_FILE from s3://$BUCKET/mlflow-backup/mlflow.db"
    aws s3 cp --only-show-errors "s3://$BUCKET/mlflow-backup/mlflow.db" "$DB_FILE"
fi

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
setsid nohup "$MLFLOW" server \
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
