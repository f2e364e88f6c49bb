"""Pure-PyTorch references of every iso-kernels op.

They are the CPU implementation, the test oracle and the benchmark baseline. ``upcast=True`` computes in
fp32 (the oracle); ``upcast=False`` computes in the input dtype (what plain PyTorch would give, used by the
tolerance rule "kernel error <= 2x torch's own error").
"""

import math

import torch


def chunked_attention_ref(q, k, v, *, q_start=None, causal=True, softmax_scale=None, upcast=True):
    """Attention of queries at absolute positions ``[q_start, q_start + q_len)`` over keys ``[0, kv_len)``.

    q: (batch, q_len, n_heads, head_dim); k, v: (batch, kv_len, n_kv_heads, head_dim).
    Returns ``(out, lse)``: out (batch, q_len, n_heads, head_dim) in q's dtype, lse (batch, n_heads, q_len) fp32.
    With ``causal``, query i sees keys ``0 .. q_start + i`` (default q_start = kv_len - q_len: bottom-right).
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
    if causal:
        query_pos = torch.arange(q_len, device=q.device)[:, None] + q_start
        key_pos = torch.arange(kv_len, device=q.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    # Rows that see no key (possible only with q_start < 0 semantics) give zeros, not NaN.
    probs = torch.exp(scores.float() - lse[..., None].nan_to_num(neginf=0.0)).to(compute_dtype)
    out = torch.matmul(probs, vh).transpose(1, 2)
    return out.to(q.dtype), lse


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
