#!/usr/bin/env bash
# One-time, idempotent: Debian's headless-capable Chromium, for the registry page check
# (tests/support/screenshot_registry.py, tests/test_registry_server.py). Nothing else needs a browser,
# so `make setup` leaves it out; `make browser-check` runs this first.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
echo "[setup-browser] installing Debian's chromium"
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
$SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null
echo "[setup-browser] $(chromium --version 2>/dev/null || echo chromium installed)"
