#!/usr/bin/env bash
# Writes ~/.raytrain-at.env, the environment every process on a cluster node shares, and sources
# it from ~/.bashrc (the Ray launcher runs every set-up and start command in an interactive bash,
# so Ray itself, its workers and `ray attach` shells all see it):
#   AWS_DEFAULT_REGION   the cluster's region
#   RAYTRAIN_AT_BUCKET   the S3 bucket (betons/, ray-results/, mlflow-artifacts/, mlflow-backup/)
#   RAYTRAIN_AT_STORAGE  s3://BUCKET/ray-results: the storage root every node sees (Ray Train
#                        checkpoints, Tune results, the sharded evaluation's chunk records);
#                        a multi-node run refuses to start without one
#   RAYTRAIN_AT_DATA     where stage_data.sh puts the .beton files: the same path on every node,
#                        because the driver expands $RAYTRAIN_AT_DATA and ships the result to the
#                        workers
#   MLFLOW_TRACKING_URI  the MLflow server on the head node's private IP
#   PATH                 the project's virtual environment first (ray, raytrain-at, mlflow)
#   RAY_AUTH_MODE=token  Ray's token authentication on every node (token: ~/.ray/auth_token)
#   MLFLOW_DISABLE_TELEMETRY=true  MLflow 3.17's telemetry thread sets and unsets an environment
#                        variable while other threads iterate the environment: a KeyError that
#                        killed a training worker in the cluster rehearsal
#   NCCL_* and FI_*      on GPU nodes only (nvidia-smi answers), the EFA ones only where an EFA
#                        device is up (p4d/p5 with EFA interfaces: docs/cluster.md); the head
#                        (CPU) and the local twin get none. Each is explained where it is written.
#
# Usage: node_env.sh [--bucket NAME] [--region REGION] [LOCAL TWIN OPTIONS]
#   --bucket, --region   set once by the first setup command; later calls keep the stored values
#                        (the region is the cluster's, for the aws CLI and Ray's S3 storage)
# Options of the local twin (cluster_local.yaml, `ray up` over SSH on one machine), given at every
# call; cluster.yaml uses none of them:
#   --no-bucket          no object store: MLflow artifacts on the head's disk ($HOME/mlflow/
#                        artifacts) and datasets copied from $HOME/raytrain-at-betons/
#   --head-ip IP         the head's address instead of its private IP (127.0.0.1 on one machine)
#   --mlflow-port PORT   the MLflow server's port instead of 5000
#   The head's IP is $RAY_HEAD_IP, which the Ray launcher exports to every set-up and start
#   command it runs on a worker node; on the head node (where it is not set) it is this node's
#   own private IP. Re-run at every Ray start, so a head that comes back with a new IP is
#   followed.
set -euo pipefail

ENV_FILE=${RAYTRAIN_AT_ENV_FILE:-$HOME/.raytrain-at.env}
PROJECT=${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}
DATA_LINK=${RAYTRAIN_AT_DATA_LINK:-/mnt/raytrain-at-data}
BUCKET=""
REGION=""
NO_BUCKET=0
HEAD_IP_OPTION=""
MLFLOW_PORT_OPTION=""
while (( $# )); do
    case "$1" in
        --bucket) BUCKET=${2:?--bucket needs a name}; shift 2 ;;
        --region) REGION=${2:?--region needs a name}; shift 2 ;;
        --no-bucket) NO_BUCKET=1; shift ;;
        --head-ip) HEAD_IP_OPTION=${2:?--head-ip needs an address}; shift 2 ;;
        --mlflow-port) MLFLOW_PORT_OPTION=${2:?--mlflow-port needs a port}; shift 2 ;;
        *) echo "node_env.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

stored() { [[ -f "$ENV_FILE" ]] && sed -n "s/^export $1=//p" "$ENV_FILE" | tail -n 1; }
[[ -n "$BUCKET" ]] || BUCKET=$(stored RAYTRAIN_AT_BUCKET || true)
[[ -n "$REGION" ]] || REGION=$(stored AWS_DEFAULT_REGION || true)
if (( NO_BUCKET )); then
    BUCKET=""
elif [[ -z "$BUCKET" || "$BUCKET" == CHANGE-ME* ]]; then
    echo "node_env.sh: set your S3 bucket in cluster.yaml (setup_commands: --bucket NAME)" >&2
    exit 2
fi

# This node's private IP: what Ray itself registers (the source address of the default route).
private_ip() {
    local ip
    ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
    [[ -n "$ip" ]] || ip=$(hostname -I | awk '{print $1}')
    echo "$ip"
}
HEAD_IP=${RAY_HEAD_IP:-${HEAD_IP_OPTION:-$(private_ip)}}
MLFLOW_PORT=${MLFLOW_PORT_OPTION:-5000}
if [[ ! "$MLFLOW_PORT" =~ ^[0-9]+$ ]]; then
    echo "node_env.sh: --mlflow-port needs a number, not '$MLFLOW_PORT'" >&2
    exit 2
fi

# Ray's token authentication: every node uses the head's token (generated on the head by
# head_start_ray_commands, copied to workers by cluster_synced_files before their set-up). The
# mode is set explicitly because Ray 2.60 enables it by itself only for `ray start --head` (when
# ~/.ray/auth_token exists), never for a joining node, which would then be refused.
TOKEN=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [[ -n "${RAY_HEAD_IP:-}" && ! -s "$TOKEN" ]]; then
    echo "node_env.sh: no Ray auth token at $TOKEN (cluster_synced_files copies the head's)" >&2
    exit 1
fi

# The MLflow account (mlflow_credentials.sh on the head, cluster_synced_files to workers):
# exported to every job; the env file is 0600 (mktemp) like the credentials themselves.
CREDENTIALS=${RAYTRAIN_AT_MLFLOW_CREDENTIALS:-$HOME/.raytrain-at/mlflow-credentials}
if [[ -n "${RAY_HEAD_IP:-}" && ! -s "$CREDENTIALS" ]]; then
    echo "node_env.sh: no MLflow credentials at $CREDENTIALS (cluster_synced_files copies them)" >&2
    exit 1
fi
tmp=$(mktemp "$ENV_FILE.XXXX")
cat > "$tmp" <<ENV
# Written by scripts/cluster/node_env.sh; rewritten at every Ray start.
${BUCKET:+export RAYTRAIN_AT_BUCKET=$BUCKET}
${BUCKET:+export RAYTRAIN_AT_STORAGE=s3://$BUCKET/ray-results}
${REGION:+export AWS_DEFAULT_REGION=$REGION}
export RAYTRAIN_AT_DATA=$DATA_LINK
export MLFLOW_TRACKING_URI=http://$HEAD_IP:$MLFLOW_PORT
${MLFLOW_PORT_OPTION:+export MLFLOW_PORT=$MLFLOW_PORT_OPTION}
export RAYTRAIN_AT_HEAD_IP=$HEAD_IP
export RAY_AUTH_MODE=token
export MLFLOW_DISABLE_TELEMETRY=true
case ":\$PATH:" in *":$PROJECT/.venv/bin:"*) ;; *) export PATH="$PROJECT/.venv/bin:\$PATH" ;; esac
ENV
if (( NO_BUCKET )); then
    # The local twin: start_mlflow.sh and stage_data.sh read these instead of the bucket.
    cat >> "$tmp" <<ENV
export MLFLOW_ARTIFACTS_DESTINATION=$HOME/mlflow/artifacts
export RAYTRAIN_AT_BETON_SOURCE=$HOME/raytrain-at-betons/
ENV
fi
if [[ -s "$CREDENTIALS" ]]; then
    sed -n 's/^\(MLFLOW_TRACKING_USERNAME\|MLFLOW_TRACKING_PASSWORD\)=\([A-Za-z0-9_.-]*\)$/export \1=\2/p' \
        "$CREDENTIALS" >> "$tmp"
fi
# NCCL on GPU nodes. NVIDIA_SMI / FI_INFO / OFI_NCCL: where the image has them (overridable
# for tests, which have neither a GPU nor EFA).
NVIDIA_SMI=${RAYTRAIN_AT_NVIDIA_SMI:-nvidia-smi}
FI_INFO=${RAYTRAIN_AT_FI_INFO:-/opt/amazon/efa/bin/fi_info}
OFI_NCCL=${RAYTRAIN_AT_OFI_NCCL:-/opt/amazon/ofi-nccl}
EFA_LIB=${RAYTRAIN_AT_EFA_LIB:-/opt/amazon/efa/lib}
if "$NVIDIA_SMI" -L >/dev/null 2>&1; then
    cat >> "$tmp" <<'ENV'
# NCCL's warnings (a transport falling back, a failed collective) reach the worker logs; INFO
# would print every ring and channel of every rank.
export NCCL_DEBUG=WARN
# The interface NCCL's bootstrap and socket transport use: not loopback (other nodes cannot reach
# it) and not Docker's bridge (the DLAMI runs dockerd; docker0 is a local-only address).
export NCCL_SOCKET_IFNAME=^lo,docker
ENV
    # EFA only where the device is up: fi_info lists the efa provider's RDM endpoints once
    # the node was launched with EFA interfaces (otherwise FI_PROVIDER=efa leaves libfabric
    # without a provider and the plugin's initialisation fails on every rank).
    if [[ -x "$FI_INFO" ]] && "$FI_INFO" -p efa -t FI_EP_RDM >/dev/null 2>&1; then
        cat >> "$tmp" <<'ENV'
# libfabric's provider for aws-ofi-nccl: EFA, never a TCP provider that would hide a broken EFA.
export FI_PROVIDER=efa
# GPUDirect RDMA: EFA reads and writes GPU memory directly (A100 on p4d, H100 on p5 support it).
export FI_EFA_USE_DEVICE_RDMA=1
ENV
        if [[ -f "$OFI_NCCL/lib/libnccl-net-ofi.so" ]]; then
            # torch's wheel brings its own NCCL, which loads a network plugin only by name:
            # NCCL_NET_PLUGIN=ofi dlopens libnccl-net-ofi.so (the DLAMI's aws-ofi-nccl), found
            # through LD_LIBRARY_PATH with libfabric's libraries. Without it NCCL's multi-node
            # collectives run over TCP sockets.
            cat >> "$tmp" <<ENV
export NCCL_NET_PLUGIN=ofi
case ":\${LD_LIBRARY_PATH:-}:" in *":$OFI_NCCL/lib:"*) ;; *) export LD_LIBRARY_PATH="$OFI_NCCL/lib:$EFA_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" ;; esac
ENV
        fi
    fi
fi
chmod 600 "$tmp"
mv "$tmp" "$ENV_FILE"

BASHRC=${RAYTRAIN_AT_BASHRC:-$HOME/.bashrc}
LINE="[ -f $ENV_FILE ] && . $ENV_FILE"
grep -qxF "$LINE" "$BASHRC" 2>/dev/null || echo "$LINE" >> "$BASHRC"
echo "[node_env] $ENV_FILE: bucket ${BUCKET:-none}, MLflow at http://$HEAD_IP:$MLFLOW_PORT"
