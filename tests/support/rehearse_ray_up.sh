#!/usr/bin/env bash
# Rehearses the cluster launcher on this machine: `ray up` of cluster_local.yaml (the local-provider
# twin of cluster.yaml, same set-up and start scripts) over SSH to 127.0.0.1, a job through
# `ray exec` and `ray job submit`, then `ray down`.
#
# The "node" is this machine seen through a process and mount namespace (unshare): its own PIDs
# (so the `ray stop` that the start commands and `ray down` run stops this cluster's Ray only, not
# another Ray on the machine), its own HOME, /mnt and /tmp/ray, and a copy-on-write view of the
# project's .venv (an overlay: scripts/setup.sh really installs the file-mounted source into it,
# without touching the original). The SSH server is Debian's openssh-server, started by this
# script on a free port of 127.0.0.1 only, admitting one key made for this run.
#
# Usage: sudo tests/support/rehearse_ray_up.sh            (as root; ~3-5 minutes on 2 cores)
#   RAYTRAIN_AT_BASE_VENV   the built environment to start from (default: the checkout's .venv)
#   REHEARSAL_KEEP=1        keep the work folder (logs, the rendered config) after the run
# Prints `REHEARSAL <name> <json>` lines with what the job saw on the head. Every process it
# starts is stopped by PID at the end, pass or fail.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
BASE_VENV=${RAYTRAIN_AT_BASE_VENV:-$REPO/.venv}
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "rehearse_ray_up.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
    echo "rehearse_ray_up.sh: run as root (an SSH server for root, mount namespaces)" >&2
    exit 2
fi
if [[ ! -x "$BASE_VENV/bin/ray" ]]; then
    echo "rehearse_ray_up.sh: no Ray in $BASE_VENV: run 'make' first or set RAYTRAIN_AT_BASE_VENV" >&2
    exit 2
fi
BASE_VENV=$(realpath "$BASE_VENV")
RAY="$BASE_VENV/bin/ray"
PY="$BASE_VENV/bin/python"
# The ports cluster_local.yaml gives Ray (26380-26388, workers 26400-26499) and MLflow (26390).
RAY_PORTS=(26380 26381 26382 26383 26384 26385 26386 26387 26388 26390)
DASHBOARD_PORT=26384

log() { echo "[rehearse] $(date +%T) $*"; }

# --------------------------------------------------------------------------- Debian packages
# openssh-server for the node's SSH server, rsync for file_mounts, netcat to reach the server's
# non-default port (Ray's SSH options have no port: auth.ssh_proxy_command does it).
need=()
for pkg in openssh-server rsync netcat-openbsd; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if (( ${#need[@]} )); then
    log "installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

"$PY" - "${RAY_PORTS[@]}" <<'PY'
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            busy.append(port)
if busy:
    sys.exit(f"rehearse_ray_up.sh: port(s) {busy} already in use (another rehearsal running?)")
PY
SSH_PORT=$(PYTHONPATH="$REPO" "$PY" -c \
    'from raytrain_at.runtime.ports import free_local_port; print(free_local_port())')

# --------------------------------------------------------------------------- the node
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rehearse-ray-up.XXXXXX")
NAME="raytrain-at-rehearsal-$$"
NODE=$WORK/node
NODE_HOME=$NODE/home
NS_PID=""
UP_STARTED=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if (( UP_STARTED )) && [[ -n "$NS_PID" ]] && kill -0 "$NS_PID" 2>/dev/null; then
        log "ray down"
        (cd "$REPO" && timeout 120 "$RAY" down -y "$WORK/cluster.yaml" >> "$WORK/ray-down.log" 2>&1) \
            || log "ray down failed (see $WORK/ray-down.log); stopping the node by PID"
    fi
    if [[ -n "$NS_PID" ]]; then
        # unshare --kill-child: when unshare goes, the namespace's first process gets SIGKILL,
        # and with it the kernel ends every process of the namespace (sshd, Ray, MLflow).
        # (unshare blocks SIGTERM while it waits for its child, hence SIGKILL.)
        kill -KILL "$NS_PID" 2>/dev/null || true
        wait "$NS_PID" 2>/dev/null || true
    fi
    # The launcher's own files on this side: cluster state and lock, its cached copy of the
    # config (`ray down` and `ray rsync-down` write one) and the SSH control folder.
    rm -f "/tmp/ray/cluster-$NAME.state" "/tmp/ray/cluster-$NAME.lock"
    if [[ -f "$WORK/cluster.yaml" ]]; then
        "$PY" - "$WORK/cluster.yaml" <<'PY' | while read -r path; do rm -rf "$path"; done || true
import getpass, hashlib, json, sys, tempfile
import yaml
from ray.autoscaler._private.util import prepare_config
with open(sys.argv[1]) as f:
    config = yaml.safe_load(f)
digest = hashlib.sha256(json.dumps([prepare_config(config)], sort_keys=True).encode())
print(f"{tempfile.gettempdir()}/ray-config-{digest.hexdigest()}")
user, name = (hashlib.sha256(v.encode()).hexdigest()[:10] for v in (getpass.getuser(),
                                                                     config["cluster_name"]))
print(f"/tmp/ray_ssh_{user}/{name}")
PY
    fi
    if [[ "${REHEARSAL_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        log "work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$NODE_HOME/raytrain-at" "$NODE_HOME/.ssh" "$NODE/tmp-ray" "$NODE/venv-upper" \
    "$NODE/venv-work" /tmp/ray
chmod 700 "$NODE_HOME" "$NODE_HOME/.ssh"
ssh-keygen -q -t ed25519 -N "" -C "rehearse-ray-up" -f "$WORK/id_ed25519"
ssh-keygen -q -t ed25519 -N "" -C "rehearse-ray-up host" -f "$WORK/ssh_host_ed25519_key"
cp "$WORK/id_ed25519.pub" "$NODE_HOME/.ssh/authorized_keys"
chmod 600 "$NODE_HOME/.ssh/authorized_keys"
# The machine image's pre-built environment, as on a cluster image with a baked .venv: the
# overlay below makes it copy-on-write, so setup.sh installs into it for real.
ln -s "$BASE_VENV" "$NODE_HOME/raytrain-at/.venv"

cat > "$WORK/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $WORK/ssh_host_ed25519_key
PidFile none
AllowUsers root
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile $NODE_HOME/.ssh/authorized_keys
# The work folder lies under the world-writable /tmp, which StrictModes refuses as a key's
# parent; the folder itself is private (mktemp -d, mode 700) and this server lives for one run.
StrictModes no
# The node's own HOME: what ~ means to Ray's commands, rsync and the project's scripts.
SetEnv HOME=$NODE_HOME
CONF

cat > "$WORK/node_init.sh" <<INIT
set -euo pipefail
mount -t tmpfs -o mode=755 rehearsal-mnt /mnt
mount --bind "$NODE/tmp-ray" /tmp/ray
mount -t overlay rehearsal-venv \
    -o "lowerdir=$BASE_VENV,upperdir=$NODE/venv-upper,workdir=$NODE/venv-work" "$BASE_VENV"
rm -f "$BASE_VENV/.raytrain-at-installed"
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$WORK/sshd_config" &
wait
INIT

log "cluster $NAME: SSH server on 127.0.0.1:$SSH_PORT in its own namespace (work folder $WORK)"
unshare --mount --pid --fork --mount-proc --kill-child=SIGKILL bash "$WORK/node_init.sh" \
    > "$WORK/node.log" 2>&1 &
NS_PID=$!

SSH=(ssh -i "$WORK/id_ed25519" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no
     -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -p "$SSH_PORT" root@127.0.0.1)
for _ in $(seq 50); do
    "${SSH[@]}" true 2>/dev/null && break
    kill -0 "$NS_PID" 2>/dev/null || { cat "$WORK/node.log" >&2; exit 1; }
    sleep 0.2
done
"${SSH[@]}" true || { echo "rehearse_ray_up.sh: the SSH server did not answer" >&2; exit 1; }

# --------------------------------------------------------------------------- the config
"$PY" - "$REPO/cluster_local.yaml" "$WORK/cluster.yaml" "$NAME" "$WORK/id_ed25519" "$SSH_PORT" <<'PY'
import sys
import yaml
source, target, name, key, port = sys.argv[1:]
with open(source) as f:
    config = yaml.safe_load(f)
config["cluster_name"] = name
config["auth"]["ssh_private_key"] = key
config["auth"]["ssh_proxy_command"] = f"nc 127.0.0.1 {port}"
with open(target, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
PY

# --------------------------------------------------------------------------- up, jobs, down
cd "$REPO"   # file_mounts are relative to the repository root, as with cluster.yaml
export RAY_USAGE_STATS_ENABLED=0
log "ray up (set-up and start commands: $WORK/ray-up.log)"
UP_STARTED=1
start=$(date +%s)
if ! "$RAY" up -y --no-config-cache --disable-usage-stats "$WORK/cluster.yaml" \
        > "$WORK/ray-up.log" 2>&1; then
    tail -n 40 "$WORK/ray-up.log" >&2
    echo "rehearse_ray_up.sh: ray up failed (log: $WORK/ray-up.log)" >&2
    exit 1
fi
log "ray up done in $(( $(date +%s) - start )) s"

# A tiny raytrain-at command on the head: write the digits as FFCV into the local twin's dataset
# source, then stage it as every Ray start does.
log "ray exec: raytrain-at data write-ffcv + stage_data.sh"
"$RAY" exec "$WORK/cluster.yaml" \
    'mkdir -p ~/raytrain-at-betons &&
     raytrain-at data write-ffcv digits ~/raytrain-at-betons/digits_val.beton --split val &&
     bash ~/raytrain-at/scripts/cluster/stage_data.sh && ray status' \
    > "$WORK/ray-exec.log" 2>&1 || { tail -n 40 "$WORK/ray-exec.log" >&2; exit 1; }
grep -E "^\[stage\]|^ *[0-9]+ local\.cluster\.node" "$WORK/ray-exec.log" || true

# A job through the job server, as a user submits one: the cluster's token fetched with
# `ray rsync-down`, the dashboard on the head's 127.0.0.1 port.
"$RAY" rsync-down "$WORK/cluster.yaml" "$NODE_HOME/.ray/auth_token" "$WORK/auth_token" \
    > "$WORK/rsync-down.log" 2>&1 || { cat "$WORK/rsync-down.log" >&2; exit 1; }
chmod 600 "$WORK/auth_token"
mkdir -p "$WORK/jobdir"
cat > "$WORK/jobdir/probe.py" <<'PROBE'
"""What a job's driver and a Ray task on the head see: the project's venv and env file."""
import json
import os
import sys
import urllib.request

import ray


@ray.remote
def node_view() -> dict:
    import raytrain_at

    data = os.environ.get("RAYTRAIN_AT_DATA", "")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    with urllib.request.urlopen(tracking + "/health", timeout=5) as response:
        health = response.read().decode()
    return {"python": sys.prefix, "raytrain_at": raytrain_at.__file__, "data": data,
            "betons": sorted(os.listdir(data)) if os.path.isdir(data) else None,
            "tracking": tracking, "mlflow_health": health, "home": os.path.expanduser("~")}


ray.init()
print("REHEARSAL job " + json.dumps(ray.get(node_view.remote())), flush=True)
PROBE
log "ray job submit"
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/auth_token" \
    "$RAY" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" \
    --working-dir "$WORK/jobdir" -- python probe.py > "$WORK/ray-job.log" 2>&1 < /dev/null \
    || { tail -n 40 "$WORK/ray-job.log" >&2; exit 1; }
grep "^REHEARSAL " "$WORK/ray-job.log"
log "done; ray down follows"
