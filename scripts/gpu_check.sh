#!/usr/bin/env bash
# The GPU check: the correctness tests that need a GPU (pytest -m gpu, tests/test_gpu.py) and the
# speed benchmarks (raytrain-at bench step|eval|loader), as one JSON document
# (docs/benchmarking.md "GPU check" says how to run it on a lent GPU).
#
#   scripts/gpu_check.sh --prepare     here: build .whl/, the cp312 wheels the GPU machine lacks
#   scripts/gpu_check.sh               there: install .whl/ (pip --no-index), check the versions,
#                                      run every part (about 8 minutes); the JSON goes to stdout
#                                      and, when $OUT is set, to $OUT/gpu_check.json
#   scripts/gpu_check.sh --cpu-smoke   here: the same parts at tiny sizes on the CPU (the tests)
#
# Options: --parts LIST (a subset of versions,preflight,tests,step,t_step,eval,loader,
# compiled),
# --budget-s SECONDS (default 480 on the GPU; 1200 for the smoke, whose budgets only guard against
# a hang on a busy machine), --out FILE. Each part runs its commands within its own time budget
# (and what is left of the whole): a part out of time is stopped with everything it started and
# keeps the documents it finished; tests/support/gpu_report.py turns the parts' outputs into the
# document and its goals.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
PARTS_ALL=(versions preflight tests step t_step eval loader compiled)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }

# run_part NAME BUDGET CMD...: each CMD (one string; no argument holds a space) with what is left
# of min(BUDGET, the overall deadline); its stdout to $WORK/NAME.I.out, stderr to .log, exit
# status and time limit to .rc (124 or 137: stopped at its limit; "skipped": no time was left).
run_part() {
    local name=$1 budget=$2 index=0 command start left base rc
    shift 2
    start=$(now)
    echo "[gpu_check] $name (up to ${budget} s) ..." >&2
    for command in "$@"; do
        base="$WORK/$name.$index"
        left=$(( budget - $(elapsed "$start") ))
        if [[ -n "${DEADLINE:-}" ]] && (( DEADLINE - $(date +%s) < left )); then
            left=$(( DEADLINE - $(date +%s) ))
        fi
        if (( left < 1 )); then
            echo skipped > "$base.rc"
        else
            rc=0
            # In the background, so that a stopped check can stop it: timeout leads a process
            # group of its own, which its command and everything that starts inherit.
            # shellcheck disable=SC2086  # the command's words
            timeout -k 10 "$left" $command > "$base.out" 2> "$base.log" &
            RUNNING=$!
            wait "$RUNNING" || rc=$?
            RUNNING=""
            echo "$rc $left" > "$base.rc"
        fi
        index=$((index + 1))
    done
    echo "$budget $(elapsed "$start")" > "$WORK/$name.part"
    echo "[gpu_check] $name done in $(elapsed "$start") s" >&2
}

# A check stopped (Ctrl-C, a kill, the device tool's limit) stops the part's command group and
# removes its work folder.
stop_on_exit() {
    trap '[[ -z "${RUNNING:-}" ]] || kill -TERM -- "-$RUNNING" 2>/dev/null; rm -rf "$WORK"' EXIT
    trap 'exit 130' INT TERM
}

usage_error() { echo "gpu_check.sh: $*" >&2; exit 2; }

main() {
    local smoke=0 parts out="" budget=""
    parts=$(IFS=,; echo "${PARTS_ALL[*]}")
    while (( $# )); do
        case "$1" in
            --prepare) shift; cd "$ROOT"
                       exec "$PYTHON" -m tests.support.gpu_wheels build --dest "$WHEELS" "$@" ;;
            --cpu-smoke) smoke=1; shift ;;
            --parts) parts=${2:-}; shift 2 || usage_error "--parts needs a list" ;;
            --budget-s) budget=${2:-}; shift 2 || usage_error "--budget-s needs seconds" ;;
            --out) out=${2:-}; shift 2 || usage_error "--out needs a file" ;;
            *) usage_error "unknown argument '$1' (see the head of scripts/gpu_check.sh)" ;;
        esac
    done
    local part known bad=()
    IFS=, read -r -a chosen <<< "$parts"
    for part in "${chosen[@]}"; do
        known=0
        for name in "${PARTS_ALL[@]}"; do [[ "$part" == "$name" ]] && known=1; done
        (( known )) || bad+=("$part")
    done
    (( ${#bad[@]} == 0 && ${#chosen[@]} > 0 )) || usage_error "unknown part(s)" \
        "${bad[*]:-(none given)}; known: ${PARTS_ALL[*]}"
    budget=${budget:-$(( smoke ? 1200 : 480 ))}
    [[ "$budget" =~ ^[0-9]+$ ]] && (( budget > 0 )) \
        || usage_error "--budget-s must be a positive number of seconds, got '$budget'"
    [[ -n "$out" || -z "${OUT:-}" ]] || out=$OUT/gpu_check.json

    cd "$ROOT"
    local manifest=""
    if (( ! smoke )) && compgen -G "$WHEELS/*.whl" >/dev/null; then
        # Nothing can be fetched on the GPU machine: what travelled is installed into a private
        # folder put first on the path. The FFCV wheels go in a second call, so a wheel that
        # machine refuses costs the FFCV parts only (they then report the missing package).
        local site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
        local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
                   --upgrade --target "$site")
        "${pip[@]}" "$WHEELS"/*.whl >&2 \
            || { echo "gpu_check.sh: the wheels in $WHEELS did not install (pip above)" >&2
                 exit 1; }
        if compgen -G "$WHEELS/ffcv/*.whl" >/dev/null && ! "${pip[@]}" "$WHEELS"/ffcv/*.whl >&2
        then
            echo "gpu_check.sh: the FFCV wheels did not install; its parts will report it" >&2
        fi
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        manifest="--manifest $WHEELS/MANIFEST.json"
    fi
    # The project from this checkout (it is not installed on the GPU machine); one thread per
    # process on the smoke, so a busy 2-core machine does not make OpenMP workers fight.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    local sizes=gpu
    (( smoke )) && { sizes=cpu-smoke; export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; }
    export RAYTRAIN_AT_GPU_CHECK=$sizes
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
    stop_on_exit
    DEADLINE=$(( $(date +%s) + budget ))
    local bench="$PYTHON -m raytrain_at.cli bench"
    for part in "${chosen[@]}"; do
        if [[ -f "$WORK/versions.0.rc" ]] && ! grep -q "^0 " "$WORK/versions.0.rc"; then
            echo "[gpu_check] the versions differ from the expected ones: nothing more runs" >&2
            break
        fi
        if (( smoke )); then
            local tiny="--model test_vit --resolution 32 --steps 1 --warmup 1 --device cpu"
            case "$part" in
                versions) run_part versions 60 "$PYTHON -m tests.support.gpu_wheels verify" ;;
                preflight) run_part preflight 240 "$PYTHON -m raytrain_at.preflight.in_process \
                    --model test_vit --resolution 32 --batch 4 --steps 1 --warmup 1 \
                    --loader-batches 2 --device cpu" ;;
                tests) run_part tests 480 "$PYTHON -m pytest -m gpu tests/test_gpu.py -q \
                    -p no:cacheprovider --junitxml=$WORK/tests.xml" ;;
                # Two batches: the step rows and t_step(B) from one process (on the GPU the
                # t_step part times more batches, without the reference).
                step) run_part step 240 "$bench step $tiny --batch 2 --batch 4" ;;
                t_step) run_part t_step 240 "$bench step $tiny --batch 2 --batch 4 \
                    --no-reference" ;;
                eval) run_part eval 180 "$bench eval --model test_vit --resolution 32 --n 4 \
                    --batch 4 --version fast --kernels fast --device cpu" ;;
                loader) run_part loader 180 "$bench loader --images 32 --batch 16 --workers 1 \
                    --aug-batch 4 --step-repeats 0 --device cpu" ;;
                compiled) run_part compiled 300 "$bench step $tiny --batch 2 --compile \
                    --no-reference" ;;
            esac
        else
            local gpu="--steps 8 --warmup 3 --device cuda"
            # The part budgets sum to the whole check's 480 s (tests/test_gpu_check.py checks).
            case "$part" in
                versions) run_part versions 10 "$PYTHON -m tests.support.gpu_wheels verify \
                    $manifest" ;;
                # The preflight's worker checks in this process (Ray does not travel), at the
                # paper recipe's per-GPU micro-batch: a blocker here says the rest is moot.
                preflight) run_part preflight 60 "$PYTHON -m raytrain_at.preflight.in_process \
                    --model convnext_tiny_cvst --batch 174 --steps 5 --warmup 2 \
                    --loader-batches 8 --device cuda" ;;
                tests) run_part tests 100 "$PYTHON -m pytest -m gpu tests/test_gpu.py -q \
                    -p no:cacheprovider --junitxml=$WORK/tests.xml" ;;
                # The paper's per-GPU batch: its global batch over its 8 GPUs (1,392 / 8, 864 / 8).
                step) run_part step 90 "$bench step --model convnext_tiny_cvst --batch 174 $gpu" \
                    "$bench step --model vit_base_cvst --batch 108 $gpu" ;;
                t_step) run_part t_step 40 "$bench step --model convnext_tiny_cvst --batch 27 \
                    --batch 87 --batch 174 --no-reference $gpu" "$bench step \
                    --model vit_base_cvst --batch 27 --batch 108 --no-reference $gpu" ;;
                eval) run_part eval 50 "$bench eval --model convnext_tiny_cvst --n 128 \
                    --batch 128 --kernels exact --device cuda" "$bench eval --model \
                    convnext_tiny_cvst --n 128 --batch 128 --kernels fast --device cuda" ;;
                loader) run_part loader 30 "$bench loader --images 4096 --batch 256 --workers 4 \
                    --workers 12 --aug-batch 256 --step-repeats 2 --device cuda" ;;
                compiled) run_part compiled 100 "$bench step --model convnext_tiny_cvst \
                    --batch 174 --compile --no-reference $gpu" "$bench step --model \
                    vit_base_cvst --batch 108 --compile --no-reference $gpu" ;;
            esac
        fi
    done
    "$PYTHON" -m tests.support.gpu_report --work "$WORK" --sizes "$sizes" --budget-s "$budget" \
        --parts "$parts" ${out:+--out "$out"}
}

# Sourced (tests/test_gpu_check.py drives run_part with commands of its own): define, do not run.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
