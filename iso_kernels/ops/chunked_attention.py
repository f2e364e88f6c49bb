"""Chunked causal attention: a chunk of queries over a key range that starts at key 0.

ISO splits a prompt of S tokens into chunk 1 = tokens [0, s) and chunk 2 = tokens [s, S). Chunk 1 runs
``chunked_attention(q1, k1, v1)``; chunk 2 runs ``chunked_attention(q2, k, v, q_start=s)`` over the keys of both
chunks. Alternatively chunk 2 is a non-causal pass over chunk 1's keys plus a causal pass over its own keys,
combined by ``merge_attention_states`` (the first pass can start before chunk 1's all-reduce finishes).

``window_size=(left, right)`` restricts each query to the keys within ``left`` before and ``right`` after its
position (sliding-window attention, flash-attn's convention; -1 is unbounded).

The custom op ``iso_kernels::chunked_attention`` runs the Triton kernel on CUDA tensors and torch's fused CPU
attention on CPU tensors; ``iso_kernels.reference.chunked_attention_ref`` is the test oracle.
"""

import math
import numbers
from typing import Literal, overload

import torch

from ..reference import chunked_attention_ref
from ._checks import check_bshd, check_same_device

# tl.dot needs head_dim >= 16 and a power of two; 256 is the largest whose tiles fit a program (same list as
# triton_ops.chunked_attention.SUPPORTED_HEAD_DIMS, repeated so that CPU use never imports Triton).
_HEAD_DIMS = (16, 32, 64, 128, 256)
# Queries per call of torch's fused CPU attention under a sliding window: each piece of this many queries runs over
# only the keys its window reaches, so the work grows with q_len * (piece + window) instead of q_len * kv_len.
# Measured (2 busy cores, fp32, 8 heads, head_dim 128, 4096 causal queries): window 512 takes 768 ms as one masked
# call and 76-85 ms in pieces of 128-256 queries (1024: 147 ms); window 2048, 497 ms whole and 209 ms in pieces
# of 256 (128: 263 ms); window 64, 38 ms in pieces of 128.
_CPU_WINDOW_PIECE = 256


# --- custom op: CUDA runs the Triton kernel, CPU torch's fused attention ---
@torch.library.custom_op("iso_kernels::chunked_attention", mutates_args=(), device_types="cuda")
def _chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, causal: bool, softmax_scale: float,
    window_left: int = -1, window_right: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    from triton_ops.chunked_attention import chunked_attention_fwd

    return chunked_attention_fwd(q, k, v, q_start, causal, softmax_scale, window_left, window_right)


@_chunked_attention.register_kernel("cpu")
def chunked_attention_cpu(q, k, v, q_start, causal, softmax_scale, window_left=-1, window_right=-1):
    """``aten._scaled_dot_product_flash_attention_for_cpu``: blocked like flash attention, so it never holds
    the (q_len, kv_len) scores (3x faster than the reference at 512 tokens), and it returns the LSE."""
    q_len, kv_len = q.shape[1], k.shape[1]
    if q_len == 0 or kv_len == 0:  # the fused kernel divides by zero on empty inputs (SIGFPE)
        out, lse = chunked_attention_ref(q, k, v, q_start=q_start, causal=causal, softmax_scale=softmax_scale,
                                         window_size=(window_left, window_right))
        return out.contiguous(), lse
    window_left, window_right = _unbounded_sides(window_left, window_right, causal, kv_len)
    if window_left >= 0 or window_right >= 0:
        return _windowed_cpu(q, k, v, q_start, causal, softmax_scale, window_left, window_right)
    mask, top_left = None, False
    if causal:
        # Keys past the last query's position are masked for every query: drop them, which aligns the mask
        # bottom-right. Then q_start == 0 is the square top-left mask and a single query sees every key.
        kv_len = q_start + q_len
        k, v = k[:, :kv_len], v[:, :kv_len]
        top_left = q_start == 0
        if not top_left and q_len > 1:
            mask = torch.full((q_len, kv_len), float("-inf"), dtype=q.dtype, device=q.device).triu(q_start + 1)
    group = q.shape[2] // k.shape[2]  # GQA: each KV head serves `group` consecutive query heads
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, dim=1),
        v.transpose(1, 2).repeat_interleave(group, dim=1), is_causal=top_left, attn_mask=mask,
        scale=softmax_scale,
    )
    return out.transpose(1, 2).contiguous(), lse.contiguous()


def _unbounded_sides(window_left, window_right, causal, kv_len):
    """The window with -1 for a side that bounds nothing: ``left`` or ``right`` >= kv_len (which reaches every
    key from any query position, flash-attn's rule), and ``right`` under ``causal`` (which stops at the query)."""
    left = -1 if window_left >= kv_len else window_left
    right = -1 if causal or window_right >= kv_len else window_right
    return left, right


def _windowed_cpu(q, k, v, q_start, causal, softmax_scale, window_left, window_right):
    """The fused CPU attention under a sliding window: the queries in pieces of ``_CPU_WINDOW_PIECE``, each over
    only the keys its window reaches (the others are never read), with the band of those keys as its mask."""
    q_len, kv_len = q.shape[1], k.shape[1]
    left = kv_len if window_left < 0 else window_left  # reaches key 0 from any position
    right = 0 if causal else kv_len if window_right < 0 else window_right
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh, vh = (t.transpose(1, 2).repeat_interleave(group, dim=1) for t in (k, v))
    out = torch.empty(q.shape[0], q.shape[2], q_len, q.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q_len, dtype=torch.float32, device=q.device)
    for begin in range(0, q_len, _CPU_WINDOW_PIECE):
        end = min(begin + _CPU_WINDOW_PIECE, q_len)
        # --- the keys this piece's queries (positions q_start + [begin, end)) reach ---
        key_begin = max(q_start + begin - left, 0)
        key_end = min(q_start + end - 1 + right, kv_len - 1) + 1
        query_pos = torch.arange(q_start + begin, q_start + end, device=q.device)[:, None]
        key_pos = torch.arange(key_begin, key_end, device=q.device)[None, :]
        band = (key_pos >= query_pos - left) & (key_pos <= query_pos + right)
        mask = torch.zeros(band.shape, dtype=q.dtype, device=q.device).masked_fill_(~band, float("-inf"))
        out[:, :, begin:end], lse[:, :, begin:end] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh[:, :, begin:end], kh[:, :, key_begin:key_end], vh[:, :, key_begin:key_end], attn_mask=mask,
            scale=softmax_scale,
        )
    return out.transpose(1, 2).contiguous(), lse


@_chunked_attention.register_fake
def _(q, k, v, q_start, causal, softmax_scale, window_left=-1, window_right=-1):
    batch, q_len, n_heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, n_heads, q_len), dtype=torch.float32
    )


# --- validation ---
def check_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k", v_name: str = "v") -> None:
    """The checks every attention op makes of its keys and values against the queries ``q`` (heads in dim -2,
    head_dim last): shapes equal, q's dtype and device, q's head_dim (a supported one), GQA head counts."""
    if k.shape != v.shape:
        raise ValueError(f"{v_name} shape {tuple(v.shape)} must equal {k_name} shape {tuple(k.shape)}")
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
    check_same_device("q", q, **{k_name: k, v_name: v})
    n_heads, head_dim = q.shape[-2:]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{k_name} head_dim {k.shape[-1]} must equal q head_dim {head_dim}")
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"q head_dim must be one of {_HEAD_DIMS}, got {head_dim}")
    n_kv_heads = k.shape[-2]
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"q n_heads ({n_heads}) must be a positive multiple of {k_name} n_kv_heads ({n_kv_heads})")


def resolve_softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """``1 / sqrt(head_dim)`` for None, else the given scale, which must be a positive finite number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
            or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def resolve_window_size(window_size) -> tuple[int, int]:
    """``(left, right)`` as two ints, each >= 0 or -1 (unbounded); anything else raises ValueError."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                         f"got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _resolve_q_start(q_start, causal, windowed, q_len, kv_len):
    if not (causal or windowed):
        if q_start is not None:
            raise ValueError("q_start applies only to causal or windowed attention; pass q_start=None with "
                             "causal=False and window_size=(-1, -1)")
        return 0
    if q_start is None:
        q_start = kv_len - q_len
        if q_start < 0:
            raise ValueError(
                f"q_start defaults to kv_len - q_len = {q_start}, which is negative: causal or windowed "
                f"attention needs kv_len ({kv_len}) >= q_len ({q_len})"
            )
        return q_start
    if isinstance(q_start, bool) or not isinstance(q_start, numbers.Integral):
        raise TypeError(f"q_start must be an int, got {type(q_start).__name__}")
    if q_start < 0 or q_start + q_len > kv_len:
        raise ValueError(
            f"q_start must satisfy 0 <= q_start and q_start + q_len <= kv_len, got q_start={q_start}, "
            f"q_len={q_len}, kv_len={kv_len}"
        )
    return int(q_start)


# --- public functions ---
@overload
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int | None = None,
                      causal: bool = True, softmax_scale: float | None = None,
                      window_size: tuple[int, int] = (-1, -1),
                      return_lse: Literal[False] = False) -> torch.Tensor: ...


@overload
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int | None = None,
                      causal: bool = True, softmax_scale: float | None = None,
                      window_size: tuple[int, int] = (-1, -1),
                      return_lse: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int | None = None,
                      causal: bool = True, softmax_scale: float | None = None,
                      window_size: tuple[int, int] = (-1, -1),
                      return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int | None = None,
                      causal: bool = True, softmax_scale: float | None = None,
                      window_size: tuple[int, int] = (-1, -1),
                      return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of queries over a key range that starts at key 0.

    q: (batch, q_len, n_heads, head_dim); k, v: (batch, kv_len, n_kv_heads, head_dim) with n_heads a multiple of
    n_kv_heads (MHA, GQA, MQA); q, k, v of one dtype (float16, bfloat16, float32) and one device; head_dim in
    16, 32, 64, 128, 256; any strides whose last one is 1 (k, v may be views ``cache[:, :kv_len]`` of a cache).

    With ``causal`` the queries are the tokens at absolute positions ``[q_start, q_start + q_len)``: query i sees
    keys ``0 .. q_start + i``. The default ``q_start = kv_len - q_len`` aligns the mask bottom-right, like
    FlashAttention >= 2.1 and ``torch.nn.attention.bias.causal_lower_right``. A smaller ``q_start`` is allowed:
    keys past ``q_start + q_len`` are then masked for every query, so a KV cache longer than the prompt so far
    can be passed whole. ``q_start`` must be None when ``causal=False`` (every query sees all kv_len keys)
    without a window.

    ``window_size=(left, right)``: sliding-window attention in flash-attn's convention, each an int >= 0 or -1
    for unbounded (the default ``(-1, -1)`` is no window). Query i, at position ``p = q_start + i``, sees the keys
    j with ``p - left <= j <= p + right``, and ``j <= p`` with ``causal`` (where ``right`` is then moot). Without
    ``causal``, a window also places the queries at ``[q_start, q_start + q_len)``, by default bottom-right
    (``q_start = kv_len - q_len``, needing kv_len >= q_len). For q_len = 3, kv_len = 6, window (1, 1), 1 = seen::

        causal          causal=False
        0 0 1 1 0 0     0 0 1 1 1 0
        0 0 0 1 1 0     0 0 0 1 1 1
        0 0 0 0 1 1     0 0 0 0 1 1

    softmax_scale defaults to ``1 / sqrt(head_dim)``.
    Returns out: (batch, q_len, n_heads, head_dim) in q's dtype; with ``return_lse`` also
    lse: (batch, n_heads, q_len) float32, the natural-log sum of exp(scores) (-inf when kv_len == 0).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bshd(name, t)
    check_keys(q, k, v)
    batch, q_len, _, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k batch {k.shape[0]} must equal q batch {batch}")
    softmax_scale = resolve_softmax_scale(softmax_scale, head_dim)
    window_left, window_right = resolve_window_size(window_size)
    windowed = window_left >= 0 or (window_right >= 0 and not causal)
    q_start = _resolve_q_start(q_start, causal, windowed, q_len, k.shape[1])
    out, lse = _chunked_attention(q, k, v, q_start, bool(causal), softmax_scale, window_left, window_right)
    return (out, lse) if return_lse else out
