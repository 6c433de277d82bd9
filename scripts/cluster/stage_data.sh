#!/usr/bin/env bash
# Copies the FFCV datasets s3://$RAYTRAIN_AT_BUCKET/betons/*.beton, each with its provenance
# NAME.beton.json (split and sha256, written by `raytrain-at data write-ffcv`), to this node's
# fastest local disk and makes them visible at $RAYTRAIN_AT_DATA (/mnt/raytrain-at-data), the same path on every
# node: the driver expands $RAYTRAIN_AT_DATA in the recipe and validates the files (so the head
# holds a copy too), then ships the expanded paths to the workers.
#
# Why local files: FFCV reads a .beton with ordinary reads of a local file and leans on the OS page
# cache; with RANDOM order the whole file stays cached after the first epoch, so a node needs RAM
# for the whole file (p4d.24xlarge: 1,152 GiB, p5.48xlarge: 2,048 GiB; ImageNet at max side 500 is
# about 350 GB). A network file system or S3 mount would put every epoch's reads on the network.
#
# Where: the instance-store NVMe, which the Deep Learning AMI mounts at /opt/dlami/nvme (p4d: 8 x
# 1 TB, p5: 8 x 3.84 TB, as one RAID 0); without that mount, unmounted instance-store NVMe drives
# are assembled into RAID 0 at /mnt/nvme; otherwise (the head node) the EBS root disk.
#
# Idempotent: `aws s3 sync` copies only missing or changed files, and a lock keeps two runs
# apart, so it is cheap to run at every Ray start. That is where cluster.yaml runs it on workers,
# because instance-store NVMe is wiped whenever an instance is stopped (cache_stopped_nodes).
set -euo pipefail

ENV_FILE=${RAYTRAIN_AT_ENV_FILE:-$HOME/.raytrain-at.env}
# shellcheck disable=SC1090
[[ -f "$ENV_FILE" ]] && . "$ENV_FILE"
BUCKET=${RAYTRAIN_AT_BUCKET:-}
# A local folder as the source (the local twin, cluster_local.yaml: node_env.sh --no-bucket)
# needs no bucket and no aws CLI.
SOURCE=${RAYTRAIN_AT_BETON_SOURCE:-}
if [[ -z "$SOURCE" && ( -z "$BUCKET" || "$BUCKET" == CHANGE-ME* ) ]]; then
    echo "[stage] RAYTRAIN_AT_BUCKET is not set: set your bucket in cluster.yaml" >&2
    exit 2
fi
SOURCE=${SOURCE:-s3://$BUCKET/betons/}
LINK=${RAYTRAIN_AT_DATA:-/mnt/raytrain-at-data}
AWS=${AWS_CLI:-aws}
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"

nvme_raid() {
    # Unmounted instance-store drives (not the EBS root, which EC2 also presents as NVMe).
    local devices=()
    for dev in /dev/nvme*n1; do
        [[ -b "$dev" ]] || continue
        grep -q "Instance Storage" "/sys/block/$(basename "$dev")/device/model" 2>/dev/null || continue
        lsblk -no MOUNTPOINT "$dev" | grep -q . && continue
        devices+=("$dev")
    done
    (( ${#devices[@]} )) || return 1
    echo "[stage] RAID 0 over ${#devices[@]} instance-store drive(s) at /mnt/nvme"
    $SUDO mdadm --create /dev/md/raytrain-at --run --level=0 --raid-devices=${#devices[@]} \
        "${devices[@]}" >/dev/null
    $SUDO mkfs.xfs -f -q /dev/md/raytrain-at
    $SUDO mkdir -p /mnt/nvme
    $SUDO mount -o noatime /dev/md/raytrain-at /mnt/nvme
}

if [[ -n "${RAYTRAIN_AT_STAGE_ROOT:-}" ]]; then
    ROOT=$RAYTRAIN_AT_STAGE_ROOT
elif mountpoint -q /opt/dlami/nvme 2>/dev/null; then
    ROOT=/opt/dlami/nvme
elif mountpoint -q /mnt/nvme 2>/dev/null || nvme_raid; then
    ROOT=/mnt/nvme
else
    ROOT=$HOME
fi
TARGET=$ROOT/raytrain-at-data
if ! mkdir -p "$TARGET" 2>/dev/null; then
    $SUDO mkdir -p "$TARGET"
    $SUDO chown "$(id -u):$(id -g)" "$TARGET"
fi

# The fixed path every node shares points at this node's copy.
if [[ "$(readlink "$LINK" 2>/dev/null)" != "$TARGET" ]]; then
    if [[ -e "$LINK" && ! -L "$LINK" ]]; then
        echo "[stage] $LINK exists and is not a link: move it away" >&2
        exit 1
    fi
    ln -sfn "$TARGET" "$LINK" 2>/dev/null || $SUDO ln -sfn "$TARGET" "$LINK"
fi

if [[ "$SOURCE" == s3://* ]] && ! command -v "$AWS" >/dev/null; then
    echo "[stage] the aws CLI is missing: installing it into the project's venv"
    "${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}/.venv/bin/pip" install -q awscli
    AWS=${RAYTRAIN_AT_PROJECT:-$HOME/raytrain-at}/.venv/bin/aws
fi

# Many parallel part downloads: one stream reaches a fraction of these instances' bandwidth.
S3_CONFIG=$(mktemp)
trap 'rm -f "$S3_CONFIG"' EXIT
printf '[default]\ns3 =\n    max_concurrent_requests = 64\n    multipart_chunksize = 64MB\n' \
    > "$S3_CONFIG"

exec 9> "$TARGET/.stage.lock"
flock 9
start=$(date +%s)
if [[ "$SOURCE" == s3://* ]]; then
    # Each file's provenance (NAME.beton.json: its split, for the test-split guard, and its
    # sha256, checked when a run starts) travels with it.
    AWS_CONFIG_FILE=$S3_CONFIG "$AWS" s3 sync "$SOURCE" "$TARGET/" \
        --exclude "*" --include "*.beton" --include "*.beton.json" \
        --only-show-errors --no-progress
else
    shopt -s nullglob
    local_files=("${SOURCE%/}"/*.beton "${SOURCE%/}"/*.beton.json)
    (( ${#local_files[@]} == 0 )) || cp -u "${local_files[@]}" "$TARGET/"
fi
shopt -s nullglob
files=("$TARGET"/*.beton)
for file in "${files[@]}"; do
    # Not fatal here: a run refuses such a file as held-out data (its split is unknown) and
    # cannot check it against a checksum.
    [[ -f "$file.json" ]] || echo "[stage] WARNING: $(basename "$file") has no" \
        "$(basename "$file").json beside it at $SOURCE: upload the provenance write-ffcv wrote" >&2
done
if (( ${#files[@]} == 0 )); then
    # Not fatal: the cluster (and MLflow) still come up; a training run then names the missing
    # file. Upload the datasets and run this script again (or `ray up` again).
    echo "[stage] WARNING: no .beton files under $SOURCE yet" >&2
    exit 0
fi
echo "[stage] ${#files[@]} .beton file(s), $(du -shL "$TARGET" | cut -f1), in $LINK ->" \
     "$TARGET ($(( $(date +%s) - start )) s)"
