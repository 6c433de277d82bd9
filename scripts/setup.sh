#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh Debian machine: the system packages FFCV compiles
# against, a virtual environment in .venv, and the project with its pinned stack.
# A second run finds the stamp file and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.raytrain-at-installed"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
    exit 0
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
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# pip on some machines warns about every missing local index directory; keep the log readable.
pip_quiet() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

PY=${PYTHON:-python3}
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_quiet --upgrade pip setuptools wheel
# FFCV's setup.py imports numpy and needs pkg-config at build time: build it without isolation
# after numpy is in the environment.
pip_quiet numpy pillow
pip_quiet --no-build-isolation "ffcv==1.0.2"
pip_quiet -e ".[dev]"
touch "$STAMP"
echo "[setup] environment ready in $VENV"
