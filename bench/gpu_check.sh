#!/usr/bin/env bash
# One-shot GPU check for a short GPU window (H100/H200, no package registry): build _C, run the GPU tests, the
# kernel microbenchmarks and the ISO prefill benchmark, within GPU_CHECK_BUDGET_S seconds (default 420).
#
#     bash bench/gpu_check.sh OUTDIR
#
# OUTDIR receives at most 7 files (the device tool brings back 8): gpu_check.log (every step's output),
# summary.txt (also the last lines printed), iso_prefill.csv/.png, chunked_attention.csv, gemm_signal.csv and
# kernel_plots.tar (the kernel benchmarks' PNGs). Every step runs under `timeout`, capped by what is left of the
# budget; a failed step is recorded and the next one still runs. Exit status: 0 all steps passed, 1 a step
# failed, timed out or was skipped for lack of time, 2 no CUDA device (the steps ran but measured nothing).
# Environment: PYTHON (default python), GPU_CHECK_BUDGET_S, ISO_KERNELS_CUDA_ARCHS (default 90: H100/H200 only,
# one architecture to compile instead of three), ISO_KERNELS_BUILD_EXT (default 1: a missing toolkit fails).
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 64
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 64
cd "$(dirname "$0")/.." || exit 64
PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
export ISO_KERNELS_CUDA_ARCHS=${ISO_KERNELS_CUDA_ARCHS:-90}
export ISO_KERNELS_BUILD_EXT=${ISO_KERNELS_BUILD_EXT:-1}
: > "$LOG"
rm -f "$OUT"/chunked_attention.csv "$OUT"/gemm_signal.csv "$OUT"/iso_prefill.csv  # benchmarks append: start clean
STEPS=""  # one "name<TAB>status<TAB>seconds" line per step, for the summary
FAILED=0

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout, its output to the terminal and the log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    STEPS+="$name	SKIPPED (budget spent)	0"$'\n'
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || FAILED=1
  STEPS+="$name	$status	$((SECONDS - start))"$'\n'
  echo "=== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
}

step install 180 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
step build_info 60 "$PYTHON" -c "
import json, torch, triton, iso_kernels
print(json.dumps(iso_kernels.build_info(), indent=1))
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
step pytest_gpu 150 "$PYTHON" -m pytest -m gpu -q --timeout 120 -p no:cacheprovider
step bench_chunked_attention 120 "$PYTHON" bench/bench_chunked_attention.py --quick --csv "$OUT/chunked_attention.csv"
step bench_gemm_signal 90 "$PYTHON" bench/bench_gemm_signal.py --quick --csv "$OUT/gemm_signal.csv"
step bench_iso_prefill 240 "$PYTHON" bench/bench_iso_prefill.py --quick --device cuda --csv "$OUT/iso_prefill.csv"

# The kernel benchmarks write a PNG each: pack them so that OUTDIR stays within the files brought back.
plots=$(cd "$OUT" && ls chunked_attention.png gemm_signal.png 2>/dev/null)
if [ -n "$plots" ]; then
  # shellcheck disable=SC2086 # one word per file name; the names have no spaces
  (cd "$OUT" && tar -cf kernel_plots.tar $plots && rm -f $plots)
fi

GPU_CHECK_STEPS=$STEPS GPU_CHECK_OUT=$OUT timeout 30 "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
"""The last lines: GPU, step outcomes and the headline ratios from this run's CSVs."""
import csv
import json
import os
import statistics
from pathlib import Path

import torch

out = Path(os.environ["GPU_CHECK_OUT"])


def rows(name):
    path = out / name
    return list(csv.DictReader(path.open())) if path.exists() else []


def matching(rows, **match):
    return [r for r in rows if all(r[k] == str(v) for k, v in match.items())]


def p50(rows, **match):
    return statistics.median(float(r["p50"]) for r in matching(rows, **match))


print("=" * 30, "gpu_check summary", "=" * 30)
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA device)")
for line in os.environ["GPU_CHECK_STEPS"].strip().splitlines():
    name, status, seconds = line.split("\t")
    print(f"  {name:<24} {status:<26} {seconds:>4} s")

attention = rows("chunked_attention.csv")
for mode, seq_len in sorted({(r["mode"], int(r["x_value"])) for r in attention}):
    at = dict(metric="tflops", mode=mode, x_value=seq_len)
    ours, sdpa = p50(attention, provider="triton", **at), p50(attention, provider="sdpa", **at)
    print(f"attention {mode:<7} S={seq_len:<6} triton {ours:6.1f} TFLOP/s   vs sdpa {ours / sdpa:.2f}x")
gemm = rows("gemm_signal.csv")
for shape, m in sorted({(r["mode"], int(r["x_value"])) for r in gemm}):
    mm, ours, signal = (p50(gemm, metric="TFLOP/s", mode=shape, x_value=m, provider=p)
                        for p in ("torch.matmul", "gemm", "gemm_signal"))
    print(f"gemm {shape:<15} M={m:<6} gemm_signal {signal:6.1f} TFLOP/s   vs cuBLAS: gemm {ours / mm:.2f}x, "
          f"gemm_signal {signal / mm:.2f}x")
iso = rows("iso_prefill.csv")
for link, seq_len in sorted({(r["mode"], int(r["x_value"])) for r in iso}):
    at = dict(metric="ms", mode=link, x_value=seq_len)
    parts = [f"{provider} {p50(iso, provider=provider, **at):.2f} ms" for provider in ("serial", "no-comm")]
    for provider in ("iso-auto", "iso-2even"):
        chunks = json.loads(matching(iso, provider=provider, **at)[0]["config_json"])["chunks"]
        reduction = p50(iso, provider=provider, metric="reduction", mode=link, x_value=seq_len)
        efficiency = p50(iso, provider=provider, metric="overlap_efficiency", mode=link, x_value=seq_len)
        parts.append(f"{provider} {p50(iso, provider=provider, **at):.2f} ms ({chunks} chunks) "
                     f"R {100 * reduction:.1f}% eff {efficiency:.2f}")
    print(f"iso {link:<10} S={seq_len:<5} " + "; ".join(parts))
if not (attention or gemm or iso):
    print("no benchmark rows were written")
EOF

if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA device, so the GPU steps measured nothing (exit 2)" | tee -a "$LOG"
  exit 2
fi
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: at least one step failed (exit 1)" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$LOG"
