#!/usr/bin/env bash
# The cluster's MLflow credentials: one account (raytrain-at, the basic-auth app's admin) with a
# random 40-character password, generated on the head at the first `ray up` (head_start_ray_commands)
# and kept from then on. The file is this user's alone (0600 in a 0700 folder); Ray copies it to
# each worker (cluster_synced_files) and node_env.sh turns it into MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD in ~/.raytrain-at.env (also 0600), which every job inherits; the
# server gets the password at start (start_mlflow.sh). It is never written anywhere else.
set -euo pipefail
CREDENTIALS=${RAYTRAIN_AT_MLFLOW_CREDENTIALS:-$HOME/.raytrain-at/mlflow-credentials}
USERNAME=${RAYTRAIN_AT_MLFLOW_USER:-raytrain-at}
mkdir -p "$(dirname "$CREDENTIALS")"
chmod 700 "$(dirname "$CREDENTIALS")"
if [[ ! -s "$CREDENTIALS" ]]; then
    umask 077
    secret=$(tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 40 || true)
    (( ${#secret} == 40 )) || { echo "[credentials] could not read /dev/urandom" >&2; exit 1; }
    tmp=$(mktemp "$CREDENTIALS.XXXX")
    printf 'MLFLOW_TRACKING_USERNAME=%s\nMLFLOW_TRACKING_PASSWORD=%s\n' "$USERNAME" "$secret" > "$tmp"
    mv "$tmp" "$CREDENTIALS"
    echo "[credentials] new MLflow account $USERNAME in $CREDENTIALS"
fi
chmod 600 "$CREDENTIALS"
