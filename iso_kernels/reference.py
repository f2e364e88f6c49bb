"""Pure-PyTorch references of every iso-kernels op.

They are the CPU implementation, the test oracle and the benchmark baseline. ``upcast=True`` computes in
fp32 (the oracle); ``upcast=False`` computes in the input dtype (what plain PyTorch would give, used by the
tolerance rule "kernel error <= 2x torch's own error").
"""

import math

import torch


def chunked_attention_ref(q, k, v, *, q_start=None, causal=True, softmax_scale=None, window_size=(-1, -1),
                          upcast=True):
    """Attention of queries at absolute positions ``[q_start, q_start + q_len)`` over keys ``[0, kv_len)``.

    q: (batch, q_len, n_heads, head_dim); k, v: (batch, kv_len, n_kv_heads, head_dim).
    Returns ``(out, lse)``: out (batch, q_len, n_heads, head_dim) in q's dtype, lse (batch, n_heads, q_len) fp32.
    With ``causal``, query i sees keys ``0 .. q_start + i`` (default q_start = kv_len - q_len: bottom-right).
    ``window_size=(left, right)`` (-1: unbounded) keeps, of those, the keys ``q_start + i - left ..
    q_start + i + right``; rows that see no key give output 0 and LSE -inf.
    """
    q_len, kv_len, n_heads, head_dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    if q_start is None:
        q_start = kv_len - q_len
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    compute_dtype = torch.float32 if upcast else q.dtype
    group = n_heads // k.shape[2]
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    left, right = window_size
    query_pos = torch.arange(q_len, device=q.device)[:, None] + q_start
    key_pos = torch.arange(kv_len, device=q.device)[None, :]
    hidden = torch.zeros(q_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= key_pos > query_pos
    if left >= 0:
        hidden |= key_pos < query_pos - left
    if right >= 0:
        hidden |= key_pos > query_pos + right
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    # Rows that see no key (possible only with q_start < 0 semantics) give zeros, not NaN.
    probs = torch.exp(scores.float() - lse[..., None].nan_to_num(neginf=0.0)).to(compute_dtype)
    out = torch.matmul(probs, vh).transpose(1, 2)
    return out.to(q.dtype), lse



def varlen_attention_per_sequence(attend, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table=None):
    """Run ``attend(q_i, k_i, v_i) -> (out_i, lse_i)`` on each sequence of a varlen batch; pack the results.

    q: (total_q, n_heads, head_dim) with sequence i at rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``; its keys
    are the first ``seqused_k[i]`` of row i of k_cache, v_cache (batch, max_kv, n_kv_heads, head_dim), or with
    ``block_table`` (batch, max_blocks_per_seq) of the pages ``block_table[i, :]`` of k_cache, v_cache
    (num_blocks, block_size, n_kv_heads, head_dim), in that order. ``attend`` gets them with a batch of one
    (q_i: (1, len_q_i, n_heads, head_dim), k_i, v_i: (1, seqused_k[i], n_kv_heads, head_dim)) and returns out_i
    like q_i and lse_i (1, n_heads, len_q_i). Returns out (total_q, n_heads, head_dim), lse (n_heads, total_q).
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    bounds, kv_lens = cu_seqlens_q.tolist(), seqused_k.tolist()
    for seq, kv_len in enumerate(kv_lens):
        if block_table is None:
            k, v = k_cache[seq, :kv_len], v_cache[seq, :kv_len]
        else:
            pages = block_table[seq, :-(-kv_len // k_cache.shape[1])].long()
            k, v = (cache[pages].flatten(0, 1)[:kv_len] for cache in (k_cache, v_cache))
        begin, end = bounds[seq], bounds[seq + 1]
        out_i, lse_i = attend(q[None, begin:end], k[None], v[None])
        out[begin:end], lse[:, begin:end] = out_i[0], lse_i[0]
    return out, lse


def chunked_attention_varlen_ref(q, k_cache, v_cache, *, cu_seqlens_q, seqused_k, block_table=None, causal=True,
                                 softmax_scale=None, window_size=(-1, -1), upcast=True):
    """``chunked_attention_ref`` of each sequence of a varlen batch over its keys (see
    ``varlen_attention_per_sequence`` for the layouts), bottom-right causal: query j of sequence i sees keys
    ``0 .. seqused_k[i] - len_q_i + j``, within ``window_size`` of that position. Returns ``(out, lse)``: out
    (total_q, n_heads, head_dim) in q's dtype, lse (n_heads, total_q) fp32."""

    def attend(q_i, k_i, v_i):
        return chunked_attention_ref(q_i, k_i, v_i, causal=causal, softmax_scale=softmax_scale,
                                     window_size=window_size, upcast=upcast)

    return varlen_attention_per_sequence(attend, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table)

def merge_attention_states_ref(out_a, lse_a, out_b, lse_b):
    """Combine two attentions of the same queries over disjoint key ranges.

    out_*: (batch, q_len, n_heads, head_dim); lse_*: (batch, n_heads, q_len) fp32 (-inf for an empty range).
    Returns ``(out, lse)`` equal to attention over the union of the two key ranges.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - safe).transpose(1, 2)[..., None]
    weight_b = torch.exp(lse_b - safe).transpose(1, 2)[..., None]
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out.to(out_a.dtype), lse


def gemm_ref(x, weight, *, upcast=True):
    """``x @ weight.T`` (the F.linear layout). x: (M, K), weight: (N, K) -> (M, N) in x's dtype."""
    if upcast:
        return torch.matmul(x.float(), weight.float().T).to(x.dtype)
    return torch.matmul(x, weight.T)


def gemm_signal_counts_ref(m, n, rows_per_signal):
    """The value each row group's counter holds once its rows are stored: rows_in_group * N (int32)."""
    starts = torch.arange(0, m, rows_per_signal)
    rows = torch.clamp(m - starts, max=rows_per_signal)
    return (rows * n).to(torch.int32)


def add_rms_norm_ref(x, residual, weight, eps, *, upcast=True):
    """``residual' = x + residual``; ``out = rms_norm(residual') * weight``. Returns ``(out, residual')``.

    x, residual: (..., hidden); weight: (hidden,). The sum is rounded to the input dtype before it is
    normalised, as Hugging Face Llama does, so the returned residual and the normed output agree.
    """
    compute_dtype = torch.float32 if upcast else x.dtype
    new_residual = (x.to(compute_dtype) + residual.to(compute_dtype)).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps, upcast=upcast), new_residual


def rms_norm_ref(x, weight, eps, *, upcast=True):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, in x's dtype."""
    compute_dtype = torch.float32 if upcast else x.dtype
    xc = x.to(compute_dtype)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(compute_dtype)).to(x.dtype)


def moe_experts_ref(x, topk_ids, topk_weights, w_gate_up, w_down, *, upcast=True):
    """The routed experts of a mixture-of-experts block (SwiGLU experts), on tokens sorted by expert.

    x: (tokens, hidden); topk_ids: (tokens, top_k) int, each token's experts in [0, experts);
    topk_weights: (tokens, top_k), the router's weights as the model applies them; w_gate_up:
    (experts, 2 * inter, hidden), each expert's gate rows then its up rows (the Linear layout, out x in);
    w_down: (experts, hidden, inter). Returns (tokens, hidden) in x's dtype:
    ``out[t] = sum_s topk_weights[t, s] * (silu(x[t] @ gate_e.T) * (x[t] @ up_e.T)) @ down_e.T``,
    ``e = topk_ids[t, s]``. Under tensor parallelism (every expert's gate/up rows and down columns sharded on
    inter) this is one rank's partial sum, which the block's all-reduce completes.
    """
    compute_dtype = torch.float32 if upcast else x.dtype
    tokens, top_k = topk_ids.shape
    inter = w_gate_up.shape[1] // 2
    # --- the (token, slot) pairs sorted by expert: one contiguous segment per expert ---
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    rows = x[order // top_k].to(compute_dtype)
    # --- each expert's segment through its gate/up, SwiGLU and down ---
    out_rows = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        segment = slice(start, start + count)
        gate_up = torch.matmul(rows[segment], w_gate_up[expert].to(compute_dtype).T)
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out_rows[segment] = torch.matmul(h, w_down[expert].to(compute_dtype).T)
        start += count
    # --- router weights, back to (token, slot) order, sum over the slots ---
    out_rows *= topk_weights.reshape(-1)[order, None].to(compute_dtype)
    unsorted = torch.empty_like(out_rows)
    unsorted[order] = out_rows
    return unsorted.view(tokens, top_k, x.shape[1]).sum(dim=1).to(x.dtype)
