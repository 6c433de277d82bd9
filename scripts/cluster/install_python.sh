#!/usr/bin/env bash
# Python 3.11 for scripts/setup.sh on the cluster's Ubuntu 22.04 image (whose own python3 is 3.10;
# the project needs >= 3.11, and FFCV compiles against the interpreter's headers, hence -dev).
# Idempotent: does nothing when python3.11 with venv support and headers is already there.
set -euo pipefail
if command -v python3.11 >/dev/null 2>&1 && python3.11 -c "import ensurepip, venv" 2>/dev/null \
        && [[ -f /usr/include/python3.11/Python.h ]]; then
    exit 0
fi
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show python3.11-dev >/dev/null 2>&1; then
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
    $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq software-properties-common >/dev/null
    $SUDO add-apt-repository -y ppa:deadsnakes/ppa >/dev/null
fi
$SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq python3.11 python3.11-venv python3.11-dev >/dev/null
echo "[install_python] $(python3.11 --version)"
