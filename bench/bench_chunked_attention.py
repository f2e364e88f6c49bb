"""Chunked causal attention forward: our Triton kernel vs torch SDPA (flash backend) and flash-attn if installed.

Shapes (bf16, head_dim 128, causal): square prompts of 1k-16k tokens (SDPA with is_causal), and the two ISO
chunks of each prompt split at s = S/2: chunk 1 (q_len=s, kv_len=s) and chunk 2 (q_len=S-s, kv_len=S, bottom-right
mask: SDPA with causal_lower_right, which runs flash). Metric: TFLOP/s over visible (query, key) pairs.
The kernel is timed through its launcher, as SDPA and flash-attn are timed through theirs.

    python bench/bench_chunked_attention.py [--quick] [--csv bench/results/chunked_attention.csv]
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import common

SEQ_LENS = [1024, 2048, 4096, 8192, 16384]
QUICK_SEQ_LENS = [1024, 4096]
MODES = ("square", "chunk1", "chunk2")


def chunk_shape(mode, seq_len):
    """(q_len, kv_len) of a mode for a prompt of seq_len tokens split at seq_len // 2."""
    split = seq_len // 2
    return {"square": (seq_len, seq_len), "chunk1": (split, split), "chunk2": (seq_len - split, seq_len)}[mode]


def providers(q, k, v):
    """name -> zero-argument callable computing causal (bottom-right) attention of q over k, v."""
    from torch.nn.attention.bias import causal_lower_right

    from triton_ops.chunked_attention import chunked_attention_fwd

    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    scale = head_dim**-0.5
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    mask = {"is_causal": True} if q_len == kv_len else {"attn_mask": causal_lower_right(q_len, kv_len)}
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}

    def sdpa():  # the caller times it inside sdpa_kernel(FLASH_ATTENTION): no context manager per call
        return F.scaled_dot_product_attention(qh, kh, vh, **mask, **gqa).transpose(1, 2)

    found = {"sdpa": sdpa, "triton": lambda: chunked_attention_fwd(q, k, v, kv_len - q_len, True, scale)[0]}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return found
    found["flash_attn"] = lambda: flash_attn_func(q, k, v, causal=True)
    return found


def run(seq_lens, batch, n_heads, n_kv_heads, head_dim, dtype):
    """Time every provider on every (mode, length); print a table with the ratio to SDPA; return CSV rows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from triton_ops.chunked_attention import _chunked_attention_fwd_kernel

    rows = []
    print(f"{'mode':>7} {'seq_len':>7} {'q_len':>6} {'kv_len':>6}  provider    TFLOP/s (p50)  vs sdpa  max|diff|")
    for mode in MODES:
        for seq_len in seq_lens:
            q_len, kv_len = chunk_shape(mode, seq_len)
            q = torch.randn(batch, q_len, n_heads, head_dim, device="cuda", dtype=dtype)
            k = torch.randn(batch, kv_len, n_kv_heads, head_dim, device="cuda", dtype=dtype)
            v = torch.randn(batch, kv_len, n_kv_heads, head_dim, device="cuda", dtype=dtype)
            fns = providers(q, k, v)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                baseline = fns["sdpa"]()
            tflops = {}
            for name, fn in fns.items():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    diff = (fn().float() - baseline.float()).abs().max().item()  # also autotunes before timing
                    ms = common.bench(fn)
                p50, p20, p80 = (common.attention_tflops(batch, n_heads, q_len, kv_len, head_dim, t)
                                 for t in (ms[0], ms[2], ms[1]))  # slower time -> lower TFLOP/s
                tflops[name] = p50
                conf = {}
                if name == "triton":
                    best = _chunked_attention_fwd_kernel.best_config
                    conf = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
                shape = {"batch": batch, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
                         "q_len": q_len, "kv_len": kv_len, "dtype": str(dtype).removeprefix("torch."), **conf}
                base = {"op": "chunked_attention", "provider": name, "mode": mode, "x_name": "seq_len",
                        "x_value": seq_len, "config_json": shape}
                rows.append({**base, "metric": "tflops", "unit": "TFLOP/s", "p50": p50, "p20": p20, "p80": p80})
                rows.append({**base, "metric": "time", "unit": "ms", "p50": ms[0], "p20": ms[1], "p80": ms[2]})
                print(f"{mode:>7} {seq_len:>7} {q_len:>6} {kv_len:>6}  {name:<10} {p50:>13.1f}"
                      f"  {p50 / tflops['sdpa']:>6.2f}x  {diff:.1e}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SEQ_LENS} tokens")
    parser.add_argument("--csv", default=str(common.RESULTS / "chunked_attention.csv"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    common.require_gpu()

    rows = run(QUICK_SEQ_LENS if args.quick else SEQ_LENS, args.batch, args.heads, args.kv_heads, args.head_dim,
               torch.bfloat16)
    common.append_rows(args.csv, rows)
    print(f"csv: {args.csv}")
    png = Path(args.csv).with_suffix(".png")
    common.plot_panels([r for r in rows if r["metric"] == "tflops"], png, ylabel="TFLOP/s",
                       title=f"chunked attention forward (causal, bf16), {torch.cuda.get_device_name()}")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
