"""Varlen chunked attention forward: the queries of many sequences packed in one stream, each sequence over
its own keys in a KV cache, contiguous ``(batch, max_kv, ...)`` or paged through a block table, flash-style
(one pass over the keys, fp32 online softmax in base 2), writing output and LSE.

Sequence i's queries sit at its last ``len_q_i`` key positions (bottom-right causal, like
``chunked_attention`` with ``q_start = seqused_k[i] - len_q_i``). Each program runs one ``BLOCK_M`` tile of
one sequence and head through ``chunked_attention``'s tile (prefix sweep without a mask, then the diagonal
band); it finds its sequence by a binary search over ``cu_seqlens_q``, so the launch needs no lengths from the
device (no host sync). With ``WINDOWED`` (a sliding window, query positions as above also when not causal) the
tile skips the key blocks outside its rows' windows, as ``chunked_attention``'s does.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune, launch_tuned
from .chunked_attention import (
    _CONFIGS_16BIT,
    _CONFIGS_FP32,
    _INTERPRETER_CONFIG,
    SUPPORTED_HEAD_DIMS,
    _chunked_attention_fwd_tile,
    dot_options,
    keep_attention_configs,
    window_arguments,
)

# --- constants ---
# Page sizes (tokens per KV block) the kernel is built for: each is a constexpr, so a launch compiles once per
# size; powers of two make `n // PAGE_SIZE` and `n % PAGE_SIZE` shifts and masks. 16 is vLLM's default, 256
# flash-attn's paged minimum.
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128, 256)
# Arguments that change with every packing of the stream, left unspecialized so that a new packing reuses the
# compiled kernels (see chunked_attention.LENGTH_ARGUMENTS): the sequence count and its search depth, the
# tuning buckets, the LSE stride (total_q) and the block table's row stride (its pages per sequence); and the
# window's sides, so that a new window size compiles nothing either.
PACKING_ARGUMENTS = ["batch", "search_steps", "total_q_bucket", "kv_capacity_bucket", "stride_lh", "stride_tb",
                     "window_left", "window_right"]


def _keep(configs_, named_args, **kwargs):
    return keep_attention_configs(_chunked_attention_varlen_fwd_kernel, named_args, kwargs)


@autotune(configs=_CONFIGS_16BIT + _CONFIGS_FP32,
          key=["total_q_bucket", "kv_capacity_bucket", "HEAD_DIM", "CAUSAL", "WINDOWED", "PAGE_SIZE"],
          prune_configs_by={"early_config_prune": _keep})
@triton.jit(do_not_specialize=PACKING_ARGUMENTS)
def _chunked_attention_varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr,
    stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_om, stride_oh, stride_lh, stride_tb,
    batch, search_steps, group_size, window_left, window_right, qk_scale,
    total_q_bucket, kv_capacity_bucket,  # autotune key only: retune per power-of-two size, not per size
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # --- program -> (sequence, query tile, head) ---
    # Sequence i's tiles are programs cu_seqlens_q[i] // BLOCK_M + i + [0, cdiv(len_q_i, BLOCK_M)): the ranges
    # never overlap, and cdiv(total_q, BLOCK_M) + batch programs hold them all; the gaps return at once. The
    # sequence is the last i whose first program is <= this one: a binary search of `search_steps` halvings.
    # Programs run last tile first, so the long tiles at the ends of the sequences start before the short ones.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    lo = tl.zeros([], tl.int32)
    hi = lo + batch - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        starts_before = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid - 1)
    q_begin = tl.load(cu_seqlens_q_ptr + lo)
    q_len = tl.load(cu_seqlens_q_ptr + lo + 1) - q_begin
    start_m = tile - (q_begin // BLOCK_M + lo)  # positions stay int32; the tile's pointer offsets are int64
    if start_m * BLOCK_M >= q_len:
        return
    kv_len = tl.load(seqused_k_ptr + lo)
    seq = lo.to(tl.int64)
    kv_head = head // group_size
    if PAGE_SIZE == 0:  # the sequence's rows of a (batch, max_kv, n_kv_heads, head_dim) cache
        k_base = k_ptr + seq * stride_kb + kv_head * stride_kh
        v_base = v_ptr + seq * stride_vb + kv_head * stride_vh
        page_table_ptr = block_table_ptr
    else:  # pages of a (num_blocks, PAGE_SIZE, n_kv_heads, head_dim) pool, listed by the sequence's table row
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        page_table_ptr = block_table_ptr + seq * stride_tb
    row0 = q_begin.to(tl.int64)
    _chunked_attention_fwd_tile(
        q_ptr + row0 * stride_qm + head * stride_qh, k_base, v_base, out_ptr + row0 * stride_om + head * stride_oh,
        lse_ptr + head * stride_lh + row0, page_table_ptr,
        stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_om,
        start_m, q_len, kv_len, kv_len - q_len if CAUSAL or WINDOWED else 0, window_left, window_right, qk_scale,
        HEAD_DIM, CAUSAL, WINDOWED, PAGE_SIZE, DOT_F32, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )


def chunked_attention_varlen_fwd(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, causal, softmax_scale,
                                 window_left=-1, window_right=-1):
    """Launch the forward kernel. Inputs are validated by ``iso_kernels.ops.chunked_attention_varlen``.

    q: (total_q, n_heads, head_dim); cu_seqlens_q: (batch + 1,) int32; seqused_k: (batch,) int32.
    Without ``block_table``, k_cache, v_cache: (batch, max_kv, n_kv_heads, head_dim); with it, pages
    (num_blocks, block_size, n_kv_heads, head_dim) and block_table: (batch, max_blocks_per_seq) int32. Any
    strides with the last one 1. ``window_left``, ``window_right``: the sliding window (-1: unbounded).
    Returns ``(out, lse)``: out (total_q, n_heads, head_dim) contiguous in q's dtype, lse (n_heads, total_q) fp32.
    """
    total_q, n_heads, head_dim = q.shape
    batch, n_kv_heads = cu_seqlens_q.shape[0] - 1, k_cache.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must have stride 1 in their last (head_dim) dimension")
    page_size = 0 if block_table is None else k_cache.shape[1]
    if block_table is not None and page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"k_cache block_size must be one of {SUPPORTED_PAGE_SIZES}, got {page_size}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    kv_capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * page_size
    if block_table is not None:
        block_table = block_table.contiguous()
    # No sequence holds more than kv_capacity keys: it stands for an unbounded side.
    window_left, window_right, windowed = window_arguments(window_left, window_right, causal, kv_capacity)

    def grid(meta):
        return triton.cdiv(total_q, meta["BLOCK_M"]) + batch, n_heads

    launch_tuned(
        _chunked_attention_varlen_fwd_kernel, grid, _INTERPRETER_CONFIG,
        q, k_cache, v_cache, out, lse, cu_seqlens_q.contiguous(), seqused_k.contiguous(), block_table,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), 0 if block_table is None else block_table.stride(0),
        batch, (batch - 1).bit_length(), n_heads // n_kv_heads, window_left, window_right, softmax_scale,
        triton.next_power_of_2(total_q), triton.next_power_of_2(max(kv_capacity, 1)),
        HEAD_DIM=head_dim, CAUSAL=causal, WINDOWED=windowed, PAGE_SIZE=page_size, **dot_options(q.dtype),
    )
    return out, lse
