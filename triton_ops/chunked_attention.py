"""Chunked attention forward: queries at absolute positions ``[q_start, q_start + q_len)`` over keys
``[0, kv_len)``, flash-style (one pass over the keys, fp32 online softmax in base 2), writing output and LSE.

With ``CAUSAL`` query ``i`` sees keys ``0 .. q_start + i``, so chunk 2 of a split prompt runs over the keys of
chunks 1 and 2 with ``q_start`` = the length of chunk 1. Each program first sweeps the key prefix that all of
its rows see, with no mask, then the diagonal band (which also holds the ragged tail) with a mask.

With ``WINDOWED`` (a sliding window: query ``i`` sees keys ``q_start + i - window_left .. q_start + i +
window_right``) the sweep starts at the first key block the tile's first row reaches and ends after the last
block its last row reaches; the blocks outside are never loaded. The blocks every row sees whole run without a
mask, the bands at either end with one. The window is a runtime argument: one compiled kernel serves every size.
"""

import torch
import triton
import triton.language as tl

from ._config import (
    arch_candidates,
    autotune,
    config,
    interpreting,
    keep_fitting,
    launch_arguments,
    launch_tuned,
)

# --- constants ---
# tl.dot needs K >= 16; above 256 the q tile and fp32 accumulator no longer fit one program's registers.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# exp(x) == exp2(x * log2(e)); exp2 is the native special-function instruction.
LOG2_E = tl.constexpr(1.4426950408889634)
# Candidates for 16-bit inputs, best first for the common head_dims; ``_keep`` compiles each for the device
# and drops what spills or overflows shared memory there (``_config.keep_fitting``). Measured at head_dim 128
# (bf16, causal, Triton 3.9): 128x64 at 8 warps fits sm_80/90 without spills (two wgmma warpgroups of 64 rows
# on sm_90) while 4 warps spill 350-690 bytes; 128x128 suits head_dim 64 only; stage 4 and 128-row tiles
# overflow sm_89's 99 KiB; 64x32 at 8 warps is the one that fits every arch at head_dim 256.
_CONFIGS_16BIT = [
    config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    config(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
    config(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
]
# Per architecture, the 16-bit candidates never kept there, which launches do not compile (``_config.
# arch_candidates``): (arch, head_dim or None for all) -> configs. From the compile reports with every candidate
# (``tools.compile_report --all-candidates``, main matrix, bf16, both attention kernels: bench/results/
# compile_report_triton-3.6.0.csv and -3.9.0.csv). sm_90 keeps each candidate somewhere: 128x128 at head_dim
# 128 spills in this kernel but fits the varlen one (Triton 3.6 with either cache, 3.9 with pages: 0-24 B
# frames), and Triton 3.6 keeps it at head_dim 64.
_NEVER_KEPT_16BIT = {
    # sm_89: 128x128 spills in every case, 116-912 B of spill stores at head_dim 64 and 128, under both Tritons.
    (89, None): [_CONFIGS_16BIT[0]],
    # sm_80, head_dim 128: 128x128 spills in every case (40-448 B frames) under both Tritons; at head_dim 64
    # Triton 3.9 keeps it.
    (80, 128): [_CONFIGS_16BIT[0]],
}
# fp32 runs exact (ieee) dots on the FMA units: operand tiles live in registers, so tiles are small, and the
# first that fits is taken without tuning (a correctness path, not worth compiling a sweep). 64x32 spills
# 2 KB per thread at head_dim 128; 16x16 fits head_dim 256 everywhere.
_CONFIGS_FP32 = [
    config(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
    config(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1),
    config(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
]
# Arguments that change with every chunk boundary (ISO's are arbitrary: 1365, 2730, ...), left unspecialized so
# that a new boundary reuses the compiled kernels: Triton would otherwise compile a variant per value of
# "== 1" and "divisible by 16" of each. Besides the lengths and positions, the LSE strides are multiples of
# q_len; the other strides of a chunk are multiples of n_heads * head_dim, always divisible by 16. The tiles
# lose nothing: their masks vary along rows, not along the contiguous head_dim that loads vectorize over; only
# the LSE store (BLOCK_M floats per program, next to BLOCK_M x HEAD_DIM outputs) may lose its vector width. A
# chunk whose lengths are all multiples of 16 now compiles to what the others, most of ISO's, always did (the
# same registers and spills: Triton 3.9, sm_90, head_dim 128, [1365, 4093) before and any chunk now), which at
# head_dim 128 on sm_90 costs 64x64 at 4 warps and 2 stages its fit (0 -> 80 B frame): one of six that fitted.
LENGTH_ARGUMENTS = ["q_len", "kv_len", "q_start", "window_left", "window_right", "q_len_bucket", "kv_len_bucket",
                    "stride_lb", "stride_lh"]
# The interpreter runs one config whose BLOCK_M != BLOCK_N, so the CPU tests walk band blocks that some rows
# see none of.
_INTERPRETER_CONFIG = config(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)


def keep_attention_configs(kernel, named_args, kwargs):
    """The configs of the input's dtype that compile for this device without spilling and within its shared
    memory (see ``_config.keep_fitting``): the ``early_config_prune`` of the attention kernels (``kernel``, an
    autotuned kernel whose query argument is ``q_ptr``)."""
    arguments = launch_arguments(named_args, kwargs)
    if arguments["q_ptr"].dtype == torch.float32:
        return keep_fitting(kernel.fn, _CONFIGS_FP32, arguments, first_fit=True)
    candidates = arch_candidates(_CONFIGS_16BIT, _NEVER_KEPT_16BIT, arguments["HEAD_DIM"])
    return keep_fitting(kernel.fn, candidates, arguments)


def _keep(configs_, named_args, **kwargs):
    return keep_attention_configs(_chunked_attention_fwd_kernel, named_args, kwargs)


def dot_options(dtype):
    """The dot constexprs for inputs of ``dtype``: fp32 operands when interpreting bf16 (the interpreter's bf16
    arithmetic is wrong), and exact products for fp32 inputs, like torch's default matmul, not TF32."""
    return {"DOT_F32": interpreting() and dtype == torch.bfloat16,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


@triton.jit
def _chunked_attention_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, page_table_ptr, row_start, row_limit,
    stride_kp, stride_kn, stride_vp, stride_vn, kv_len, qk_scale, start_n, end_n, hop_start, hop_end,
    MASKED: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The key blocks ``[start_n, end_n)`` into the running ``acc``, ``l_i``, ``m_i``; with ``MASKED`` row i sees
    only keys ``row_start[i]`` (with ``WINDOWED``) to ``row_limit[i]`` of them. A window's masked sweep (``MASKED``
    and ``WINDOWED``) hops over the blocks ``[hop_start, hop_end)``: its two bands run as one loop."""
    offs_d = tl.arange(0, HEAD_DIM)
    if not (MASKED and WINDOWED):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if PAGE_SIZE == 0:  # key n at row n of the sequence's keys (int64 offsets, int32 positions)
            k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
    else:
        end_n -= hop_end - hop_start
    for n in range(start_n, end_n, BLOCK_N):
        if MASKED and WINDOWED:  # step n of the loop is key block n before the hop, n + its length after it
            offs_n = tl.where(n < hop_start, n, n + hop_end - hop_start) + tl.arange(0, BLOCK_N)
            if PAGE_SIZE == 0:
                k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
                v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
        if PAGE_SIZE > 0:  # key n at slot n % PAGE_SIZE of page page_table[n // PAGE_SIZE]
            if MASKED:
                page = tl.load(page_table_ptr + offs_n // PAGE_SIZE, mask=offs_n < kv_len, other=0).to(tl.int64)
            else:
                page = tl.load(page_table_ptr + offs_n // PAGE_SIZE).to(tl.int64)
            slot = offs_n % PAGE_SIZE
            k_ptrs = k_base + (page * stride_kp + slot * stride_kn)[:, None] + offs_d[None, :]
            v_ptrs = v_base + (page * stride_vp + slot * stride_vn)[:, None] + offs_d[None, :]
        # --- scores ---
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n < kv_len)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            seen = offs_n[None, :] <= row_limit[:, None]
            if WINDOWED:
                seen = seen & (offs_n[None, :] >= row_start[:, None])
            qk = tl.where(seen, qk, float("-inf"))
        # --- online softmax (base 2) ---
        # Without a window every row's first block holds key 0, which it sees, so m_new is finite from the first
        # block on. With one, a row may have seen no key yet: its m_i starts finite (see the tile), so m_new is.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # --- accumulate P @ V ---
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n < kv_len)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        if not (MASKED and WINDOWED):
            offs_n += BLOCK_N
            if PAGE_SIZE == 0:
                k_ptrs += BLOCK_N * stride_kn
                v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _chunked_attention_fwd_tile(
    q_base, k_base, v_base, out_base, lse_base, page_table_ptr,
    stride_qm, stride_kp, stride_kn, stride_vp, stride_vn, stride_om,
    start_m, q_len, kv_len, q_start, window_left, window_right, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Query rows ``start_m * BLOCK_M + [0, BLOCK_M)`` of one sequence and head, of ``q_len``, over its keys
    ``[0, kv_len)``: writes their output and LSE. ``q_base``, ``out_base`` and ``lse_base`` point at the head's
    row 0 (LSE rows contiguous); ``k_base``/``v_base`` at the head's key 0, or with ``PAGE_SIZE`` at the head in
    page 0 of a pool whose page stride is ``stride_kp``/``stride_vp``, pages listed by ``page_table_ptr``.
    With ``WINDOWED`` row i, at position ``q_start + i``, sees keys ``q_start + i - window_left .. q_start + i +
    window_right`` (and none past its position with ``CAUSAL``); both sides >= 0, kv_len standing for unbounded."""
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < q_len
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    # --- key ranges ---
    # Row i sees keys row_start[i] .. row_limit[i]. The blocks of [lo_full, hi_full) are seen whole by every row
    # of the tile (no mask), those of [n_start, lo_full) and [hi_full, n_end) in part (masked); the keys before
    # n_start and from n_end on by no row: never loaded. Without a window n_start = lo_full = 0.
    first_row = q_start + start_m * BLOCK_M  # positions of the tile's first row and of its last valid one
    last_row = q_start + tl.minimum((start_m + 1) * BLOCK_M, q_len) - 1
    if CAUSAL:
        row_limit = tl.minimum(q_start + offs_m, kv_len - 1)
        hi_full = (first_row + 1) // BLOCK_N * BLOCK_N
        n_end = last_row + 1
    elif WINDOWED:
        row_limit = tl.minimum(q_start + offs_m + window_right, kv_len - 1)
        hi_full = (tl.minimum(first_row + window_right, kv_len - 1) + 1) // BLOCK_N * BLOCK_N
        n_end = tl.minimum(last_row + window_right, kv_len - 1) + 1
    else:
        row_limit = tl.full([BLOCK_M], kv_len - 1, tl.int64)
        hi_full = kv_len // BLOCK_N * BLOCK_N
        n_end = kv_len
    if WINDOWED:
        row_start = q_start + offs_m - window_left
        n_start = tl.maximum(first_row - window_left, 0) // BLOCK_N * BLOCK_N
        # A window narrower than the tile leaves no block that every row sees whole: all are masked.
        lo_full = tl.minimum(tl.cdiv(tl.maximum(last_row - window_left, 0), BLOCK_N) * BLOCK_N, hi_full)
    else:
        row_start = row_limit  # unused: without a window every row's keys start at 0
        n_start = 0
        lo_full = 0

    # A window's masked sweep may reach a row before its first key: from a finite m_i its p and alpha come out 0
    # and 1, where -inf would give NaN (-inf - -inf). Scores are far above -1e30, so the first real one replaces
    # it (alpha 0). Every row sees its own position's key, so none ends at -1e30.
    m_i = tl.full([BLOCK_M], -1.0e30 if WINDOWED else float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = qk_scale * LOG2_E  # scores go to base 2 once, here
    # --- sweep: the blocks every row sees whole, then the masked band(s) ---
    # A window's two bands, [n_start, lo_full) and [hi_full, n_end), run as one loop that hops over the whole
    # blocks: as a loop of their own the leading band made the compiler spill (head_dim 128, 128x64 tiles: 348 B
    # of spill stores on sm_89; one loop: none, and 128x64 fits sm_80/89/90 windowed).
    acc, l_i, m_i = _chunked_attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, page_table_ptr, row_start, row_limit, stride_kp, stride_kn, stride_vp,
        stride_vn, kv_len, qk_scale, lo_full, hi_full, 0, 0, False, WINDOWED, HEAD_DIM, BLOCK_N, PAGE_SIZE,
        DOT_F32, DOT_PRECISION,
    )
    acc, l_i, m_i = _chunked_attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, page_table_ptr, row_start, row_limit, stride_kp, stride_kn, stride_vp,
        stride_vn, kv_len, qk_scale, n_start if WINDOWED else hi_full, n_end, lo_full, hi_full, True, WINDOWED,
        HEAD_DIM, BLOCK_N, PAGE_SIZE, DOT_F32, DOT_PRECISION,
    )

    # --- epilogue: normalise, natural-log LSE ---
    # Only kv_len == 0 (non-causal, empty key range) leaves l_i == 0: output 0 and LSE -inf, as merging expects
    # (every row of a window sees at least the key at its own position).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) / LOG2_E
    out_ptrs = out_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_base.dtype.element_ty), mask=row_mask[:, None])
    tl.store(lse_base + offs_m, lse, mask=row_mask)


@autotune(configs=_CONFIGS_16BIT + _CONFIGS_FP32,
          key=["q_len_bucket", "kv_len_bucket", "HEAD_DIM", "CAUSAL", "WINDOWED"],
          prune_configs_by={"early_config_prune": _keep})
@triton.jit(do_not_specialize=LENGTH_ARGUMENTS)
def _chunked_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    n_heads, group_size, q_len, kv_len, q_start, window_left, window_right, qk_scale,
    q_len_bucket, kv_len_bucket,  # autotune key only: retune per power-of-two length, not per length
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # --- program -> (query block, batch, head) ---
    # Causal blocks further down the sequence see more keys: launch them first so the short ones fill the tail.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // n_heads, bh % n_heads
    kv_head = head // group_size
    _chunked_attention_fwd_tile(
        q_ptr + batch * stride_qb + head * stride_qh, k_ptr + batch * stride_kb + kv_head * stride_kh,
        v_ptr + batch * stride_vb + kv_head * stride_vh, out_ptr + batch * stride_ob + head * stride_oh,
        lse_ptr + batch * stride_lb + head * stride_lh, None,
        stride_qm, 0, stride_kn, 0, stride_vn, stride_om, start_m, q_len, kv_len, q_start, window_left,
        window_right, qk_scale, HEAD_DIM, CAUSAL, WINDOWED, 0, DOT_F32, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )


def window_arguments(window_left, window_right, causal, kv_len):
    """``(window_left, window_right, WINDOWED)`` for a launch over at most ``kv_len`` keys: a side that is -1
    (unbounded) or reaches ``kv_len`` keys or more bounds nothing and is passed as ``kv_len``, keeping it in
    int32; causal attention ends at the query (right side 0). ``WINDOWED`` only where a side bounds something."""
    left = window_left if 0 <= window_left < kv_len else kv_len
    right = 0 if causal else window_right if 0 <= window_right < kv_len else kv_len
    return left, right, left < kv_len or (not causal and right < kv_len)


def chunked_attention_fwd(q, k, v, q_start, causal, softmax_scale, window_left=-1, window_right=-1):
    """Launch the forward kernel. Inputs are validated by ``iso_kernels.ops.chunked_attention``.

    q: (batch, q_len, n_heads, head_dim); k, v: (batch, kv_len, n_kv_heads, head_dim), any strides with the
    last one 1. ``window_left``, ``window_right``: the sliding window (-1: unbounded); with one, query i sits at
    position ``q_start + i`` also when not causal. Returns ``(out, lse)``: out contiguous like q, lse
    (batch, n_heads, q_len) fp32.
    """
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv_heads = k.shape[1], k.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must have stride 1 in their last (head_dim) dimension")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    window_left, window_right, windowed = window_arguments(window_left, window_right, causal, kv_len)

    def grid(meta):
        return triton.cdiv(q_len, meta["BLOCK_M"]), batch * n_heads

    launch_tuned(
        _chunked_attention_fwd_kernel, grid, _INTERPRETER_CONFIG,
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        n_heads, n_heads // n_kv_heads, q_len, kv_len, q_start if causal or windowed else 0, window_left,
        window_right, softmax_scale, triton.next_power_of_2(q_len), triton.next_power_of_2(max(kv_len, 1)),
        HEAD_DIM=head_dim, CAUSAL=causal, WINDOWED=windowed, **dot_options(q.dtype),
    )
    return out, lse

