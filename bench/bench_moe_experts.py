"""moe_experts (two grouped GEMMs over the tokens sorted by expert) against the sorted-tokens reference, bf16.

Shapes: one rank's shard of the routed experts at TP 8 (every expert's intermediate dimension sharded):
Mixtral-8x22B (hidden 6144, inter 16384 / 8, 8 experts, top 2) and Qwen3-235B-A22B (hidden 4096, moe inter
1536 / 8, 128 experts, top 8), for 1k-16k tokens routed by a softmax over random logits (about even load).
Providers: ``torch`` (``iso_kernels.reference.moe_experts_ref`` in bf16: argsort of the ids, one torch.matmul
pair per expert, its host sync for the expert counts included) and ``triton`` (``ops.moe_experts`` without the
id check, which would add a host sync: the alignment, both kernels and the slot sum). Metric 6 * tokens * top_k
* hidden * inter / t (the three projections) from the median of do_bench; ratios are against torch measured
in the same run.

    python bench/bench_moe_experts.py [--quick] [--csv [PATH]]
"""

import functools
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds iso_kernels and triton_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

TP = 8
# (label, hidden, inter per rank, experts, top_k)
SHAPES = [("Mixtral-8x22B tp8", 6144, 16384 // TP, 8, 2), ("Qwen3-235B-A22B tp8", 4096, 1536 // TP, 128, 8)]
TOKENS = (1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (4096,)
PROVIDERS = ("torch", "triton")
DEFAULT_CSV = common.RESULTS / "moe_experts.csv"


def make_inputs(tokens, hidden, inter, experts, top_k):
    logits = torch.randn(tokens, experts, device="cuda")
    topk_weights, topk_ids = logits.softmax(-1).topk(top_k, dim=-1)
    topk_weights /= topk_weights.sum(-1, keepdim=True)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    w_gate_up = torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda") / hidden ** 0.5
    w_down = torch.randn(experts, hidden, inter, dtype=torch.bfloat16, device="cuda") / inter ** 0.5
    return x, topk_ids, topk_weights, w_gate_up, w_down


def tflops(tokens, hidden, inter, top_k, ms):
    return 6 * tokens * top_k * hidden * inter / (ms * 1e-3) / 1e12


def providers(inputs):
    from iso_kernels.ops import moe_experts
    from iso_kernels.reference import moe_experts_ref

    return {"torch": lambda: moe_experts_ref(*inputs, upcast=False),
            "triton": lambda: moe_experts(*inputs, check_ids=False)}


def tuned_configs(run):
    """The configs the autotuner picked for both kernels after ``run()`` (which tunes a new shape)."""
    from triton_ops.moe_experts import _moe_experts_down_kernel, _moe_experts_gate_up_kernel

    run()
    configs = {}
    for name, kernel in (("gate_up", _moe_experts_gate_up_kernel), ("down", _moe_experts_down_kernel)):
        config = kernel.best_config
        configs[name] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return configs


def main():
    parser = common.bench_arguments(__doc__, quick_help="4096 tokens only", default_csv=DEFAULT_CSV)
    args = parser.parse_args()
    common.require_gpu()
    from triton_ops.moe_experts import block_m_for

    rows = []
    print(f"{'shape':<22}{'tokens':>7}" + "".join(f"{p + ' TFLOP/s':>16}" for p in PROVIDERS) + f"{'triton/torch':>14}")
    for label, hidden, inter, experts, top_k in SHAPES:
        for tokens in QUICK_TOKENS if args.quick else TOKENS:
            inputs = make_inputs(tokens, hidden, inter, experts, top_k)
            timed = providers(inputs)
            config = {"hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k, "dtype": "bfloat16",
                      "BLOCK_M": block_m_for(tokens * top_k, experts, torch.bfloat16),
                      "kernels": tuned_configs(timed["triton"])}
            found, speed = common.bench_rates("moe_experts", label, "tokens", tokens, timed, config, unit="TFLOP/s",
                                              rate=functools.partial(tflops, tokens, hidden, inter, top_k))
            rows += found
            print(f"{label:<22}{tokens:>7}" + "".join(f"{speed[p]:>16.1f}" for p in PROVIDERS)
                  + f"{speed['triton'] / speed['torch']:>14.2f}")

    if args.csv:
        common.save_rows(args.csv, rows, metric="TFLOP/s", ylabel="TFLOP/s (bf16)",
                         title=f"moe_experts vs sorted-tokens torch, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
