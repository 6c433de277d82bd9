#!/usr/bin/env bash
# The cluster rehearsal: a Ray cluster on this machine that behaves like separate machines, and
# the main job through it end to end on the bundled digits.
#
#   disks          each node's processes run in a mount namespace of their own (unshare), where
#                  $WORK/node is that node's folder ($WORK/real/NAME) and the other nodes'
#                  folders are hidden: one path on every node, like /home/ubuntu on every
#                  machine, with other content. HOME, TMPDIR, the Ray temp folder, the working
#                  folder and the staged datasets lie there; a path that one node writes and
#                  ships to another names nothing (or something else) on the other node
#   object store   moto's S3 server on 127.0.0.1 (a real S3 API): s3://$BUCKET, the same URIs
#                  as on AWS, only AWS_ENDPOINT_URL differs
#   MLflow         scripts/cluster/start_mlflow.sh on the head, as cluster.yaml starts it: the
#                  basic-auth app (the account of mlflow_credentials.sh, handed to every node's
#                  processes through the environment as node_env.sh does), a PostgreSQL backend
#                  (a private cluster of Debian's server, socket only: setup_postgres.sh
#                  --private), artifacts proxied to s3://$BUCKET/mlflow-artifacts, a pg_dump to
#                  s3://$BUCKET/mlflow-backup/postgres at the end (backup_mlflow.sh)
#   Ray            `ray start --head` (0 CPUs, like the AWS head) and two worker nodes (1 CPU
#                  each), each in its node's namespace (what it starts, raylet and workers,
#                  inherits it), on ports of their own; every command gets the address
#                  explicitly; every driver command runs in the head's namespace
#   data           the digits written once with original pixels and copied to every node's
#                  disk at the same path ($WORK/node/data, like stage_data.sh's RAYTRAIN_AT_DATA)
#   storage root   RAYTRAIN_AT_STORAGE=s3://$BUCKET/raytrain-at (what node_env.sh writes):
#                  checkpoints, evaluation state
#
# Steps (each prints one "[rehearsal] ..." line; the run ends with "REHEARSAL PASSED"):
#   -  a probe: a file the head writes under its HOME is not seen by node1's and node2's Ray
#      tasks, whose HOME is the same path
#   0. a multi-node run without a storage root stops with one line naming the setting
#   1. clean pre-training (2 workers, one per node) -> its selected epoch is runs:/ID/model
#   2. adversarial training from that reference (model.init=runs:/ID/model); rank 1's worker
#      process killed by PID in epoch 2 or 3 once epoch 1's checkpoint is committed (uploads
#      are asynchronous) -> the run completes from a committed checkpoint
#   3. sharded AutoAttack over both nodes; the driver killed by PID after the first records;
#      node2 lost (its processes killed by PID) in another evaluation: its shard is retried
#      on node1 (evaluation units are idempotent, Ray retries their tasks) and the result
#      equals one process's; re-run on node1 -> the result equals a single-process
#      evaluation's
#   4. register the model; a separate process that knows only the tracking URI loads the
#      champion and predicts
# Every process started is stopped by its PID at the end, pass or fail.
#
# Usage: tests/support/cluster_rehearsal.sh [--work DIR] [--keep] [--code DIR [--only-evaluation]]
#   --work DIR   working folder (default: a new /tmp/rtr-XXXX; short, Ray's socket paths)
#   --keep       keep the working folder (logs, results) afterwards
#   --code DIR   the checkout whose raytrain_at runs (default: this one), e.g. an older one to
#                show what the rehearsal catches
#   --only-evaluation
#                with --code: only step 3 runs that checkout's code, on a model this checkout
#                trains first (1 clean epoch on a Ray instance of the head's own), for code
#                whose training cannot run here (step 0 is skipped with --code anyway)
# Needs root, or unprivileged user namespaces (then unshare --user --map-root-user too).
# About 6-9 minutes on 2 CPU cores.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || PY=$(command -v python3)
BIN=$(dirname "$PY")
WORK=""
KEEP=0
CODE=$ROOT
ONLY_EVALUATION=0
while (( $# )); do
    case "$1" in
        --work) WORK=${2:?--work needs a folder}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --code) CODE=$(cd "${2:?--code needs a folder}" && pwd); shift 2 ;;
        --only-evaluation) ONLY_EVALUATION=1; shift ;;
        *) echo "cluster_rehearsal.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if (( ONLY_EVALUATION )) && [[ "$CODE" == "$ROOT" ]]; then
    echo "cluster_rehearsal.sh: --only-evaluation needs --code DIR" >&2; exit 2
fi
for tool in "$BIN/ray" "$BIN/mlflow"; do
    [[ -x "$tool" ]] || { echo "cluster_rehearsal.sh: $tool not found (run make setup)" >&2; exit 2; }
done
"$PY" -c "import moto.server" 2>/dev/null \
    || { echo "cluster_rehearsal.sh: moto[server] is not installed (pip install -e '.[dev]')" >&2
         exit 2; }
if [[ -z "$WORK" ]]; then WORK=$(mktemp -d /tmp/rtr-XXXX); else mkdir -p "$WORK"; fi
WORK=$(cd "$WORK" && pwd)
PROCS="$PY $ROOT/tests/support/rehearsal_procs.py"
STARTED=()    # PIDs this script started directly (moto, drivers); Ray's and MLflow's are below

say() { echo "[rehearsal] $(date -u +%T) $*"; }
fail() { echo "[rehearsal] FAILED: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    [[ -n "${MLFLOW_HOME:-}" ]] && on_head bash "$ROOT/scripts/cluster/start_mlflow.sh" --stop >/dev/null
    if [[ -n "${PG_DIR:-}" ]]; then
        bash "$ROOT/scripts/cluster/setup_postgres.sh" --stop "$PG_DIR" >/dev/null 2>&1
        (( KEEP || rc != 0 )) || rm -rf "$PG_DIR"
    fi
    $PROCS stop "$WORK" || rc=1
    for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    # A failed run keeps its folder: the logs say what went wrong.
    if (( KEEP || rc != 0 )); then echo "[rehearsal] kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mapfile -t PORTS < <($PROCS ports 24 3 61)  # 24 single ports, 3 worker-port ranges
S3_PORT=${PORTS[0]}; MLFLOW_PORT=${PORTS[1]}; GCS_PORT=${PORTS[2]}; DASH_PORT=${PORTS[3]}
PG_PORT=${PORTS[4]}  # names the private PostgreSQL's socket (it listens on no TCP port)
ENDPOINT=http://127.0.0.1:$S3_PORT
BUCKET=rehearsal-$(basename "$WORK" | tr 'A-Z_' 'a-z-')
STORAGE=s3://$BUCKET/raytrain-at
ADDRESS=127.0.0.1:$GCS_PORT
TRACKING=http://127.0.0.1:$MLFLOW_PORT
mkdir -p "$WORK/pids" "$WORK/logs" "$WORK/ns" "$WORK/store" "$WORK/node"

# The cluster's MLflow account, generated on the head's disk as `ray up` does
# (mlflow_credentials.sh: 0600); node_env.sh hands it to every node's processes as
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and so does COMMON below.
CREDENTIALS=$WORK/real/head/home/.raytrain-at/mlflow-credentials
RAYTRAIN_AT_MLFLOW_CREDENTIALS=$CREDENTIALS bash "$ROOT/scripts/cluster/mlflow_credentials.sh" \
    > /dev/null || fail "mlflow_credentials.sh"
[[ $(stat -c %a "$CREDENTIALS") == 600 ]] || fail "the credentials file is not 0600"
MLFLOW_USER=$(sed -n 's/^MLFLOW_TRACKING_USERNAME=//p' "$CREDENTIALS")
MLFLOW_SECRET=$(sed -n 's/^MLFLOW_TRACKING_PASSWORD=//p' "$CREDENTIALS")

# What every node's processes share (node_env.sh writes the same on a cluster). No credentials
# in files but the one above: moto accepts any key.
COMMON=(PATH="$BIN:/usr/bin:/bin" PYTHONPATH="$CODE" AWS_ACCESS_KEY_ID=rehearsal
        AWS_SECRET_ACCESS_KEY=rehearsal AWS_DEFAULT_REGION=us-east-1 AWS_ENDPOINT_URL="$ENDPOINT"
        RAYTRAIN_AT_STORAGE="$STORAGE" MLFLOW_TRACKING_URI="$TRACKING"
        MLFLOW_TRACKING_USERNAME="$MLFLOW_USER" MLFLOW_TRACKING_PASSWORD="$MLFLOW_SECRET"
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')"
        RAY_USAGE_STATS_ENABLED=0 RAYTRAIN_AT_PID_DIR="$WORK/pids" HF_HUB_OFFLINE=1
        OMP_NUM_THREADS=1 LANG=C.UTF-8
        # MLflow's telemetry thread sets and unsets a variable while other threads read the
        # environment (a KeyError that killed a training worker here); node_env.sh does the same.
        MLFLOW_DISABLE_TELEMETRY=true
        # A build cache, not state: DeepSpeed's CPU op compiled once (about 25 s), not per node.
        TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}")
# Each node's disk: $WORK/real/NAME, which that node's processes (and only they) see at $NODE,
# the same path on every node. A node's process runs in a mount namespace of its own where $NODE
# is a bind mount of its folder and $WORK/real lies under an empty tmpfs; processes it starts
# (`ray start`: raylet, agents, workers) inherit the namespace, and it dies with them. Logs, PID
# files and the S3 store's files stay outside $NODE: they are not a node's disk.
NODE=$WORK/node
# TMPDIR on the node's disk too: Ray restores a checkpoint from S3 into a temporary folder named
# after it, which two "machines" sharing /tmp would download into (and delete under) each
# other's feet.
node_env() { echo HOME="$NODE/home" TMPDIR="$NODE/tmp" "${COMMON[@]}"; }
for node in head node1 node2; do
    mkdir -p "$WORK/real/$node/home" "$WORK/real/$node/work" "$WORK/real/$node/tmp"
done
# shellcheck disable=SC2016  # expanded by the namespace's sh
NODE_SH='work=$1 name=$2 ns=$3; shift 3
mount --bind "$work/real/$name" "$work/node" \
    && mount -t tmpfs -o size=1m,mode=0755 other-nodes "$work/real" || exit 97
[ -z "$ns" ] || readlink /proc/self/ns/mnt > "$ns"
cd "$work/node/work" && exec "$@"'
UNSHARE=(unshare --mount --propagation private)
(( EUID == 0 )) || UNSHARE+=(--user --map-root-user)
"${UNSHARE[@]}" -- sh -c 'mount -t tmpfs -o size=1m probe "$1"' sh "$WORK/node" 2>/dev/null \
    || fail "${UNSHARE[*]} cannot mount here: the nodes' separate disks need root or" \
            "unprivileged user namespaces"
# in_node NAME NS-FILE|"" CMD...: CMD as a process of node NAME, in its working folder (NS-FILE:
# where to write the namespace's id). exec all the way: a command started in the background is
# then $! itself, so killing that PID kills it.
in_node() {
    local name=$1 ns=$2; shift 2
    exec "${UNSHARE[@]}" -- sh -c "$NODE_SH" sh "$WORK" "$name" "$ns" "$@"
}
read -r -a HEAD_ENV <<< "$(node_env head)"
on_head() { (in_node head "" env -i "${HEAD_ENV[@]}" "$@"); }

# ---------------------------------------------------------------- the object store
say "S3 store (moto) on $ENDPOINT, bucket $BUCKET"
# Not on a node: the store is a service of its own (S3), with files of its own.
env -i "${COMMON[@]}" HOME="$WORK/store" TMPDIR="$WORK/store" "$PY" -m moto.server \
    -H 127.0.0.1 -p "$S3_PORT" > "$WORK/logs/moto.log" 2>&1 &
STARTED+=($!)
on_head "$PY" - "$BUCKET" <<'EOF'
import os, sys, time, urllib.request
import pyarrow.fs as pafs
endpoint = os.environ["AWS_ENDPOINT_URL"]
for _ in range(150):
    try:
        urllib.request.urlopen(endpoint, timeout=1).close()
        break
    except OSError:
        time.sleep(0.2)
pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(sys.argv[1])
EOF

# ---------------------------------------------------------------- MLflow on the head
# PostgreSQL: not under $WORK (0700): run as root, the server runs as the `postgres` user.
PG_DIR=$(mktemp -d /tmp/rtr-pg-XXXX)
chmod 755 "$PG_DIR"
BACKEND=$(bash "$ROOT/scripts/cluster/setup_postgres.sh" --private "$PG_DIR" --port "$PG_PORT" \
          2> "$WORK/logs/postgres-setup.log" | tail -n 1) \
    || { cat "$WORK/logs/postgres-setup.log" >&2; fail "setup_postgres.sh --private"; }
say "MLflow tracking server on $TRACKING (basic auth, PostgreSQL in $PG_DIR, artifacts" \
    "proxied to s3://$BUCKET)"
MLFLOW_HOME=$NODE/home/mlflow
HEAD_ENV+=(RAYTRAIN_AT_BUCKET="$BUCKET" MLFLOW_HOME="$MLFLOW_HOME" MLFLOW_PORT="$MLFLOW_PORT"
           MLFLOW_HOST_IP=127.0.0.1 MLFLOW_BIN="$BIN/mlflow" MLFLOW_WORKERS=1
           MLFLOW_LOG="$WORK/logs/mlflow.log" RAYTRAIN_AT_ENV_FILE=/nonexistent
           RAYTRAIN_AT_PROJECT="$ROOT" MLFLOW_BACKEND_STORE_URI="$BACKEND")
on_head bash "$ROOT/scripts/cluster/start_mlflow.sh" || { tail -n 20 "$WORK/logs/mlflow.log" >&2
                                                         fail "start_mlflow.sh"; }
# The registry lets no one in without the account: an unauthenticated write gets 401.
status=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
         -d '{"name": "intruder"}' "$TRACKING/api/2.0/mlflow/experiments/create")
[[ "$status" == 401 ]] || fail "an unauthenticated write got $status, not 401"
status=$(curl -s -o /dev/null -w '%{http_code}' -u "$MLFLOW_USER:$MLFLOW_SECRET" \
         "$TRACKING/api/2.0/mlflow/experiments/search?max_results=1")
[[ "$status" == 200 ]] || fail "the cluster's account got $status from MLflow, not 200"
say "   unauthenticated write: 401; the account from the environment: 200"

# ---------------------------------------------------------------- datasets on every node
# As stage_data.sh does on a cluster: the files written once (original pixels, so every copy
# holds the same images), then a copy on every node's disk at the same path, which the driver
# validates and ships to the workers.
DATA=$NODE/data
say "digits written once and staged on every node's disk at $DATA"
mkdir -p "$WORK/real/head/data"
on_head env PYTHONPATH="$ROOT" "$PY" - "$DATA" <<'EOF' || fail "writing the digits"
import contextlib, io, sys
from raytrain_at.data.ffcv_writer import FULL_QUALITY
from raytrain_at.data.write import write_dataset
with contextlib.redirect_stderr(io.StringIO()):
    for split in ("train", "val", "test"):
        write_dataset("digits", f"{sys.argv[1]}/digits_{split}.beton", split=split,
                      options=FULL_QUALITY)
EOF
for node in node1 node2; do cp -a "$WORK/real/head/data" "$WORK/real/$node/"; done

# ---------------------------------------------------------------- Ray: head + 2 worker nodes
node_ports() {  # six ports of the node's own and a worker-port range
    local p=("$@")
    echo "--node-manager-port=${p[0]} --object-manager-port=${p[1]}" \
         "--dashboard-agent-listen-port=${p[2]} --dashboard-agent-grpc-port=${p[3]}" \
         "--runtime-env-agent-port=${p[4]} --metrics-export-port=${p[5]}"
}
start_node() {  # NAME CPUS PORT-OFFSET [--head ...]
    local name=$1 cpus=$2 offset=$3; shift 3
    local -a env_args
    read -r -a env_args <<< "$(node_env "$name")"
    # shellcheck disable=SC2046
    (in_node "$name" "$WORK/ns/$name" env -i "${env_args[@]}" "$BIN/ray" start "$@" \
        --node-ip-address=127.0.0.1 --num-cpus="$cpus" --num-gpus=0 \
        --object-store-memory=100000000 --disable-usage-stats \
        --temp-dir="$NODE/ray" $(node_ports "${PORTS[@]:offset:6}") \
        --min-worker-port=$((PORTS[23 + offset / 6])) \
        --max-worker-port=$((PORTS[23 + offset / 6] + 60))) \
        > "$WORK/logs/ray-$name.log" 2>&1 || { tail -n 30 "$WORK/logs/ray-$name.log" >&2
                                             fail "ray start of $name"; }
}
say "Ray head on $ADDRESS (0 CPUs) and worker nodes node1, node2 (1 CPU each)"
start_node head 0 6 --head --port="$GCS_PORT" --include-dashboard=false \
    --dashboard-port="$DASH_PORT"
start_node node1 1 12 --address="$ADDRESS"
start_node node2 1 18 --address="$ADDRESS"
on_head "$PY" - "$ADDRESS" <<'EOF' || fail "the three nodes did not join, or their disks are shared"
import os, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
for _ in range(60):
    if sum(n["Alive"] for n in ray.nodes()) == 3:
        break
    time.sleep(1)
alive = sum(n["Alive"] for n in ray.nodes())
print(f"[rehearsal] {alive} nodes alive, resources {ray.cluster_resources()}")
if alive != 3:
    sys.exit(1)
# Separate disks: what the head writes under its HOME is not there for a task on node1 or node2,
# whose HOME is the same path.
home = os.environ["HOME"]
mark = os.path.join(home, "written-by-the-head")
with open(mark, "w") as handle:
    handle.write("head\n")

@ray.remote(num_cpus=1)
def look(path):
    return os.environ["HOME"], os.path.exists(path)

workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(mark) for node in workers])
print(f"[rehearsal] disks: HOME {home} on every node; the head's {os.path.basename(mark)} seen "
      f"by the worker nodes' tasks: {[found for _, found in seen]}")
sys.exit(0 if len(seen) == 2 and all(h == home and not found for h, found in seen) else 1)
EOF

TRAIN_FAST=(--set data.train="$DATA/digits_train.beton" --set data.heldout="$DATA/digits_val.beton"
            --set data.train_size=256 --set data.heldout_size=64 --set attack.heldout_steps=2
            --set scaling.cpus_per_worker=1 --set optim.warmup_epochs=0)

if (( ONLY_EVALUATION )); then
# ---------------------------------------------------------------- the model, by this checkout
# The cluster's nodes run --code's code; this checkout trains on a Ray instance of the head's own.
say "0-2. skipped (--only-evaluation); the model: 1 clean epoch by this checkout on the head"
on_head env PYTHONPATH="$ROOT" raytrain-at train quickstart --run-name model \
    --set objective.kind=clean --set attack.kind=none --set tracking.experiment=rehearsal \
    --set schedule.epochs=1 "${TRAIN_FAST[@]}" > "$WORK/logs/model.log" 2>&1 \
    || { tail -n 40 "$WORK/logs/model.log" >&2; fail "training the model to evaluate"; }
MODEL_REF=$(on_head env PYTHONPATH="$ROOT" "$PY" - <<'EOF'
from raytrain_at.tracking.runs import find_run_id
import os
print(f"runs:/{find_run_id(os.environ['MLFLOW_TRACKING_URI'], 'rehearsal', 'model')}/model")
EOF
)
say "   model: $MODEL_REF"
else
# ---------------------------------------------------------------- 0. no storage root
if [[ "$CODE" != "$ROOT" ]]; then
    say "0. skipped with --code (another checkout may not know RAYTRAIN_AT_STORAGE)"
else
say "0. a multi-node run without RAYTRAIN_AT_STORAGE stops before any work"
set +e
on_head env -u RAYTRAIN_AT_STORAGE raytrain-at train quickstart --address "$ADDRESS" \
    --run-name no-root "${TRAIN_FAST[@]}" > "$WORK/logs/no-root.log" 2>&1
rc=$?
set -e
# The preflight (on by default with --address) refuses it, in one error line, before any
# training worker starts.
[[ $(grep -c "^error: .*RAYTRAIN_AT_STORAGE" "$WORK/logs/no-root.log") == 1 ]] && (( rc != 0 )) \
    && ! grep -q "epoch 1/" "$WORK/logs/no-root.log" \
    || { cat "$WORK/logs/no-root.log" >&2; fail "a run without a storage root was not refused"; }
say "   refused (exit $rc): $(grep -h "^error: .*RAYTRAIN_AT_STORAGE" "$WORK/logs/no-root.log")"
fi

# ---------------------------------------------------------------- 1. clean pre-training
say "1. clean pre-training on both nodes, after the preflight (on by default with --address)"
on_head raytrain-at train quickstart --address "$ADDRESS" --run-name clean \
    --set objective.kind=clean --set attack.kind=none --set tracking.experiment=rehearsal \
    --set schedule.epochs=1 "${TRAIN_FAST[@]}" > "$WORK/logs/clean.log" 2>&1 \
    || { tail -n 40 "$WORK/logs/clean.log" >&2; fail "clean pre-training"; }
# The preflight's table came first, with no blocker and the worker figures of both nodes'
# workers, and its MLflow run is on the server.
grep -q "^ *preflight quickstart: .*2 worker(s)" "$WORK/logs/clean.log" \
    && ! grep -q "BLOCKER" "$WORK/logs/clean.log" \
    && grep -Eq "│ device +│ 2 x CPU" "$WORK/logs/clean.log" \
    && grep -Eq "│ step +│ ok" "$WORK/logs/clean.log" \
    && grep -Eq "│ loader +│ ok" "$WORK/logs/clean.log" \
    && grep -Eq "│ estimate +│ ok" "$WORK/logs/clean.log" \
    || { cat "$WORK/logs/clean.log" >&2; fail "train --address ran no passing preflight first"; }
on_head "$PY" - <<'EOF' || fail "the preflight's MLflow run is missing"
import os, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
experiment = client.get_experiment_by_name("preflight")
runs = client.search_runs([experiment.experiment_id]) if experiment else []
print(f"[rehearsal]    preflight: {len(runs)} MLflow run(s), step "
      f"{runs[0].data.metrics.get('step_images_per_s', 0):.1f} img/s per worker" if runs
      else "[rehearsal]    preflight: no MLflow run")
sys.exit(0 if runs else 1)
EOF
say "   $(grep -h "^ *preflight quickstart" "$WORK/logs/clean.log" | head -n 1 | xargs)"
CLEAN_REF=$(on_head "$PY" - <<'EOF'
from raytrain_at.tracking.runs import find_run_id
import os
print(f"runs:/{find_run_id(os.environ['MLFLOW_TRACKING_URI'], 'rehearsal', 'clean')}/model")
EOF
)
say "   clean model: $CLEAN_REF"

# ---------------------------------------------------------------- 2. adversarial training
say "2. adversarial training from $CLEAN_REF; rank 1 killed once epoch 1's checkpoint is in"
rm -f "$WORK/pids"/*.pid
# --no-preflight: the preflight ran before step 1 on the same nodes.
on_head raytrain-at train quickstart --address "$ADDRESS" --run-name adversarial --no-preflight \
    --set model.init="$CLEAN_REF" --set tracking.experiment=rehearsal \
    --set schedule.epochs=3 --set scaling.max_failures_per_hour=1 "${TRAIN_FAST[@]}" \
    > "$WORK/logs/adversarial.log" 2>&1 &
TRAIN_PID=$!
STARTED+=("$TRAIN_PID")
# Checkpoints upload asynchronously (Ray V2): epoch 1's counts once Ray has committed it, which
# its checkpoint manager's snapshot in the store records. The kill comes after that, while rank
# 1 trains a later epoch: the resume must start from a committed checkpoint, not from scratch.
# Prints the epoch (0-based) rank 1 is in when both hold; exit 1 when the run ends first.
KILL_EPOCH=$(on_head "$PY" - "$WORK/pids" "$BUCKET" "$TRAIN_PID" <<'EOF'
import json, os, sys, time
from pathlib import Path
import boto3
pids, bucket, train = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
key = "raytrain-at/runs/adversarial/checkpoint_manager_snapshot.json"
for _ in range(2400):
    if not Path(f"/proc/{train}").exists():
        sys.exit(1)
    if (pids / "rank1-epoch1.pid").exists():
        try:
            state = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            state = {}
        if state.get("latest_checkpoint_result"):
            print(max(int(p.stem.split("epoch")[1]) for p in pids.glob("rank1-epoch*.pid")))
            sys.exit(0)
    time.sleep(0.25)
sys.exit(1)
EOF
) || KILL_EPOCH=""
KILLED=""
if [[ -n "$KILL_EPOCH" ]]; then
    KILLED=$(cat "$WORK/pids/rank1-epoch$KILL_EPOCH.pid")
    FIRST_EPOCH=$(cat "$WORK/pids/rank0-epoch0.pid" "$WORK/pids/rank1-epoch0.pid")
    kill -KILL "$KILLED" \
        && say "   killed rank 1's worker process (PID $KILLED) in epoch $((KILL_EPOCH + 1))"
fi
wait "$TRAIN_PID" || { tail -n 40 "$WORK/logs/adversarial.log" >&2; fail "adversarial training"; }
[[ -n "$KILLED" ]] || fail "rank 1 was not in epoch 2 or 3 once epoch 1's checkpoint was in"
AGAIN=$(cat "$WORK/pids/rank1-epoch$KILL_EPOCH.pid")
[[ "$AGAIN" != "$KILLED" ]] || fail "epoch $((KILL_EPOCH + 1)) was not run again by a new worker"
grep -q "done: epoch 3/3" "$WORK/logs/adversarial.log" \
    || { tail -n 20 "$WORK/logs/adversarial.log" >&2; fail "the run did not complete 3 epochs"; }
# Resumed from a committed checkpoint: epoch 1 was not trained again (its files would name new
# PIDs).
[[ "$(cat "$WORK/pids/rank0-epoch0.pid" "$WORK/pids/rank1-epoch0.pid")" == "$FIRST_EPOCH" ]] \
    || fail "epoch 1 was trained again after the kill"
MODEL_REF=$(grep -h "^model: runs:/" "$WORK/logs/adversarial.log" | tail -n 1 | cut -d' ' -f2 \
            || true)
[[ -n "$MODEL_REF" ]] || MODEL_REF=$(on_head "$PY" - <<'EOF'
from raytrain_at.tracking.runs import find_run_id
import os
print(f"runs:/{find_run_id(os.environ['MLFLOW_TRACKING_URI'], 'rehearsal', 'adversarial')}/model")
EOF
)
on_head "$PY" - <<'EOF' || fail "the adversarial run's MLflow record is wrong"
# One MLflow run, finished, with one metrics line per epoch (the re-run epoch logged once more
# at the same step, not as a third epoch).
import os, sys
from mlflow.tracking import MlflowClient
from raytrain_at.tracking.runs import find_run_id
uri = os.environ["MLFLOW_TRACKING_URI"]
client = MlflowClient(uri)
run = client.get_run(find_run_id(uri, "rehearsal", "adversarial"))
steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train_loss")})
print(f"[rehearsal]    MLflow run {run.info.status}, train_loss at epochs {steps}")
sys.exit(0 if run.info.status == "FINISHED" and steps == [1, 2, 3] else 1)
EOF
say "   completed 3 epochs after the kill (epoch $((KILL_EPOCH + 1)) re-run by PID $AGAIN): $MODEL_REF"
fi

# ---------------------------------------------------------------- 3. sharded AutoAttack
# --no-gpu: a CPU cluster started with `ray start` has no node types to read (no GPU either).
EVAL=(raytrain-at evaluate "$MODEL_REF" --data "$DATA/digits_test.beton" --norms linf
      --version apgdt --n 40 --batch-size 10 --no-gpu)
# The head's working folder: $NODE/work for its processes, $HEAD_WORK seen from here.
HEAD_WORK=$WORK/real/head/work
say "3. sharded AutoAttack over both nodes, driver killed after the first chunk records"
on_head "${EVAL[@]}" --workers 2 --address "$ADDRESS" --out "$NODE/work/killed.json" \
    > "$WORK/logs/eval-killed.log" 2>&1 &
EVAL_PID=$!
STARTED+=("$EVAL_PID")
# Code that keeps chunk records elsewhere (a node's own disk) fails here: its driver ends
# without one record in the store, with its own last error line.
no_record() {
    tail -n 5 "$WORK/logs/eval-killed.log" >&2
    fail "no chunk record under $STORAGE/eval-state; the driver ended with:" \
         "$(grep -h "error:\|Error:" "$WORK/logs/eval-killed.log" | tail -n 1)"
}
on_head "$PY" - "$STORAGE/eval-state" "$EVAL_PID" <<'EOF' || no_record
import os, sys, time
import pyarrow.fs as pafs  # not the product's helpers: --code may name a checkout without them
fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
root = sys.argv[1][len("s3://"):]
for _ in range(1200):
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    if any(i.base_name.startswith("chunk-") for i in found):
        sys.exit(0)
    try:
        os.kill(int(sys.argv[2]), 0)
    except ProcessLookupError:
        sys.exit(1)
    time.sleep(0.5)
sys.exit(1)
EOF
kill -KILL "$EVAL_PID" 2>/dev/null && say "   killed the evaluation driver (PID $EVAL_PID)"
wait "$EVAL_PID" 2>/dev/null || true
[[ ! -e "$HEAD_WORK/killed.json" ]] || fail "the killed evaluation wrote a result"
# The killed driver's tasks outlive it for a while (Ray lets them finish their chunks): wait
# until they are gone, so that node2 is free for a shard of the next run.
for _ in $(seq 600); do
    $PROCS running "$WORK" "ray::_ray_evaluate_chunks" || break
    sleep 1
done
# Ray writes ":task_name:<task>" into a worker's .out file when it starts a task there.
shards_on_node2() {
    cat "$WORK"/real/node2/ray/session_*/logs/worker-*.out 2>/dev/null \
        | grep -c ":task_name:_ray_evaluate_chunks" || true
}
SHARDS=$(shards_on_node2)
# A node lost mid-evaluation, on a job of its own (60 images): the killed driver's tasks may
# have finished the first job by now.
say "   another evaluation (--n 60); node2 lost (its processes killed by PID) during its shard"
on_head "${EVAL[@]}" --n 60 --workers 2 --address "$ADDRESS" --out "$NODE/work/lost.json" \
    > "$WORK/logs/eval-lost.log" 2>&1 &
EVAL_PID=$!
STARTED+=("$EVAL_PID")
for _ in $(seq 1200); do
    (( $(shards_on_node2) > SHARDS )) && break
    kill -0 "$EVAL_PID" 2>/dev/null || break
    sleep 0.5
done
sleep 2  # into its shard
$PROCS stop "$(cat "$WORK/ns/node2")" || true  # its mount namespace: every process of node2
set +e
wait "$EVAL_PID"
rc=$?
set -e
# Evaluation units are idempotent and their tasks retried: node2's shard runs again on node1,
# and the result is what one process measures on the same 60 images.
(( rc == 0 )) && [[ -s "$HEAD_WORK/lost.json" ]] \
    || { tail -n 30 "$WORK/logs/eval-lost.log" >&2
         fail "the evaluation that lost node2 did not complete on node1 (exit $rc)"; }
grep -q "will be retried" "$WORK/logs/eval-lost.log" \
    || fail "node2 was killed, yet no evaluation task of it was retried"
on_head env -u RAYTRAIN_AT_STORAGE "${EVAL[@]}" --n 60 --state-dir "$NODE/work/single60-state" \
    --out "$NODE/work/single60.json" > "$WORK/logs/eval-single60.log" 2>&1 \
    || { tail -n 30 "$WORK/logs/eval-single60.log" >&2; fail "the single-process evaluation"; }
on_head "$PY" - "$NODE/work/lost.json" "$NODE/work/single60.json" <<'EOF' \
    || fail "the evaluation that lost node2 differs from the single-process one"
import json, sys
lost, single = (json.load(open(p))["threats"]["linf"] for p in sys.argv[1:])
sys.exit(0 if lost["status"] == single["status"] else 1)
EOF
say "   node2 lost: its shard retried on node1, the result equals one process's (n=60)"
say "   resuming the same evaluation on what is left (node1)"
on_head "${EVAL[@]}" --workers 2 --address "$ADDRESS" --out "$NODE/work/sharded.json" \
    > "$WORK/logs/eval-resumed.log" 2>&1 \
    || { tail -n 30 "$WORK/logs/eval-resumed.log" >&2; fail "the resumed sharded evaluation"; }
say "   single-process reference (its own local state)"
on_head env -u RAYTRAIN_AT_STORAGE "${EVAL[@]}" --state-dir "$NODE/work/single-state" \
    --out "$NODE/work/single.json" > "$WORK/logs/eval-single.log" 2>&1 \
    || { tail -n 30 "$WORK/logs/eval-single.log" >&2; fail "the single-process evaluation"; }
on_head "$PY" - "$NODE/work/sharded.json" "$NODE/work/single.json" <<'EOF' \
    || fail "the sharded result differs from the single-process one"
import json, sys
sharded, single = (json.load(open(p)) for p in sys.argv[1:])
a, b = sharded["threats"]["linf"], single["threats"]["linf"]
print(f"[rehearsal]    sharded: robust {a['robust_accuracy']:.3f} clean {a['clean_accuracy']:.3f}"
      f" | single process: robust {b['robust_accuracy']:.3f} clean {b['clean_accuracy']:.3f}")
sys.exit(0 if a["status"] == b["status"] and a["robust_accuracy"] == b["robust_accuracy"] else 1)
EOF

if (( ONLY_EVALUATION )); then
    say "4. skipped (--only-evaluation)"
    say "REHEARSAL PASSED (--only-evaluation with $CODE)"
    exit 0
fi

# ---------------------------------------------------------------- 4. register, load, predict
say "4. register; a separate process with only the tracking URI loads the champion"
on_head raytrain-at register "$MODEL_REF" --name rehearsal-digits \
    --eval "$NODE/work/sharded.json" > "$WORK/logs/register.log" 2>&1 \
    || { cat "$WORK/logs/register.log" >&2; fail "register"; }
mkdir -p "$WORK/client/home"
(cd "$WORK/client" && env -i PATH="$BIN:/usr/bin:/bin" PYTHONPATH="$CODE" \
    HOME="$WORK/client/home" MLFLOW_TRACKING_URI="$TRACKING" HF_HUB_OFFLINE=1 \
    MLFLOW_TRACKING_USERNAME="$MLFLOW_USER" MLFLOW_TRACKING_PASSWORD="$MLFLOW_SECRET" "$PY" - <<'EOF'
import torch
import raytrain_at
from raytrain_at.data.sources import digits_tensors
model = raytrain_at.load_model("models:/rehearsal-digits@champion-linf")
x, y = digits_tensors(side=32)
with torch.no_grad():
    predicted = model(x[-200:]).argmax(1)
accuracy = predicted.eq(y[-200:]).float().mean().item()
print(f"[rehearsal]    champion predicts 200 digits: accuracy {accuracy:.3f}")
assert predicted.shape == (200,)
EOF
) || fail "the client could not load and run the champion"

# ---------------------------------------------------------------- 5. the registry's dump
say "5. backup_mlflow.sh: a pg_dump of the registry in s3://$BUCKET/mlflow-backup/postgres"
on_head bash "$ROOT/scripts/cluster/backup_mlflow.sh" > "$WORK/logs/backup.log" 2>&1 \
    || { cat "$WORK/logs/backup.log" >&2; fail "backup_mlflow.sh"; }
DUMP=$(on_head "$PY" -m raytrain_at.registry.store_dumps latest \
       "s3://$BUCKET/mlflow-backup/postgres") || fail "no complete dump in the bucket"
say "   latest dump: $DUMP"

say "REHEARSAL PASSED"
