#!/usr/bin/env bash
# Refuses a GPU node whose NVIDIA driver is older than the pinned torch build needs, in one line,
# before anything is installed (otherwise torch installs fine and every worker later finds no
# CUDA device). A node without nvidia-smi (the CPU head) has no driver to check.
#
# Usage: check_driver.sh GPU_STACK_FILE   (scripts/cluster/gpu_stack.sh)
set -euo pipefail
STACK=${1:?usage: check_driver.sh GPU_STACK_FILE}
# shellcheck source=gpu_stack.sh
source "$STACK"
SMI=${RAYTRAIN_AT_NVIDIA_SMI:-nvidia-smi}
command -v "$SMI" >/dev/null 2>&1 || exit 0
driver=$("$SMI" --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
driver=${driver// /}
if [[ -z "$driver" ]]; then
    echo "check_driver.sh: nvidia-smi reports no driver on this GPU node" >&2
    exit 1
fi
oldest=$(printf '%s\n%s\n' "$driver" "$RAYTRAIN_AT_TORCH_MIN_DRIVER" | sort -V | head -n 1)
if [[ "$oldest" != "$RAYTRAIN_AT_TORCH_MIN_DRIVER" ]]; then
    echo "check_driver.sh: NVIDIA driver $driver is older than $RAYTRAIN_AT_TORCH_MIN_DRIVER," \
         "which torch $RAYTRAIN_AT_TORCH_VERSION (CUDA $RAYTRAIN_AT_TORCH_CUDA) needs: use the" \
         "image $STACK names (release $RAYTRAIN_AT_DLAMI_RELEASE) or a newer one" >&2
    exit 1
fi
echo "[check_driver] driver $driver runs CUDA $RAYTRAIN_AT_TORCH_CUDA builds"
