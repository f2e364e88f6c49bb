"""``add_rms_norm`` (residual add fused with RMSNorm) and ``rms_norm`` (the first layer's norm, which has no
residual yet). On CUDA tensors both custom ops run one Triton kernel, ``triton_ops.add_rms_norm``; on CPU
tensors the reference."""

import math

import torch

from .. import reference
from ._checks import check_same_device, check_tensor

# The kernel keeps a whole row in registers; beyond 32768 columns (128 KB in fp32) it would spill.
MAX_HIDDEN = 32768


# --- custom ops: CUDA runs the Triton kernel, CPU the reference ---
@torch.library.custom_op("iso_kernels::add_rms_norm", mutates_args=(), device_types="cuda")
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from triton_ops.add_rms_norm import add_rms_norm as launch

    return launch(x, residual, weight, eps)


@_add_rms_norm.register_kernel("cpu")
def _(x, residual, weight, eps):
    return reference.add_rms_norm_ref(x, residual, weight, eps)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("iso_kernels::rms_norm", mutates_args=(), device_types="cuda")
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from triton_ops.add_rms_norm import add_rms_norm as launch

    return launch(x, None, weight, eps)[0]


@_rms_norm.register_kernel("cpu")
def _(x, weight, eps):
    return reference.rms_norm_ref(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


# --- validation ---
def _check_norm(eps, **tensors):
    """tensors: x, weight and, from add_rms_norm only, residual (so that a None residual is a TypeError)."""
    for name, t in tensors.items():
        check_tensor(name, t)
    x, weight, residual = tensors.pop("x"), tensors["weight"], tensors.get("residual")
    check_same_device("x", x, **tensors)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., hidden) with hidden >= 1, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"x hidden size {hidden} exceeds {MAX_HIDDEN}, the widest row the kernel holds")
    if x.stride(-1) != 1 and hidden > 1:
        raise ValueError(f"x must have unit stride in its last dimension, got strides {x.stride()}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: got {tuple(residual.shape)} {residual.dtype}, "
                             f"x is {tuple(x.shape)} {x.dtype}")
        if residual.stride(-1) != 1 and hidden > 1:
            raise ValueError(f"residual must have unit stride in its last dimension, got {residual.stride()}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if hidden > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous (the kernel reads it densely), got stride {weight.stride()}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


# --- public functions ---
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual' = x + residual``; ``out = residual' / sqrt(mean(residual'^2, -1) + eps) * weight``.

    x, residual: (..., hidden), same shape and dtype (fp16, bf16, fp32), unit stride in the last dimension;
    weight: (hidden,), any of those dtypes. Returns ``(out, residual')``, both (..., hidden) in x's dtype.
    The sum is rounded to x's dtype before it is normalised (as Hugging Face Llama does), so ``out`` is
    exactly the norm of the returned residual; the norm itself is computed in fp32. Leading dimensions
    whose strides cannot be flattened into one row stride are copied first.
    """
    _check_norm(eps, x=x, residual=residual, weight=weight)
    return _add_rms_norm(x, residual, weight, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` in fp32, returned in x's dtype.

    x: (..., hidden) fp16, bf16 or fp32 with unit stride in the last dimension; weight: (hidden,).
    """
    _check_norm(eps, x=x, weight=weight)
    return _rms_norm(x, weight, float(eps))
