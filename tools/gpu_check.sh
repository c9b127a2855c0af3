#!/usr/bin/env bash
# Validate a GPU in one call: install and build cm-kernels for this GPU's architecture, run every
# `cuda`-marked test, benchmark (tools/bench/gpu.py), and write a markdown block for bench/RESULTS.md.
#
#   bash tools/gpu_check.sh [--dry-run] [--no-install] [--out DIR]
#
#   --dry-run     every step on the CPU with tiny sizes and no install (uses ./.venv); the tests are
#                 only collected. CI runs this (tools/tests/test_gpu_check.py), so the script cannot rot.
#   --no-install  skip scripts/install.sh (a rerun on a machine where it already ran)
#   --out DIR     where gpu_check.md, gpu_check.json and logs/ go
#                 (default: $OUT when set, else ${TMPDIR:-/tmp}/cm-gpu-check)
#
# Parts, each under `timeout` with its own bound in seconds (environment variables override them):
#   detect GPU arch   nvidia-smi --query-gpu=compute_cap, else torch                        15 s
#   install + build   CM_KERNELS_CUDA=1 CM_KERNELS_CUDA_ARCHS=<arch> bash scripts/install.sh
#                     (MAX_JOBS = all cores; with no .venv yet and a python3 that holds a CUDA
#                     torch, CM_INSTALL_OFFLINE=1 on top of it)    CM_GPU_CHECK_INSTALL_S=200 s
#   cm info           what cm-kernels built, devices, attention backends                    20 s
#   cuda kernels      fails unless the CUDA kernels are built for this GPU and active        20 s
#   cuda tests        python -m pytest -m cuda                        CM_GPU_CHECK_TESTS_S=90 s
#   benchmark         tools/bench/gpu.py, 5 measures of CM_GPU_CHECK_MEASURE_S=20 s each
#                                                                     CM_GPU_CHECK_BENCH_S=150 s
# Sum of the bounds: 495 s (8 min 15 s), plus at most 10 s per part to kill a stuck one. A part
# that fails or times out is reported (ok / FAILED / timed out, with its log's tail) and the next
# part still runs; the exit status is 1 when any part failed. CM_PYTHON: the interpreter (default
# .venv/bin/python, the one scripts/install.sh sets up).
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
INSTALL=1
OUT_DIR=${OUT:-${TMPDIR:-/tmp}/cm-gpu-check}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-install) INSTALL=0 ;;
        --out)
            [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }
            OUT_DIR=$2
            shift
            ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

INSTALL_S=${CM_GPU_CHECK_INSTALL_S:-200}
TESTS_S=${CM_GPU_CHECK_TESTS_S:-90}
BENCH_S=${CM_GPU_CHECK_BENCH_S:-150}
MEASURE_S=${CM_GPU_CHECK_MEASURE_S:-20}
PY=${CM_PYTHON:-$ROOT/.venv/bin/python}

[[ $OUT_DIR == /* ]] || OUT_DIR=$CALLER_PWD/$OUT_DIR
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS=$OUT_DIR/logs
rm -f "$OUT_DIR/gpu_check.md" "$OUT_DIR/gpu_check.json" "$LOGS"/*.log
MODE=$([ $DRY_RUN = 1 ] && echo "dry run: CPU, tiny sizes, no install" || echo "GPU")
echo "[gpu_check] $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $MODE; output in $OUT_DIR"

NAMES=()
RESULTS=()
SECS=()
DETAILS=()
FAILED=0

record() { # record NAME RESULT SECONDS DETAIL
    NAMES+=("$1")
    RESULTS+=("$2")
    SECS+=("$3")
    DETAILS+=("$4")
    [[ $2 == ok* || $2 == skipped* ]] || FAILED=1
    echo "[gpu_check] $1: $2 ($3 s)${4:+ - $4}"
}

# run_part NAME BOUND_S DETAIL_RE CMD... : CMD under `timeout` (which kills its whole process group:
# pip's compilers, pytest's workers), output to logs/<name>.log; the detail for the table is the
# log's last line matching DETAIL_RE.
run_part() {
    local name=$1 bound=$2 detail_re=$3
    shift 3
    local log="$LOGS/${name// /_}.log" start=$SECONDS rc=0 result
    echo "[gpu_check] $name: running (bound $bound s, log $log)"
    timeout --kill-after=10 "$bound" "$@" >"$log" 2>&1 || rc=$?
    case $rc in
        0) result=ok ;;
        124 | 137) result="timed out (bound $bound s)" ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    if [ $rc -ne 0 ]; then
        tail -n 30 "$log" | sed 's/^/    | /'
    fi
    local detail
    detail=$({ grep -E "$detail_re" "$log" || grep -E '[^[:space:]]' "$log" || true; } | tail -n 1 | cut -c1-200)
    record "$name" "$result" $((SECONDS - start)) "$detail"
}

# --- detect GPU arch -------------------------------------------------------------------------------
ARCH=""
ARCH_FROM=""
start=$SECONDS
if command -v nvidia-smi >/dev/null 2>&1; then
    ARCH=$(timeout 15 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
        head -n 1 | tr -d ' .') || ARCH=""
    ARCH_FROM="nvidia-smi"
fi
if ! [[ $ARCH =~ ^[0-9]+$ ]] && [ -x "$PY" ]; then
    ARCH=$(timeout 15 "$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability()
        if torch.cuda.is_available() else '')" 2>/dev/null) || ARCH=""
    ARCH_FROM="torch"
fi
if [[ $ARCH =~ ^[0-9]+$ ]]; then
    record "detect GPU arch" ok $((SECONDS - start)) "sm_$ARCH (from $ARCH_FROM)"
elif [ $DRY_RUN = 1 ]; then
    ARCH=""
    record "detect GPU arch" "ok (dry run)" $((SECONDS - start)) "no GPU found by nvidia-smi or torch, as expected here"
else
    ARCH=""
    record "detect GPU arch" FAILED $((SECONDS - start)) \
        "no GPU found by nvidia-smi or torch; install builds the default archs"
fi

# --- install + build -------------------------------------------------------------------------------
# A GPU box's own python3 usually holds a CUDA torch and has no package index (a lent machine
# reaches nothing): then our six packages go into a venv on top of it, offline; else the normal install.
INSTALL_CMD=(env CM_KERNELS_CUDA=1 MAX_JOBS="$(nproc)")
[ -n "$ARCH" ] && INSTALL_CMD+=(CM_KERNELS_CUDA_ARCHS="$ARCH")
SYSTEM_PY=${CM_GPU_CHECK_SYSTEM_PYTHON:-python3}
if [ ! -x "$ROOT/.venv/bin/python" ] &&
    "$SYSTEM_PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
    INSTALL_CMD+=(CM_INSTALL_OFFLINE=1 PYTHON="$SYSTEM_PY")
fi
INSTALL_CMD+=(bash scripts/install.sh)
if [ $DRY_RUN = 1 ]; then
    record "install + build" "skipped (dry run)" 0 "would run: ${INSTALL_CMD[*]:1}"
elif [ $INSTALL = 0 ]; then
    record "install + build" "skipped (--no-install)" 0 "uses $PY as installed"
else
    run_part "install + build" "$INSTALL_S" '[^[:space:]]' "${INSTALL_CMD[@]}"
fi

# --- what was built, and is it active --------------------------------------------------------------
DEVICE=$([ $DRY_RUN = 1 ] && echo cpu || echo cuda)
run_part "cm info" 20 '^cm_kernels' "$PY" -m cm_cli info
sed 's/^/    /' "$LOGS/cm_info.log"
run_part "cuda kernels" 20 '^(ok|FAILED)' "$PY" tools/bench/gpu.py --check-kernels --device "$DEVICE"

# --- tests ---------------------------------------------------------------------------------------
if [ $DRY_RUN = 1 ]; then
    run_part "cuda tests" "$TESTS_S" '[^[:space:]]' "$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider
else
    run_part "cuda tests" "$TESTS_S" '[^[:space:]]' "$PY" -m pytest -m cuda -q -p no:cacheprovider -rfEs
    last=$((${#NAMES[@]} - 1))
    if [[ ${RESULTS[$last]} == ok && ${DETAILS[$last]} != *passed* ]]; then
        RESULTS[last]="FAILED (no test ran)"  # every cuda test skipped: nothing was validated
        FAILED=1
        echo "[gpu_check] cuda tests: FAILED: no cuda test ran (${DETAILS[$last]})"
    fi
fi

# --- benchmark -----------------------------------------------------------------------------------
if [ $DRY_RUN = 1 ]; then
    BENCH_ARGS=(--device cpu --tiny --time-limit 10)
else
    BENCH_ARGS=(--device cuda --time-limit "$MEASURE_S")
fi
run_part "benchmark" "$BENCH_S" '^\[gpu.py\] measures:' "$PY" tools/bench/gpu.py "${BENCH_ARGS[@]}" --out "$OUT_DIR"

# --- the markdown block --------------------------------------------------------------------------
MD=$OUT_DIR/gpu_check.md
if [ ! -s "$MD" ]; then
    printf '## GPU check: %s\n\nThe benchmark wrote no figures (see logs/benchmark.log).\n' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$MD"
fi
{
    echo
    echo "### Checks (\`bash tools/gpu_check.sh$([ $DRY_RUN = 1 ] && echo ' --dry-run')\`)"
    echo
    echo "| part | result | s | detail |"
    echo "|---|---|---:|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECS[$i]} | ${DETAILS[$i]//|/\\|} |"
    done
} >>"$MD"

echo
cat "$MD"
echo
if [ $FAILED = 0 ]; then
    echo "[gpu_check] all parts ok in $SECONDS s; paste $MD into bench/RESULTS.md"
else
    echo "[gpu_check] SOME PARTS FAILED (see above and $LOGS) after $SECONDS s"
fi
exit $FAILED
