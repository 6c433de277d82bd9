#!/usr/bin/env bash
# Runs backup_mlflow.sh every hour on the head (this user's crontab; idempotent: the one line it
# owns is replaced, other entries are kept). Output goes to ~/mlflow-backup.log.
# Usage: schedule_backup.sh [--no-cron]
#   --no-cron   print the line only (the local twin, cluster_local.yaml: that crontab is the
#               machine's and would outlive the twin)
set -euo pipefail
NO_CRON=0
case "${1:-}" in
    "") ;;
    --no-cron) NO_CRON=1 ;;
    *) echo "schedule_backup.sh: unknown argument $1" >&2; exit 2 ;;
esac
PROJECT=${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}
MINUTE=${RAYTRAIN_AT_BACKUP_MINUTE:-17}
MARK="# raytrain-at MLflow backup"
LINE="$MINUTE * * * * bash $PROJECT/scripts/cluster/backup_mlflow.sh >> $HOME/mlflow-backup.log 2>&1 $MARK"
if (( NO_CRON )); then
    echo "[backup] not scheduled (--no-cron); the line would be: $LINE"
    exit 0
fi
if ! command -v crontab >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq cron >/dev/null
fi
{ crontab -l 2>/dev/null | grep -vF "$MARK" || true; echo "$LINE"; } | crontab -
echo "[backup] hourly at :$MINUTE: $PROJECT/scripts/cluster/backup_mlflow.sh"
