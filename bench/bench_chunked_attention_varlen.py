"""Varlen chunked attention forward: our op against torch SDPA run sequence by sequence, and flash-attn's varlen
kernel if installed.

A batch of 8 ragged sequences (keys 0.3x-1.7x a mean length, none a block multiple), each running ISO's chunk 2:
its second half of queries over all its keys (bottom-right causal). Caches: contiguous (batch, max_kv, ...), and
pools of shuffled pages of 16 and 256 tokens through a block table. SDPA (flash backend on GPUs) always reads
contiguous per-sequence keys, so on paged modes it does less work than the op (no page lookups); flash-attn runs
the contiguous mode from packed keys and pages of 256 (its smallest paged block) through its block table.
Metric on GPUs: TFLOP/s over visible (query, key) pairs (bf16, head_dim 128), from do_bench medians; the op is
timed through its launcher, as SDPA and flash-attn are through theirs.

On CPU (no GPU present) it times the op's CPU kernel (torch's fused CPU attention per sequence, fp32) against the
SDPA loop at small lengths and prints milliseconds: a check that the CPU path runs and what it costs there, not a
GPU measurement.

    python bench/bench_chunked_attention_varlen.py [--quick] [--csv [FILE]]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Run from a checkout without installing: the repository root holds iso_kernels and triton_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

SPREAD = (0.3, 1.7, 0.9, 1.2, 0.55, 1.45, 1.0, 0.8)  # keys of each sequence / the mean
MODES = {"contiguous": None, "paged16": 16, "paged256": 256}  # mode -> block size (None: contiguous cache)
SETTINGS = {  # mean keys per sequence (x axis), dtype, heads (query, KV) and head_dim per device
    "cuda": {"mean_kv": [1024, 2048, 4096, 8192], "quick": [2048], "dtype": torch.bfloat16, "heads": (32, 8),
             "head_dim": 128},
    "cpu": {"mean_kv": [256, 512], "quick": [256], "dtype": torch.float32, "heads": (8, 2), "head_dim": 64},
}
DEFAULT_CSV = common.RESULTS / "chunked_attention_varlen.csv"


def sequence_lengths(mean_kv):
    """(q lens, kv lens): keys 0.3x-1.7x the mean, plus 3 (off every block multiple); queries the second half."""
    kv_lens = [round(mean_kv * s) + 3 for s in SPREAD]
    return [n - n // 2 for n in kv_lens], kv_lens


def paginate(cache, block_size, generator):
    """A contiguous (batch, max_kv, ...) cache as a pool of its pages in shuffled order and the block table
    that lists each sequence's pages: (pool, block_table)."""
    batch, max_kv = cache.shape[:2]
    blocks_per_seq = -(-max_kv // block_size)
    padded = F.pad(cache, (0, 0, 0, 0, 0, blocks_per_seq * block_size - max_kv))
    pages = padded.reshape(batch * blocks_per_seq, block_size, *cache.shape[2:])
    order = torch.randperm(pages.shape[0], generator=generator).to(cache.device)
    pool = torch.empty_like(pages)
    pool[order] = pages
    return pool, order.to(torch.int32).view(batch, blocks_per_seq)


def make_inputs(q_lens, kv_lens, n_heads, n_kv_heads, head_dim, dtype, device):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    q = randn(sum(q_lens), n_heads, head_dim)
    k_cache, v_cache = (randn(len(kv_lens), max(kv_lens), n_kv_heads, head_dim) for _ in range(2))
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seqused_k = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, cu_seqlens_q, seqused_k, generator


def sdpa_per_sequence(q, k_cache, v_cache, q_lens, kv_lens):
    """torch SDPA, one call per sequence over its contiguous keys, bottom-right causal; outputs concatenated."""
    from torch.nn.attention.bias import causal_lower_right

    begins = torch.tensor([0, *q_lens]).cumsum(0).tolist()
    calls = [(q[begins[i]:begins[i + 1]].transpose(0, 1)[None], k_cache[i:i + 1, :kv_lens[i]].transpose(1, 2),
              v_cache[i:i + 1, :kv_lens[i]].transpose(1, 2), causal_lower_right(q_lens[i], kv_lens[i]))
             for i in range(len(q_lens))]
    gqa = {"enable_gqa": True} if q.shape[1] != k_cache.shape[2] else {}

    def sdpa():
        return torch.cat([F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, **gqa)[0].transpose(0, 1)
                          for qi, ki, vi, mask in calls])

    return sdpa


def flash_attn_provider(q, k_cache, v_cache, cu_seqlens_q, q_lens, kv_lens, block_size, generator):
    """flash-attn's varlen kernel over packed keys (contiguous mode) or pages of 256 (paged256), if importable."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    max_q, max_k = max(q_lens), max(kv_lens)
    cu_seqlens_k = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    if block_size is None:
        k, v = (torch.cat([cache[i, :n] for i, n in enumerate(kv_lens)]) for cache in (k_cache, v_cache))
        return lambda: flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal=True)
    if block_size % 256:
        return None
    (k_pool, block_table), (v_pool, _) = (paginate(cache, block_size, generator.manual_seed(1))
                                          for cache in (k_cache, v_cache))
    return lambda: flash_attn_varlen_func(q, k_pool, v_pool, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal=True,
                                          block_table=block_table)


def providers(device, block_size, q_lens, kv_lens, n_heads, n_kv_heads, head_dim, dtype):
    """name -> zero-argument callable computing the batch's attention, every provider on the same keys."""
    from iso_kernels.ops import chunked_attention_varlen

    q, k_cache, v_cache, cu_seqlens_q, seqused_k, generator = make_inputs(q_lens, kv_lens, n_heads, n_kv_heads,
                                                                          head_dim, dtype, device)
    index = {"cu_seqlens_q": cu_seqlens_q, "seqused_k": seqused_k}
    keys = (k_cache, v_cache)
    if block_size is not None:
        # The same generator state for K and V: both pools hold their pages in one order, one table for both.
        (k_pool, block_table), (v_pool, _) = (paginate(cache, block_size, generator.manual_seed(1))
                                              for cache in (k_cache, v_cache))
        keys, index["block_table"] = (k_pool, v_pool), block_table
    found = {"sdpa": sdpa_per_sequence(q, k_cache, v_cache, q_lens, kv_lens)}
    if device == "cuda":
        from triton_ops.chunked_attention_varlen import chunked_attention_varlen_fwd

        args = (q, *keys, cu_seqlens_q, seqused_k, index.get("block_table"), True, head_dim**-0.5)
        found["triton"] = lambda: chunked_attention_varlen_fwd(*args)[0]
        flash = flash_attn_provider(q, k_cache, v_cache, cu_seqlens_q, q_lens, kv_lens, block_size, generator)
        if flash is not None:
            found["flash_attn"] = flash
    else:
        found["torch"] = lambda: chunked_attention_varlen(q, *keys, **index)
    return found


def run(device, mean_kvs, n_heads, n_kv_heads, head_dim, dtype):
    """Time every provider on every (mode, mean length); print a table with the ratio to SDPA; return CSV rows."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    timer = common.bench if device == "cuda" else common.bench_cpu
    backend = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device == "cuda" else contextlib.nullcontext()
    metric, unit = ("tflops", "TFLOP/s") if device == "cuda" else ("time", "ms")
    rows = []
    print(f"{'mode':>10} {'mean kv':>7} {'queries':>7}  provider    {unit + ' (p50)':>13}  vs sdpa  max|diff|")
    for mode, block_size in MODES.items():
        for mean_kv in mean_kvs:
            q_lens, kv_lens = sequence_lengths(mean_kv)
            fns = providers(device, block_size, q_lens, kv_lens, n_heads, n_kv_heads, head_dim, dtype)
            with backend:
                baseline = fns["sdpa"]()
            shown = {}
            for name, fn in fns.items():
                with backend:
                    diff = (fn().float() - baseline.float()).abs().max().item()  # also autotunes before timing
                    ms = timer(fn)
                shape = {"batch": len(q_lens), "q_lens": q_lens, "kv_lens": kv_lens, "n_heads": n_heads,
                         "n_kv_heads": n_kv_heads, "head_dim": head_dim, "block_size": block_size,
                         "dtype": str(dtype).removeprefix("torch.")}
                base = {"op": "chunked_attention_varlen", "provider": name, "mode": mode, "x_name": "mean_kv",
                        "x_value": mean_kv, "config_json": shape}
                rows.append({**base, "metric": "time", "unit": "ms", "p50": ms[0], "p20": ms[1], "p80": ms[2]})
                if device == "cuda":
                    p50, p20, p80 = (sum(common.attention_tflops(1, n_heads, lq, lk, head_dim, t)
                                         for lq, lk in zip(q_lens, kv_lens, strict=True))
                                     for t in (ms[0], ms[2], ms[1]))  # slower time -> lower TFLOP/s
                    rows.append({**base, "metric": metric, "unit": unit, "p50": p50, "p20": p20, "p80": p80})
                    shown[name] = p50
                else:
                    shown[name] = ms[0]
                ratio = shown[name] / shown["sdpa"] if device == "cuda" else shown["sdpa"] / shown[name]
                print(f"{mode:>10} {mean_kv:>7} {sum(q_lens):>7}  {name:<10} {shown[name]:>13.2f}  {ratio:>6.2f}x"
                      f"  {diff:.1e}")
    return rows


def main():
    parser = common.bench_arguments(__doc__, quick_help="one mean length per mode", default_csv=DEFAULT_CSV)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = SETTINGS[device]
    if device == "cpu":
        print("no CUDA device: the op's CPU kernel against SDPA on CPU, fp32 (speed-up = sdpa ms / ms)")
    rows = run(device, settings["quick"] if args.quick else settings["mean_kv"], *settings["heads"],
               settings["head_dim"], settings["dtype"])
    if args.csv:
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        metric, ylabel = ("tflops", "TFLOP/s") if device == "cuda" else ("time", "ms")
        common.save_rows(args.csv, rows, metric=metric, ylabel=ylabel,
                         title=f"varlen chunked attention forward (causal), {where}")


if __name__ == "__main__":
    main()
