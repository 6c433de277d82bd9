#!/usr/bin/env bash
# Dumps the head node's MLflow store (PostgreSQL, pg_dump's custom format) to a new, timestamped
# key under s3://$RAYTRAIN_AT_BUCKET/mlflow-backup/postgres/ (or $MLFLOW_BACKUP_STORE, a folder
# on the local twin), with its SHA-256 beside it, and keeps the newest
# $RAYTRAIN_AT_MLFLOW_KEEP_DUMPS (24) of them. start_mlflow.sh restores the newest into an empty
# database. Never overwrites a dump, and never adds the dump of an empty store once dumps exist
# (a wiped database must not push the good dumps out). cron runs it hourly on the head
# (schedule_backup.sh); by hand, e.g. before `ray down` when the head's disk may go:
#   ray exec cluster.yaml 'bash ~/raytrain-at/scripts/cluster/backup_mlflow.sh'
set -euo pipefail
ENV_FILE=${RAYTRAIN_AT_ENV_FILE:-$HOME/.raytrain-at.env}
# shellcheck disable=SC1090
[[ -f "$ENV_FILE" ]] && . "$ENV_FILE"
PROJECT=${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}
MLFLOW_HOME=${MLFLOW_HOME:-$HOME/mlflow}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg2:///mlflow?host=/var/run/postgresql}
KEEP=${RAYTRAIN_AT_MLFLOW_KEEP_DUMPS:-24}
BUCKET=${RAYTRAIN_AT_BUCKET:-}
BACKUPS=${MLFLOW_BACKUP_STORE:-}
[[ -n "$BACKUPS" ]] || BACKUPS=${BUCKET:+s3://$BUCKET/mlflow-backup/postgres}
BACKUPS=${BACKUPS:-$MLFLOW_HOME/backups}
PYTHON=${RAYTRAIN_AT_PYTHON:-$PROJECT/.venv/bin/python}
TOOL=(-m raytrain_at.registry.store_dumps)
fail() { echo "[backup] $*" >&2; exit 1; }
[[ "$BACKEND" == postgresql* ]] || fail "the store is not PostgreSQL ($BACKEND): nothing to dump"
PG_URI=${BACKEND/#postgresql+psycopg2:/postgresql:}

# One backup at a time (cron and a hand-started one).
mkdir -p "$MLFLOW_HOME"
exec 9> "$MLFLOW_HOME/.backup.lock"
flock -n 9 || fail "another backup is running"
folder=$(mktemp -d)
trap 'rm -rf "$folder"' EXIT
pg_dump --format=custom --no-owner --no-privileges -d "$PG_URI" -f "$folder/mlflow.dump" \
    || fail "pg_dump failed"
# Not `grep -q`: it stops reading early, and pg_restore's SIGPIPE would fail the pipeline.
listed=$(pg_restore --list "$folder/mlflow.dump") || fail "pg_restore cannot read the dump"
grep -Eq " TABLE [a-z_]+ runs " <<< "$listed" \
    || fail "the dump holds no MLflow tables: not uploading it"
rows=$(psql -XtAq -d "$PG_URI" -c \
    "select (select count(*) from runs) + (select count(*) from registered_models)")
if (( rows == 0 )) && "$PYTHON" "${TOOL[@]}" latest "$BACKUPS" > /dev/null; then
    fail "the store holds no runs or models while $BACKUPS has dumps: not adding an empty one"
fi
name=$("$PYTHON" "${TOOL[@]}" put "$BACKUPS" "$folder/mlflow.dump" --keep "$KEEP") \
    || fail "uploading to $BACKUPS failed"
echo "[backup] $(date -u +%FT%TZ) $BACKUPS/$name ($(du -h "$folder/mlflow.dump" | cut -f1))"
