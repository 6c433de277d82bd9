#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh Debian machine: the system packages FFCV compiles
# against, a virtual environment in .venv, and the project with its pinned stack.
# A second run finds the stamp file and does nothing.
#
# RAYTRAIN_AT_GPU_STACK (cluster nodes only: cluster.yaml's setup_commands set it) names a file
# that pins torch to a CUDA build the node image's driver runs (scripts/cluster/gpu_stack.sh):
# the driver is checked first, then that torch comes from PyTorch's CUDA wheel index and stays
# through the project's install. Unset (a laptop, CI, the local twin), torch comes from the
# machine's own registry as before.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.raytrain-at-installed"
GPU_STACK=${RAYTRAIN_AT_GPU_STACK:-}
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml
      && ( -z "$GPU_STACK" || "$STAMP" -nt "$GPU_STACK" ) ]]; then
    exit 0
fi
if [[ -n "$GPU_STACK" ]]; then
    bash scripts/cluster/check_driver.sh "$GPU_STACK"
    # shellcheck source=cluster/gpu_stack.sh
    source "$GPU_STACK"
fi

# FFCV builds from source against OpenCV and libjpeg-turbo, found through pkg-config; torch.compile
# (scaling.compile, the compiled APGD step) builds its CPU kernels with g++.
need_apt=()
for pkg in libopencv-dev libturbojpeg0-dev pkg-config g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if (( ${#need_apt[@]} )); then
    echo "[setup] installing Debian packages: ${need_apt[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    # On a cloud node's first boot unattended-upgrades holds dpkg's lock for minutes: wait for
    # it (up to 15 min) instead of failing the node's set-up (every apt-get in scripts/ does).
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"

# uv installs the project's ~3 GB of wheels (torch pulls in the CUDA libraries) about ten times
# faster than pip (28 s against 4-5 min here), which is most of a fresh machine's set-up. It follows
# the machine's pip configuration: indexes, find-links, constraints and certificate are read from
# `pip config` and handed to uv, and uv picks the best version across all indexes as pip does.
# Without uv (it did not install) the same steps run with pip.
pip_quiet() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
install=(pip_quiet)
if pip_quiet uv 2>/dev/null && [[ -x "$VENV/bin/uv" ]]; then
    eval "$("$VENV/bin/python" - <<'PYCONF'
import shlex, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                        capture_output=True, text=True).stdout
rank = {"global": 0, "install": 1, ":env:": 2}  # later sources override earlier ones, as in pip
found: dict[str, tuple[int, str]] = {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    level = rank.get(section, 0)
    if name not in found or level >= found[name][0]:
        found[name] = (level, value.strip().strip("'\""))
uv_names = {"index-url": ("UV_INDEX_URL", " "), "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
            "find-links": ("UV_FIND_LINKS", ","), "constraint": ("UV_CONSTRAINT", " "),
            "cert": ("SSL_CERT_FILE", " ")}
for name, (variable, separator) in uv_names.items():
    if name in found:
        print(f"export {variable}={shlex.quote(separator.join(found[name][1].split()))}")
PYCONF
)"
    export UV_INDEX_STRATEGY=unsafe-best-match UV_PYTHON="$VENV/bin/python"
    install=("$VENV/bin/uv" pip install -q)
else
    install=(pip_quiet)
fi

"${install[@]}" --upgrade pip "setuptools<81" wheel  # the project pins setuptools<81
# The GPU stack's torch first, from PyTorch's CUDA index (cluster nodes only).
pins=()
if [[ -n "$GPU_STACK" ]]; then
    torch_pins=("torch==$RAYTRAIN_AT_TORCH_VERSION" "torchvision==$RAYTRAIN_AT_TORCHVISION_VERSION")
    echo "[setup] ${torch_pins[*]} from $RAYTRAIN_AT_TORCH_INDEX"
    "${install[@]}" --index-url "$RAYTRAIN_AT_TORCH_INDEX" "${torch_pins[@]}"
    # The installs below resolve against the default index (FFCV pulls torch in through
    # pytorch-pfn-extras): the constraint keeps the CUDA build just installed (torch==2.14.1
    # matches 2.14.1+cu130).
    printf '%s\n' "${torch_pins[@]}" > "$VENV/gpu-stack-constraints.txt"
    pins=(--constraint "$VENV/gpu-stack-constraints.txt")
fi
# FFCV's setup.py imports numpy and needs pkg-config at build time: build it without isolation
# after numpy is in the environment.
"${install[@]}" "${pins[@]}" numpy pillow
"${install[@]}" "${pins[@]}" --no-build-isolation "ffcv==1.0.2"
"${install[@]}" "${pins[@]}" -e ".[dev]"
touch "$STAMP"
echo "[setup] environment ready in $VENV"
