"""merge_attention_states (one Triton kernel) against the PyTorch reference, bf16 outputs, fp32 LSEs.

Shapes: the per-rank attention of Llama-70B at TP 8 (8 query heads of head_dim 128) and at TP 4 (16 heads),
for chunk 2 lengths of 1k-16k queries, the merge of its prefix and diagonal passes. The op is memory-bound:
metric GB/s = (bytes read + written) / t from the median of do_bench; ratios are against
``iso_kernels.reference.merge_attention_states_ref`` measured in the same run.

    python bench/bench_merge_attention_states.py [--quick] [--csv [PATH]]
"""

import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds iso_kernels and triton_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

HEAD_DIM = 128
HEADS = (8, 16)  # Llama-70B's 64 query heads at TP 8 and TP 4
TOKENS = (1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (4096,)
DEFAULT_CSV = common.RESULTS / "merge_attention_states.csv"


def providers(out_a, lse_a, out_b, lse_b):
    from iso_kernels.ops import merge_attention_states
    from iso_kernels.reference import merge_attention_states_ref

    return {"torch": lambda: merge_attention_states_ref(out_a, lse_a, out_b, lse_b),
            "triton": lambda: merge_attention_states(out_a, lse_a, out_b, lse_b)}


def main():
    parser = common.bench_arguments(__doc__, quick_help="8 heads at 4096 queries only", default_csv=DEFAULT_CSV)
    args = parser.parse_args()
    common.require_gpu()

    rows = []
    print(f"{'mode':<10}{'q_len':>7}{'torch GB/s':>12}{'triton GB/s':>13}{'triton/torch':>14}")
    for n_heads in HEADS[:1] if args.quick else HEADS:
        mode = f"{n_heads} heads"
        for q_len in QUICK_TOKENS if args.quick else TOKENS:
            out_a, out_b = (torch.randn(1, q_len, n_heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
                            for _ in range(2))
            lse_a, lse_b = (torch.randn(1, n_heads, q_len, device="cuda") for _ in range(2))
            # two outputs and two LSEs read, one of each written
            nbytes = 3 * (out_a.numel() * out_a.element_size() + lse_a.numel() * lse_a.element_size())
            config = {"n_heads": n_heads, "head_dim": HEAD_DIM, "dtype": "bfloat16"}
            found, gbps = common.bench_memory_bound("merge_attention_states", mode, "q_len", q_len,
                                                    providers(out_a, lse_a, out_b, lse_b), nbytes, config)
            rows += found
            print(f"{mode:<10}{q_len:>7}{gbps['torch']:>12.0f}{gbps['triton']:>13.0f}"
                  f"{gbps['triton'] / gbps['torch']:>14.2f}")

    if args.csv:
        common.save_rows(args.csv, rows, metric="GB/s", ylabel="GB/s (bf16)",
                         title=f"merge_attention_states vs PyTorch, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
