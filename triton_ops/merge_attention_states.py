"""Merge two partial attentions of the same queries over disjoint key ranges into attention over their union.

With ``m = max(lse_a, lse_b)``: ``lse = m + log(e^(lse_a-m) + e^(lse_b-m))`` and
``out = (out_a * e^(lse_a-m) + out_b * e^(lse_b-m)) / (e^(lse_a-m) + e^(lse_b-m))``. An empty key range has
LSE -inf and weight 0; two empty ranges give output 0 and LSE -inf.
"""

import torch
import triton
import triton.language as tl

# --- constants ---
# Memory-bound: ~4K elements per program keeps 16-byte loads in flight without spilling; no autotuning needed.
TILE_ELEMENTS = 4096
NUM_WARPS = 4


@triton.jit
def _merge_attention_states_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr,
    stride_ab, stride_am, stride_ah,
    stride_bb, stride_bm, stride_bh,
    stride_ob, stride_om, stride_oh,
    stride_lab, stride_lah, stride_lam,
    stride_lbb, stride_lbh, stride_lbm,
    stride_lb, stride_lh,
    n_heads, q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # --- program -> (query block, batch, head) ---
    start_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // n_heads, bh % n_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < q_len
    tile_mask = row_mask[:, None] & (offs_d < head_dim)[None, :]

    # --- weights ---
    lse_a = tl.load(lse_a_ptr + batch * stride_lab + head * stride_lah + offs_m * stride_lam, mask=row_mask,
                    other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + batch * stride_lbb + head * stride_lbh + offs_m * stride_lbm, mask=row_mask,
                    other=float("-inf"))
    lse_max = tl.maximum(lse_a, lse_b)
    # Both ranges empty: shift by 0 instead of -inf so the weights come out 0, not NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_a = tl.exp(lse_a - lse_max)
    w_b = tl.exp(lse_b - lse_max)
    w_sum = w_a + w_b
    w_safe = tl.where(w_sum == 0.0, 1.0, w_sum)

    # --- combine ---
    a = tl.load(out_a_ptr + batch * stride_ab + head * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :],
                mask=tile_mask, other=0.0).to(tl.float32)
    b = tl.load(out_b_ptr + batch * stride_bb + head * stride_bh + offs_m[:, None] * stride_bm + offs_d[None, :],
                mask=tile_mask, other=0.0).to(tl.float32)
    out = (a * (w_a / w_safe)[:, None] + b * (w_b / w_safe)[:, None])
    lse = tl.where(w_sum == 0.0, float("-inf"), lse_max + tl.log(w_safe))
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + batch * stride_lb + head * stride_lh + offs_m, lse, mask=row_mask)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Launch the merge. Inputs are validated by ``iso_kernels.ops.merge_attention_states``.

    out_a, out_b: (batch, q_len, n_heads, head_dim), last stride 1; lse_a, lse_b: (batch, n_heads, q_len) fp32,
    any strides. Returns ``(out, lse)``: out contiguous in out_a's dtype, lse (batch, n_heads, q_len) fp32.
    """
    batch, q_len, n_heads, head_dim = out_a.shape
    if out_a.stride(-1) != 1 or out_b.stride(-1) != 1:
        raise ValueError("out_a and out_b must have stride 1 in their last (head_dim) dimension")
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=out_a.device)
    if out.numel() == 0:
        return out, lse
    block_d = triton.next_power_of_2(head_dim)
    block_m = max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(q_len)))
    grid = (triton.cdiv(q_len, block_m), batch * n_heads)
    _merge_attention_states_kernel[grid](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1), out_a.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_a.stride(0), lse_a.stride(1), lse_a.stride(2),
        lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
        lse.stride(0), lse.stride(1),
        n_heads, q_len, head_dim,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return out, lse
