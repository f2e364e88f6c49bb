"""gemm_signal against torch.matmul (cuBLAS) at Llama-70B's row-parallel GEMM shapes, bf16.

Row-parallel layers end in the all-reduce that ISO overlaps: o_proj (N = hidden 8192, K = 8192 / tp) and
down_proj (N = 8192, K = intermediate 28672 / tp), at tp 4 and 8, for M = 1k..16k tokens. Providers:
``torch.matmul``; ``gemm`` (our kernel, no signal); ``gemm_signal`` (with the counters, their zeroing
included), so that the signal's own price shows. Metric 2*M*N*K / t from the median of do_bench; ratios are
against torch.matmul measured in the same run. Target (not asserted): gemm_signal >= 0.9x torch.matmul.

    python bench/bench_gemm_signal.py [--quick] [--csv [PATH]] [--rows-per-signal 128]
"""

import json
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds iso_kernels and triton_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

HIDDEN = 8192
INTERMEDIATE = 28672
TP_DEGREES = (4, 8)
TOKENS = (1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (4096,)
PROVIDERS = ("torch.matmul", "gemm", "gemm_signal")
DEFAULT_CSV = common.RESULTS / "gemm_signal.csv"


def shapes(quick):
    """(label, N, K) of each row-parallel GEMM; --quick keeps tp 8 only."""
    for tp in TP_DEGREES[-1:] if quick else TP_DEGREES:
        yield f"o_proj tp{tp}", HIDDEN, HIDDEN // tp
        yield f"down_proj tp{tp}", HIDDEN, INTERMEDIATE // tp


def measure(provider, x, weight, rows_per_signal):
    """(p50, p20, p80) ms of one provider, and the kernel config it ran (None for torch)."""
    from iso_kernels.ops import gemm_signal
    from triton_ops.gemm_signal import _gemm_signal_kernel

    if provider == "torch.matmul":
        return common.bench(lambda: torch.matmul(x, weight.T)), None
    signal = None
    if provider == "gemm_signal":
        signal = torch.zeros(-(-x.shape[0] // rows_per_signal), dtype=torch.int32, device=x.device)

    def run():
        return gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)

    run()  # autotune outside the timing
    config = _gemm_signal_kernel.best_config
    config = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return common.bench(run), config


def main():
    parser = common.bench_arguments(__doc__, quick_help="tp 8 shapes at 4096 tokens only", default_csv=DEFAULT_CSV)
    parser.add_argument("--rows-per-signal", type=int, default=128)
    args = parser.parse_args()
    common.require_gpu()

    rows = []
    print(f"{'shape':<16}{'M':>7}" + "".join(f"{p:>16}" for p in PROVIDERS) + f"{'gemm/mm':>9}{'signal/mm':>11}")
    for label, n, k in shapes(args.quick):
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for m in QUICK_TOKENS if args.quick else TOKENS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            tflops = {}
            for provider in PROVIDERS:
                (p50, p20, p80), config = measure(provider, x, weight, args.rows_per_signal)
                tflops[provider] = common.gemm_tflops(m, n, k, p50)
                config_json = {"N": n, "K": k, "dtype": "bfloat16", "rows_per_signal": args.rows_per_signal,
                               "kernel": config}
                base = {"op": "gemm_signal", "provider": provider, "mode": label, "x_name": "M", "x_value": m,
                        "config_json": json.dumps(config_json, sort_keys=True)}
                rows.append({**base, "metric": "time", "unit": "ms", "p50": p50, "p20": p20, "p80": p80})
                # the faster quantile of time is the higher one of throughput
                rows.append({**base, "metric": "TFLOP/s", "unit": "TFLOP/s", "p50": tflops[provider],
                             "p20": common.gemm_tflops(m, n, k, p80), "p80": common.gemm_tflops(m, n, k, p20)})
            base_tflops = tflops["torch.matmul"]
            print(f"{label:<16}{m:>7}" + "".join(f"{tflops[p]:>16.1f}" for p in PROVIDERS)
                  + f"{tflops['gemm'] / base_tflops:>9.2f}{tflops['gemm_signal'] / base_tflops:>11.2f}")
            del x
        del weight

    if args.csv:
        common.save_rows(args.csv, rows, metric="TFLOP/s", ylabel="TFLOP/s (bf16)",
                         title=f"gemm_signal vs torch.matmul, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
