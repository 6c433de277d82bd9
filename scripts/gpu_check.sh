#!/usr/bin/env bash
# GPU readiness check: every GPU figure the project needs, one JSON document (scripts/gpu_check.py
# says what each part measures; docs/benchmarking.md "GPU readiness check" how to run it on a
# lent GPU).
#
#   scripts/gpu_check.sh --prepare     here: build .whl/, the cp312 wheels the GPU machine lacks
#   scripts/gpu_check.sh               there: install .whl/ (pip --no-index) and run every part,
#                                      at most 8 minutes; the JSON goes to stdout and, when $OUT
#                                      is set, to $OUT/gpu_check.json
#   scripts/gpu_check.sh --cpu-smoke   here: the same parts at tiny sizes on the CPU (the tests)
#
# Other options go to scripts/gpu_check.py (--parts, --budget-s, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

case "${1:-}" in
    --prepare)
        shift
        exec "$PYTHON" scripts/gpu_wheels.py --dest "$WHEELS" "$@"
        ;;
    --cpu-smoke)
        # This checkout's code, whatever the environment has installed.
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" scripts/gpu_check.py "$@"
        ;;
esac

# On the GPU machine nothing can be fetched: what travelled in $WHEELS is installed into a
# private folder put first on the path. The FFCV wheels go in a second call, so a wheel that
# machine refuses costs the FFCV parts only (they then report the missing package).
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    pip_install() {
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$@"
    }
    if ! pip_install "$WHEELS"/*.whl; then
        echo "gpu_check: the wheels in $WHEELS did not install (see pip's message above)" >&2
        exit 1
    fi
    if compgen -G "$WHEELS/ffcv/*.whl" >/dev/null && ! pip_install "$WHEELS"/ffcv/*.whl; then
        echo "gpu_check: the FFCV wheels did not install; its parts will report it" >&2
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project from this checkout (it is not installed on the GPU machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
