#!/usr/bin/env bash
# Copies the head node's MLflow SQLite store to s3://$RAYTRAIN_AT_BUCKET/mlflow-backup/mlflow.db
# (a consistent snapshot taken with SQLite's online backup API, safe while the server runs).
# start_mlflow.sh restores it on a new head. Run before `ray down` if the head's disk may go:
#   ray exec cluster.yaml 'bash ~/raytrain-at/scripts/cluster/backup_mlflow.sh'
set -euo pipefail
ENV_FILE=${RAYTRAIN_AT_ENV_FILE:-$HOME/.raytrain-at.env}
# shellcheck disable=SC1090
[[ -f "$ENV_FILE" ]] && . "$ENV_FILE"
PROJECT=${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}
DB_FILE=${MLFLOW_HOME:-$HOME/mlflow}/mlflow.db
BUCKET=${RAYTRAIN_AT_BUCKET:?RAYTRAIN_AT_BUCKET is not set}
[[ -f "$DB_FILE" ]] || { echo "[backup] no $DB_FILE" >&2; exit 1; }
snapshot=$(mktemp --suffix=.db)
trap 'rm -f "$snapshot"' EXIT
"$PROJECT/.venv/bin/python" - "$DB_FILE" "$snapshot" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
with dst:
    src.backup(dst)
PY
aws s3 cp --only-show-errors "$snapshot" "s3://$BUCKET/mlflow-backup/mlflow.db"
echo "[backup] $DB_FILE -> s3://$BUCKET/mlflow-backup/mlflow.db"
