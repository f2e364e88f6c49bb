"""add_rms_norm (residual add + RMSNorm, one Triton kernel) against the PyTorch reference, bf16.

Shapes: Llama-70B's hidden size 8192 (and 4096) for 1k-16k tokens, with and without a residual (``rms_norm``
is the same kernel without one). The op is memory-bound: metric GB/s = (bytes read + written) / t from the
median of do_bench; ratios are against ``iso_kernels.reference`` (what eager PyTorch runs on its own, computed
in fp32 like Hugging Face Llama) measured in the same run.

    python bench/bench_add_rms_norm.py [--quick] [--csv [PATH]]
"""

import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds iso_kernels and triton_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

HIDDEN_SIZES = (4096, 8192)
TOKENS = (1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (4096,)
EPS = 1e-5
DEFAULT_CSV = common.RESULTS / "add_rms_norm.csv"


def providers(x, residual, weight):
    from iso_kernels.ops import add_rms_norm, rms_norm
    from iso_kernels.reference import add_rms_norm_ref, rms_norm_ref

    if residual is None:
        return {"torch": lambda: rms_norm_ref(x, weight, EPS), "triton": lambda: rms_norm(x, weight, EPS)}
    return {"torch": lambda: add_rms_norm_ref(x, residual, weight, EPS),
            "triton": lambda: add_rms_norm(x, residual, weight, EPS)}


def main():
    parser = common.bench_arguments(__doc__, quick_help="hidden 8192 at 4096 tokens only", default_csv=DEFAULT_CSV)
    args = parser.parse_args()
    common.require_gpu()

    rows = []
    print(f"{'mode':<18}{'tokens':>7}{'torch GB/s':>12}{'triton GB/s':>13}{'triton/torch':>14}")
    for hidden in HIDDEN_SIZES[-1:] if args.quick else HIDDEN_SIZES:
        weight = torch.randn(hidden, dtype=torch.bfloat16, device="cuda")
        for with_residual in (True, False):
            mode = f"hidden {hidden}{' + residual' if with_residual else ''}"
            for tokens in QUICK_TOKENS if args.quick else TOKENS:
                x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
                residual = torch.randn_like(x) if with_residual else None
                # x (and the residual) read, out (and the new residual) written, the weight read once
                nbytes = (x.numel() * (4 if with_residual else 2) + hidden) * x.element_size()
                config = {"hidden": hidden, "residual": with_residual, "dtype": "bfloat16"}
                found, gbps = common.bench_memory_bound("add_rms_norm", mode, "tokens", tokens,
                                                        providers(x, residual, weight), nbytes, config)
                rows += found
                print(f"{mode:<18}{tokens:>7}{gbps['torch']:>12.0f}{gbps['triton']:>13.0f}"
                      f"{gbps['triton'] / gbps['torch']:>14.2f}")

    if args.csv:
        common.save_rows(args.csv, rows, metric="GB/s", ylabel="GB/s (bf16)",
                         title=f"add_rms_norm vs PyTorch, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
