"""Varlen chunked attention: the prompt chunks of many sequences packed in one query stream, each over its own
KV cache, contiguous or paged (the conventions of flash-attn's ``flash_attn_varlen_func`` and
``flash_attn_with_kvcache``).

Each sequence's queries are its newest tokens: with ``seqused_k[i]`` keys cached (this chunk's included) and
``len_q_i`` queries, query j sees keys ``0 .. seqused_k[i] - len_q_i + j``, which is ``chunked_attention`` with
the bottom-right default ``q_start`` per sequence; ``window_size`` likewise.

The custom op ``iso_kernels::chunked_attention_varlen`` runs the Triton kernel on CUDA tensors and, on CPU
tensors, ``chunked_attention``'s CPU kernel (torch's fused CPU attention) sequence by sequence;
``iso_kernels.reference.chunked_attention_varlen_ref`` is the test oracle.
"""

from typing import Literal, overload

import torch

from ..reference import varlen_attention_per_sequence
from ._checks import check_same_device, check_tensor
from .chunked_attention import check_keys, chunked_attention_cpu, resolve_softmax_scale, resolve_window_size

# Tokens per KV block with a block table: powers of two (same list as
# triton_ops.chunked_attention_varlen.SUPPORTED_PAGE_SIZES, repeated so that CPU use never imports Triton).
_BLOCK_SIZES = (16, 32, 64, 128, 256)


# --- custom op: CUDA runs the Triton kernel, CPU torch's fused attention per sequence ---
@torch.library.custom_op("iso_kernels::chunked_attention_varlen", mutates_args=(), device_types="cuda")
def _chunked_attention_varlen(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor, block_table: torch.Tensor | None, causal: bool, softmax_scale: float,
    window_left: int = -1, window_right: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    from triton_ops.chunked_attention_varlen import chunked_attention_varlen_fwd

    return chunked_attention_varlen_fwd(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, causal,
                                        softmax_scale, window_left, window_right)


@_chunked_attention_varlen.register_kernel("cpu")
def _(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, causal, softmax_scale, window_left=-1,
      window_right=-1):
    def attend(q_i, k_i, v_i):  # bottom-right: the sequence's queries are its last keys' positions
        q_start = k_i.shape[1] - q_i.shape[1]
        return chunked_attention_cpu(q_i, k_i, v_i, q_start, causal, softmax_scale, window_left, window_right)

    return varlen_attention_per_sequence(attend, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table)


@_chunked_attention_varlen.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, causal, softmax_scale, window_left=-1,
      window_right=-1):
    total_q, n_heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (n_heads, total_q), dtype=torch.float32
    )


# --- validation ---
def _check_shapes(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table):
    """Everything the shapes, dtypes and devices say; returns the keys each sequence can hold (capacity)."""
    check_tensor("q", q, ndim=3, layout="(total_q, n_heads, head_dim)")
    if q.shape[-1] > 1 and q.stride(-1) != 1:
        raise ValueError(f"q must have stride 1 in its last (head_dim) dimension, got {q.stride(-1)}")
    cache_layout = "(batch, max_kv" if block_table is None else "(num_blocks, block_size"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4, layout=f"{cache_layout}, n_kv_heads, head_dim)")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 in its last (head_dim) dimension, got {t.stride(-1)}")
    check_keys(q, k_cache, v_cache, "k_cache", "v_cache")
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, layout="(batch + 1,)", dtypes=(torch.int32,))
    if cu_seqlens_q.shape[0] == 0:
        raise ValueError("cu_seqlens_q must have batch + 1 >= 1 entries, got none")
    batch = cu_seqlens_q.shape[0] - 1
    check_tensor("seqused_k", seqused_k, ndim=1, layout="(batch,)", dtypes=(torch.int32,))
    if seqused_k.shape[0] != batch:
        raise ValueError(f"seqused_k must have shape (batch,) = ({batch},) from cu_seqlens_q, "
                         f"got {tuple(seqused_k.shape)}")
    check_same_device("q", q, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k)
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache batch {k_cache.shape[0]} must equal len(cu_seqlens_q) - 1 = {batch} "
                             f"(without block_table the caches are (batch, max_kv, n_kv_heads, head_dim))")
        return k_cache.shape[1]
    check_tensor("block_table", block_table, ndim=2, layout="(batch, max_blocks_per_seq)", dtypes=(torch.int32,))
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table batch {block_table.shape[0]} must equal len(cu_seqlens_q) - 1 = {batch}")
    check_same_device("q", q, block_table=block_table)
    block_size = k_cache.shape[1]
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"k_cache block_size (dim 1 with a block_table) must be a power of two in [16, 256], "
                         f"got {block_size}")
    return block_table.shape[1] * block_size


def _index_checks_possible(q):
    """Whether the values of the index tensors may be read: not while tracing (torch.compile, fake tensors) and
    not while a CUDA graph captures (reading them synchronises)."""
    if torch.compiler.is_compiling():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_index_values(total_q, capacity, num_blocks, cu_seqlens_q, seqused_k, block_table):
    """The checks that need the index tensors' values, all reduced on their device to one flag tensor that is
    read once (on CUDA: one host sync per call); the offending entry is located only after a check fails."""
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    failed = [cu_seqlens_q[0] != 0, (q_lens < 0).any(), cu_seqlens_q[-1] != total_q, (seqused_k < 0).any(),
              (seqused_k > capacity).any(), (q_lens > seqused_k).any()]
    if block_table is not None:
        block_size = capacity // block_table.shape[1]
        used = torch.arange(block_table.shape[1], device=block_table.device) < (seqused_k[:, None] + block_size - 1
                                                                               ) // block_size
        out_of_range = used & ((block_table < 0) | (block_table >= num_blocks))
        failed.append(out_of_range.any())
    failed = torch.stack(failed).tolist()
    if not any(failed):
        return
    cu, kv_lens = cu_seqlens_q.tolist(), seqused_k.tolist()
    first = next(i for i, bad in enumerate(failed) if bad)
    if first == 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got cu_seqlens_q[0] = {cu[0]}")
    if first == 1:
        i = next(i for i in range(len(cu) - 1) if cu[i + 1] < cu[i])
        raise ValueError(f"cu_seqlens_q must be non-decreasing, got cu_seqlens_q[{i + 1}] = {cu[i + 1]} < "
                         f"cu_seqlens_q[{i}] = {cu[i]}")
    if first == 2:
        raise ValueError(f"cu_seqlens_q[-1] = {cu[-1]} must equal q's total_q = {total_q}")
    if first == 3:
        i = next(i for i, n in enumerate(kv_lens) if n < 0)
        raise ValueError(f"seqused_k must be >= 0, got seqused_k[{i}] = {kv_lens[i]}")
    if first == 4:
        i = next(i for i, n in enumerate(kv_lens) if n > capacity)
        what = "max_kv" if block_table is None else "max_blocks_per_seq * block_size"
        raise ValueError(f"seqused_k[{i}] = {kv_lens[i]} exceeds the cache's capacity {capacity} ({what})")
    if first == 5:
        i = next(i for i, n in enumerate(kv_lens) if cu[i + 1] - cu[i] > n)
        raise ValueError(f"sequence {i} has {cu[i + 1] - cu[i]} queries but seqused_k[{i}] = {kv_lens[i]} keys: "
                         f"its queries are its last tokens, so len_q <= seqused_k is required")
    seq, block = out_of_range.nonzero()[0].tolist()
    raise ValueError(f"block_table[{seq}, {block}] = {block_table[seq, block].item()} is outside [0, num_blocks = "
                     f"{num_blocks}) within sequence {seq}'s {kv_lens[seq]} keys")


# --- public functions ---
@overload
def chunked_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                             cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor,
                             block_table: torch.Tensor | None = None, causal: bool = True,
                             softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                             return_lse: Literal[False] = False,
                             check_index_values: bool = True) -> torch.Tensor: ...


@overload
def chunked_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                             cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor,
                             block_table: torch.Tensor | None = None, causal: bool = True,
                             softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                             return_lse: Literal[True],
                             check_index_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def chunked_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                             cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor,
                             block_table: torch.Tensor | None = None, causal: bool = True,
                             softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                             return_lse: bool,
                             check_index_values: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def chunked_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                             cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor,
                             block_table: torch.Tensor | None = None, causal: bool = True,
                             softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                             return_lse: bool = False,
                             check_index_values: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries of ``batch`` sequences packed in one stream, each over its own cached keys.

    q: (total_q, n_heads, head_dim), sequence i at rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``;
    cu_seqlens_q: (batch + 1,) int32, starting at 0, non-decreasing, ending at total_q;
    seqused_k: (batch,) int32, the keys of sequence i (this chunk's own included), ``len_q_i <= seqused_k[i]``.
    Without ``block_table``, k_cache, v_cache: (batch, max_kv, n_kv_heads, head_dim), sequence i's keys the first
    ``seqused_k[i]`` of row i (``seqused_k[i] <= max_kv``). With block_table: (batch, max_blocks_per_seq) int32,
    k_cache, v_cache are a pool of pages (num_blocks, block_size, n_kv_heads, head_dim), block_size a power of two
    in [16, 256], and sequence i's key n is slot ``n % block_size`` of page ``block_table[i, n // block_size]``
    (``seqused_k[i] <= max_blocks_per_seq * block_size``; entries past the used pages are never read).
    n_heads a multiple of n_kv_heads (MHA, GQA, MQA); q, k_cache, v_cache of one dtype (float16, bfloat16,
    float32) and one device with the index tensors; head_dim in 16, 32, 64, 128, 256; any strides whose last one
    is 1. Sequences with no queries, or no queries and no keys, are allowed.

    With ``causal`` each sequence's queries are its last len_q keys' positions (bottom-right, like
    FlashAttention >= 2.1): query j of sequence i sees keys ``0 .. seqused_k[i] - len_q_i + j``. For len_q = 3,
    seqused_k = 5 (1 = seen)::

        1 1 1 0 0
        1 1 1 1 0
        1 1 1 1 1

    With ``causal=False`` every query of sequence i sees its seqused_k[i] keys.

    ``window_size=(left, right)``: sliding-window attention in flash-attn's convention, each an int >= 0 or -1
    for unbounded (the default ``(-1, -1)`` is no window). Query j of sequence i, at position
    ``p = seqused_k[i] - len_q_i + j`` (bottom-right, also without ``causal``), sees the keys n with
    ``p - left <= n <= p + right``, and ``n <= p`` with ``causal``. For len_q = 3, seqused_k = 5, window (1, 0)::

        0 1 1 0 0
        0 0 1 1 0
        0 0 0 1 1

    softmax_scale defaults to ``1 / sqrt(head_dim)``.
    Returns out: (total_q, n_heads, head_dim) in q's dtype; with ``return_lse`` also lse: (n_heads, total_q)
    float32, the natural-log sum of exp(scores) of each query.

    The checks of the index tensors' values (the cu_seqlens_q order and ends, seqused_k against len_q and the
    capacity, the used block-table entries against num_blocks) raise ValueError like the others. On CUDA they
    cost one host sync per call; they are skipped while a CUDA graph captures and under torch.compile, where
    the values cannot be read, and with ``check_index_values=False``, for a caller that checked them once on
    the host (the model's packed batches); out-of-range indices are then undefined behaviour, as in flash-attn.
    """
    capacity = _check_shapes(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table)
    softmax_scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    window_left, window_right = resolve_window_size(window_size)
    if check_index_values and _index_checks_possible(q):
        _check_index_values(q.shape[0], capacity, k_cache.shape[0], cu_seqlens_q, seqused_k, block_table)
    out, lse = _chunked_attention_varlen(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, bool(causal),
                                         softmax_scale, window_left, window_right)
    return (out, lse) if return_lse else out
