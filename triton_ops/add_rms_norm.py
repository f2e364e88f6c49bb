"""Residual add + RMSNorm in one pass over each row: ``residual' = x + residual``,
``out = residual' / sqrt(mean(residual'^2) + eps) * weight``; without a residual, plain RMSNorm.

One program normalises one row held in registers, so each element is read once and written once (twice
with the residual). Inputs are validated by ``iso_kernels.ops.add_rms_norm``.
"""

import torch
import triton
import triton.language as tl

# --- constants ---
# 256 elements per warp is 8 per thread: one 16-byte access for bf16/fp16. Past 16 warps (4096 columns)
# threads take more elements each rather than more warps.
_COLUMNS_PER_WARP = 256
_MAX_WARPS = 16


# --- kernels ---
@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    n_cols, eps,
    stride_xm, stride_rm, stride_om, stride_nm,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    # --- residual add, rounded to the input dtype as the stored residual is ---
    h = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nm + cols, h, mask=mask)
        h = h.to(tl.float32)

    # --- RMSNorm in fp32; masked columns are zero and do not bias the sum ---
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


# --- launcher ---
def add_rms_norm(x, residual, weight, eps):
    """x, residual: (..., hidden) with unit stride in the last dimension; weight: (hidden,).

    Returns ``(out, new_residual)``, both contiguous with x's shape and dtype; with ``residual=None`` it is
    plain RMSNorm and ``new_residual`` is None. Leading dimensions are flattened with ``reshape``: a view
    when their strides allow it, otherwise a copy of the input (the only extra cost).
    """
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = None if residual is None else torch.empty_like(out)
    if rows.shape[0] == 0:
        return out, new_residual
    residual_rows = None if residual is None else residual.reshape(-1, hidden)
    block_n = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, out, new_residual,
        hidden, eps,
        rows.stride(0), 0 if residual is None else residual_rows.stride(0), hidden, hidden,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n,
        num_warps=max(1, min(_MAX_WARPS, block_n // _COLUMNS_PER_WARP)),
    )
    return out, new_residual
