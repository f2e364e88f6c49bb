#!/usr/bin/env bash
# One-shot GPU check for a short GPU window (H100/H200, no package registry): build _C, compile report, the GPU
# tests, the kernel microbenchmarks and the ISO prefill benchmark, in at most BUDGET_S seconds in all.
#
#     bash bench/gpu_check.sh [--dry-run] OUTDIR
#
# --dry-run prints the plan (step, limit, command) and its total, and exits. OUTDIR receives at most 7 files
# (the device tool brings back 8): gpu_check.log (every step's output), summary.txt (also the last lines
# printed), compile_report.csv, iso_prefill.csv, chunked_attention.csv, gemm_signal.csv and plots.tar (the
# benchmarks' PNGs). A failed or timed-out step is recorded and the next one still runs. Exit status: 0 all
# steps passed, 1 a step failed, timed out or was skipped, 2 no CUDA device (the steps measured nothing).
# Environment: PYTHON (default python, else python3), ISO_KERNELS_CUDA_ARCHS (default 90: H100/H200 only, one
# architecture to compile instead of three), ISO_KERNELS_BUILD_EXT (default 1: a missing toolkit fails),
# GPU_CHECK_PLAN (replaces the plan below).
set -uo pipefail

BUDGET_S=540
# A step gets SIGTERM this long before its limit and SIGKILL at it: the limit bounds the step, grace included.
KILL_GRACE_S=5
# Every file with GPU tests, named so that pytest collects nothing else: test_model.py and test_checkpoint.py
# import transformers at collection. tests/test_gpu_check.py checks this list against the tests' markers and
# imports.
GPU_TEST_FILES="tests/test_chunked_attention.py tests/test_comm_nccl.py tests/test_add_rms_norm.py"
GPU_TEST_FILES+=" tests/test_gemm_signal.py tests/test_merge_attention_states.py tests/test_chunked_attention_varlen.py"
# The plan, the single place that says what runs: step name, limit in seconds, command (run by bash -c with
# $PYTHON and $OUT set). The limits must sum to at most BUDGET_S; the steps run in this order.
PLAN="\
install                  75 \$PYTHON -m pip install --no-build-isolation --no-deps -e .
build_info               20 \$PYTHON bench/gpu_check_report.py info
compile_report           60 \$PYTHON -m iso_kernels compile-report --arch native --csv \"\$OUT/compile_report.csv\"
pytest_gpu              140 \$PYTHON -m pytest -m gpu -q --timeout 120 -p no:cacheprovider $GPU_TEST_FILES
bench_chunked_attention  55 \$PYTHON bench/bench_chunked_attention.py --quick --csv \"\$OUT/chunked_attention.csv\"
bench_gemm_signal        40 \$PYTHON bench/bench_gemm_signal.py --quick --csv \"\$OUT/gemm_signal.csv\"
bench_iso_prefill       130 \$PYTHON bench/bench_iso_prefill.py --quick --device cuda --csv \"\$OUT/iso_prefill.csv\"
summary                  15 \$PYTHON bench/gpu_check_report.py summary \"\$OUT\""
PLAN=${GPU_CHECK_PLAN:-$PLAN}  # another plan in the same format, for tests of the runner

DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then
  DRY_RUN=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 64
fi

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$PYTHON" ]; then
  echo "gpu_check: neither python nor python3 is on PATH" >&2
  exit 64
fi
TOTAL_S=0
while read -r name limit _; do
  if [ "$limit" -le "$KILL_GRACE_S" ]; then
    echo "gpu_check: step $name's limit ${limit} s leaves no time within the ${KILL_GRACE_S} s kill grace" >&2
    exit 64
  fi
  TOTAL_S=$((TOTAL_S + limit))
done <<< "$PLAN"
if [ "$DRY_RUN" -eq 1 ]; then
  echo "gpu_check plan (step, limit s, command), PYTHON=$PYTHON:"
  echo "$PLAN"
  echo "total: ${TOTAL_S} s of a ${BUDGET_S} s budget"
  exit 0
fi
if [ "$TOTAL_S" -gt "$BUDGET_S" ]; then
  echo "gpu_check: the plan's limits sum to ${TOTAL_S} s, over the ${BUDGET_S} s budget" >&2
  exit 64
fi

mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 64
cd "$(dirname "$0")/.." || exit 64
export PYTHON OUT PYTHONUNBUFFERED=1
export ISO_KERNELS_CUDA_ARCHS=${ISO_KERNELS_CUDA_ARCHS:-90}
export ISO_KERNELS_BUILD_EXT=${ISO_KERNELS_BUILD_EXT:-1}
LOG=$OUT/gpu_check.log
: > "$LOG"
# The benchmarks append: start clean.
rm -f "$OUT"/compile_report.csv "$OUT"/chunked_attention.csv "$OUT"/gemm_signal.csv "$OUT"/iso_prefill.csv
{ echo "gpu_check plan, ${TOTAL_S} s of a ${BUDGET_S} s budget, PYTHON=$PYTHON:"; echo "$PLAN"; } | tee -a "$LOG"
GPU_CHECK_STEPS=""  # one "name<TAB>status<TAB>seconds<TAB>limit" line per step, for the summary
FAILED=0

# run_step NAME LIMIT COMMAND: COMMAND under timeout, its output to the terminal and the log.
run_step() {
  local name=$1 limit=$2 command=$3
  local left=$((BUDGET_S - SECONDS))  # the plan fits the budget; this only absorbs the script's own seconds
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le "$KILL_GRACE_S" ]; then
    GPU_CHECK_STEPS+="$name	SKIPPED (budget spent)	0	0"$'\n'
    echo "=== $name: SKIPPED (budget spent)" | tee -a "$LOG"
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s): $command" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k "$KILL_GRACE_S" $((limit - KILL_GRACE_S)) bash -c "$command" < /dev/null 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || FAILED=1
  GPU_CHECK_STEPS+="$name	$status	$((SECONDS - start))	$limit"$'\n'
  echo "=== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
}

while read -r name limit command; do
  export GPU_CHECK_STEPS  # what the summary step reports
  run_step "$name" "$limit" "$command"
done <<< "$PLAN"

if grep -q "^gpu: none" "$OUT/summary.txt" 2>/dev/null; then
  echo "gpu_check: no CUDA device, so the GPU steps measured nothing (exit 2)" | tee -a "$LOG"
  exit 2
fi
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: at least one step failed (exit 1)" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: all steps passed in $SECONDS s" | tee -a "$LOG"
