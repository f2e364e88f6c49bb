#!/usr/bin/env bash
# One-shot GPU check for a short GPU window (H100/H200, no package registry): build _C, log the GPU's state and
# clocks, compile report, the kernel tests, the communicator tests, the kernel microbenchmarks, the ISO prefill
# benchmark and the NCCL-init-timeout test on its own, in at most BUDGET_S seconds in all (a 600 s device call
# keeps 120 s to spare).
#
#     bash bench/gpu_check.sh [--dry-run] OUTDIR              # the whole plan, at most BUDGET_S = 480 s
#     bash bench/gpu_check.sh [--dry-run] --step NAME OUTDIR  # rerun one step, at most STEP_MAX_S = 180 s
#
# --dry-run prints the plan (step, limit, command), its total and the rerun command line, and exits. --step
# runs only step NAME of the plan, under min(its limit, 180 s), and appends to OUTDIR's log (a rerun on the same
# warm machine; on a fresh one `--step install` first). OUTDIR receives at most 7 files (the device tool brings
# back 8): 1 gpu_check.log (every step's output, nvidia-smi's GPU state and clocks at the start and the end),
# 2 summary.txt (also the last lines printed), 3 compile_report.csv, 4 iso_prefill.csv, 5 chunked_attention.csv,
# 6 gemm_signal.csv and 7 plots.tar (the benchmarks' PNGs). A failed or timed-out step is recorded and the next
# one still runs. Each step gets SIGINT KILL_GRACE_S before its limit (Python raises KeyboardInterrupt: pytest
# prints its failure summary and durations) and SIGKILL at it; pytest steps also dump every thread's stack
# (faulthandler) shortly before the SIGINT, so a hang with the GIL released still shows where it sat.
# Exit status: 0 all steps passed, 1 a step failed, timed out or was skipped, 2 no CUDA device (the steps
# measured nothing; each step's output says why), 64 usage error.
# Environment: PYTHON (default the first of python3, python that imports torch, else python3), CUDA_HOME (default
# the toolkit of the nvcc on PATH, symlinks resolved, if it has include/cuda_runtime.h, else /usr/local/cuda),
# ISO_KERNELS_CUDA_ARCHS (default 90: H100/H200 only, one architecture to compile instead of three),
# ISO_KERNELS_BUILD_EXT (default 1: a missing toolkit fails), TRITON_CACHE_DIR (default ~/.triton/cache, outside
# OUTDIR: compile_report fills the cache the later steps read), GPU_CHECK_PLAN (replaces the plan below).
set -uo pipefail

BUDGET_S=480
# A rerun of one step (--step) is bounded by this, so that it fits a 3-minute device call.
STEP_MAX_S=180
# A step gets SIGINT this long before its limit and SIGKILL at it: the limit bounds the step, grace included.
KILL_GRACE_S=5
# Every file with GPU tests, named so that pytest collects nothing else: test_model.py and test_checkpoint.py
# import transformers at collection. tests/test_gpu_check.py checks these lists against the tests' markers and
# imports. The kernel tests (one file per op), then the communicator tests: test_comm_nccl.py and the one-GPU
# overlap paths (test_gpu_paths.py, world-1 NCCL communicators in a spawned rank).
KERNEL_TEST_FILES="tests/test_chunked_attention.py tests/test_chunked_attention_varlen.py tests/test_add_rms_norm.py"
KERNEL_TEST_FILES+=" tests/test_gemm_signal.py tests/test_merge_attention_states.py tests/test_moe_experts.py"
COMM_TEST_FILES="tests/test_comm_nccl.py tests/test_gpu_paths.py"
# Rank 0 of 2 alone polls ncclCommInitRankConfig to its timeout: if NCCL blocks instead, with the GIL released,
# neither pytest-timeout's signal nor SIGINT interrupts it. So it runs last, in its own pytest process (the
# thread method of pytest-timeout dumps the stacks and exits; SIGKILL at the step's limit), deselected from
# pytest_comm.
NCCL_INIT_TEST="tests/test_comm_nccl.py::test_init_without_its_peers_gives_up_at_the_timeout"
# run_step sets TEST_TIMEOUT_S (pytest-timeout, per test) and FAULTHANDLER_S (every thread's stack) a few
# seconds before the step's SIGINT.
PYTEST="\$PYTHON -m pytest -m gpu -v -rfEs --durations=15 -p no:cacheprovider --timeout \$TEST_TIMEOUT_S"
PYTEST+=" -o faulthandler_timeout=\$FAULTHANDLER_S"
# The plan, the single place that says what runs: step name, limit in seconds, command (run by bash -c with
# $PYTHON, $OUT, $TEST_TIMEOUT_S and $FAULTHANDLER_S set). The limits must sum to at most BUDGET_S; the steps
# run in this order. The limits are budgets, not measurements (the script has not run on a GPU yet).
PLAN="\
install                  75 \$PYTHON -m pip install --no-build-isolation --no-deps -e .
build_info               15 \$PYTHON bench/gpu_check_report.py info
compile_report           40 \$PYTHON -m tools.compile_report --arch native --csv \"\$OUT/compile_report.csv\"
pytest_kernels           75 $PYTEST $KERNEL_TEST_FILES
pytest_comm             100 $PYTEST --deselect $NCCL_INIT_TEST $COMM_TEST_FILES
bench_chunked_attention  30 \$PYTHON bench/bench_chunked_attention.py --quick --csv \"\$OUT/chunked_attention.csv\"
bench_gemm_signal        25 \$PYTHON bench/bench_gemm_signal.py --quick --csv \"\$OUT/gemm_signal.csv\"
bench_iso_prefill        85 \$PYTHON bench/bench_iso_prefill.py --quick --device cuda --csv \"\$OUT/iso_prefill.csv\"
nccl_init                25 $PYTEST -o timeout_method=thread $NCCL_INIT_TEST
summary                  10 \$PYTHON bench/gpu_check_report.py summary \"\$OUT\""
PLAN=${GPU_CHECK_PLAN:-$PLAN}  # another plan in the same format, for tests of the runner

USAGE="usage: bash bench/gpu_check.sh [--dry-run] [--step NAME] OUTDIR"
DRY_RUN=0
STEP=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --step)
      [ $# -ge 2 ] || { echo "$USAGE" >&2; exit 64; }
      STEP=$2; shift 2 ;;
    -*) echo "$USAGE" >&2; exit 64 ;;
    *) break ;;
  esac
done
if [ $# -ne 1 ]; then
  echo "$USAGE" >&2
  exit 64
fi

# The interpreter: python3 when it imports torch, else python when it does, else python3 (the steps then fail
# and say why).
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" > /dev/null 2>&1; then
      PYTHON=$(command -v "$candidate")
      break
    fi
  done
  PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
fi
if [ -z "$PYTHON" ]; then
  echo "gpu_check: neither python3 nor python is on PATH" >&2
  exit 64
fi
# The CUDA toolkit for the install step: the nvcc on PATH with its symlinks resolved (a wrapper script in
# /usr/local/bin does not count: the folder must hold the runtime's header), else /usr/local/cuda. setup.py
# looks the same way; exported so that the log says which toolkit built _C.
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  CUDA_HOME_FROM="default (no nvcc on PATH with include/cuda_runtime.h beside it)"
  nvcc=$(command -v nvcc || true)
  if [ -n "$nvcc" ]; then
    nvcc_real=$(readlink -f "$nvcc" 2> /dev/null || echo "$nvcc")
    toolkit=${nvcc_real%/*}
    toolkit=${toolkit%/*}
    if [ -n "$toolkit" ] && [ -f "$toolkit/include/cuda_runtime.h" ]; then
      CUDA_HOME=$toolkit
      CUDA_HOME_FROM="the nvcc on PATH ($nvcc -> $nvcc_real)"
    else
      CUDA_HOME_FROM="default ($nvcc -> $nvcc_real has no include/cuda_runtime.h beside it)"
    fi
  fi
else
  CUDA_HOME_FROM="CUDA_HOME as set"
fi
# One Triton cache for every step, outside OUTDIR (which comes back, 8 files at most): compile_report fills it
# for the tests and benchmarks. tools/compile_report.py keeps TRITON_CACHE_DIR when it is set (else it would use
# its own, ISO_KERNELS_COMPILE_CACHE/triton-<version>-v<schema>); ISO_KERNELS_COMPILE_CACHE names the same folder.
TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${HOME:-/tmp}/.triton/cache}
ISO_KERNELS_COMPILE_CACHE=$TRITON_CACHE_DIR

if [ -n "$STEP" ]; then
  # Keep only that step, its limit at most STEP_MAX_S.
  chosen=""
  while read -r name limit command; do
    if [ "$name" = "$STEP" ]; then
      [ "$limit" -gt "$STEP_MAX_S" ] && limit=$STEP_MAX_S
      chosen="$name $limit $command"
    fi
  done <<< "$PLAN"
  if [ -z "$chosen" ]; then
    echo "gpu_check: no step $STEP in the plan; the steps: $(while read -r name _; do printf '%s ' "$name"; done <<< "$PLAN")" >&2
    exit 64
  fi
  PLAN=$chosen
  BUDGET_S=$STEP_MAX_S
fi
TOTAL_S=0
while read -r name limit _; do
  if [ "$limit" -le "$KILL_GRACE_S" ]; then
    echo "gpu_check: step $name's limit ${limit} s leaves no time within the ${KILL_GRACE_S} s kill grace" >&2
    exit 64
  fi
  TOTAL_S=$((TOTAL_S + limit))
done <<< "$PLAN"
describe_setup() {
  echo "PYTHON=$PYTHON CUDA_HOME=$CUDA_HOME (from $CUDA_HOME_FROM)"
  echo "TRITON_CACHE_DIR=ISO_KERNELS_COMPILE_CACHE=$TRITON_CACHE_DIR TRITON_PRINT_AUTOTUNING=1" \
    "ISO_KERNELS_CUDA_ARCHS=${ISO_KERNELS_CUDA_ARCHS:-90} ISO_KERNELS_BUILD_EXT=${ISO_KERNELS_BUILD_EXT:-1}"
  echo "each step: SIGINT ${KILL_GRACE_S} s before its limit, SIGKILL at it; pytest: --timeout \$TEST_TIMEOUT_S =" \
    "limit - $((KILL_GRACE_S + 5)) s per test, faulthandler_timeout \$FAULTHANDLER_S = limit - $((KILL_GRACE_S + 2)) s"
}
if [ "$DRY_RUN" -eq 1 ]; then
  echo "gpu_check plan (step, limit s, command), PYTHON=$PYTHON:"
  echo "$PLAN"
  echo "total: ${TOTAL_S} s of a ${BUDGET_S} s budget"
  describe_setup
  echo "rerun one step (at most ${STEP_MAX_S} s, appends to the log): bash bench/gpu_check.sh --step NAME $1"
  echo "  NAME one of: $(while read -r name _; do printf '%s ' "$name"; done <<< "$PLAN")"
  exit 0
fi
if [ "$TOTAL_S" -gt "$BUDGET_S" ]; then
  echo "gpu_check: the plan's limits sum to ${TOTAL_S} s, over the ${BUDGET_S} s budget" >&2
  exit 64
fi

mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 64
cd "$(dirname "$0")/.." || exit 64
export PYTHON OUT CUDA_HOME TRITON_CACHE_DIR ISO_KERNELS_COMPILE_CACHE PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
export ISO_KERNELS_CUDA_ARCHS=${ISO_KERNELS_CUDA_ARCHS:-90}
export ISO_KERNELS_BUILD_EXT=${ISO_KERNELS_BUILD_EXT:-1}
LOG=$OUT/gpu_check.log
if [ -z "$STEP" ]; then
  : > "$LOG"
  # The benchmarks append: start clean (a --step rerun appends to what the full run left).
  rm -f "$OUT"/compile_report.csv "$OUT"/chunked_attention.csv "$OUT"/gemm_signal.csv "$OUT"/iso_prefill.csv
  echo "gpu_check plan, ${TOTAL_S} s of a ${BUDGET_S} s budget:" | tee -a "$LOG"
else
  echo "gpu_check rerun of step $STEP (at most ${STEP_MAX_S} s), appended:" | tee -a "$LOG"
fi
{ echo "$PLAN"
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2> /dev/null), commit" \
    "$(git rev-parse --short HEAD 2> /dev/null || echo unknown)$(git diff --quiet HEAD 2> /dev/null || echo ' (with local changes)')"
  describe_setup
} | tee -a "$LOG"
GPU_CHECK_STEPS=""  # one "name<TAB>status<TAB>seconds<TAB>limit" line per step, for the summary
STEP_REASONS=""     # per step, its last line that says why nothing ran on a GPU (printed when there is none)
FAILED=0
# Lines in a step's output that say why it measured nothing on a machine without a GPU, and pytest's counts.
NO_GPU_PATTERN='needs? a CUDA device|no CUDA device|ISO_KERNELS_BUILD_EXT=1 but|nvidia-smi: not'
PYTEST_COUNTS_PATTERN='^=+ [0-9]+ (passed|failed|skipped|deselected|error).* in [0-9.]+s'

# run_step NAME LIMIT COMMAND: COMMAND under timeout (SIGINT KILL_GRACE_S before LIMIT, SIGKILL at it), its
# output to the terminal and the log.
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
  local interrupt_at=$((limit - KILL_GRACE_S))
  export TEST_TIMEOUT_S=$((interrupt_at > 10 ? interrupt_at - 5 : interrupt_at))
  export FAULTHANDLER_S=$((interrupt_at > 5 ? interrupt_at - 2 : interrupt_at))
  echo "=== $name (limit ${limit}s, SIGINT at ${interrupt_at}s): $command" | tee -a "$LOG"
  local start=$SECONDS first_line
  first_line=$(($(wc -l < "$LOG") + 1))
  timeout -s INT -k "$KILL_GRACE_S" "$interrupt_at" bash -c "$command" < /dev/null 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" -eq 124 ]; then
    status="TIMEOUT after ${limit}s (stopped by SIGINT at ${interrupt_at}s)"
  elif [ "$rc" -eq 137 ]; then
    status="TIMEOUT after ${limit}s (SIGKILL: still running ${KILL_GRACE_S}s after SIGINT)"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || FAILED=1
  GPU_CHECK_STEPS+="$name	$status	$((SECONDS - start))	$limit"$'\n'
  local why counts
  why=$(tail -n "+$first_line" "$LOG" | grep -E "$NO_GPU_PATTERN" | tail -n 1 | cut -c 1-160)
  counts=$(tail -n "+$first_line" "$LOG" | grep -E "$PYTEST_COUNTS_PATTERN" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  STEP_REASONS+="  $name: $status${why:+; $why}${counts:+ ($counts)}"$'\n'
  echo "=== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
}

SUMMARY_RAN=0
SECONDS=0  # the budget counts from the first step (finding the interpreter took a few seconds)
while read -r name limit command; do
  export GPU_CHECK_STEPS  # what the summary step reports
  run_step "$name" "$limit" "$command"
  [ "$name" = summary ] && SUMMARY_RAN=1
done <<< "$PLAN"

if [ "$SUMMARY_RAN" -eq 1 ] && grep -q "^gpu: none" "$OUT/summary.txt" 2> /dev/null; then
  { echo "gpu_check: no CUDA device, so the GPU steps measured nothing (exit 2). Per step, its status and the" \
      "last line of its output that says why:"
    printf '%s' "$STEP_REASONS"
  } | tee -a "$LOG"
  exit 2
fi
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: at least one step failed (exit 1)" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: ${STEP:+step $STEP: }all steps passed in $SECONDS s" | tee -a "$LOG"
