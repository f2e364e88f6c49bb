"""Merge of two partial attention states (output, LSE) of the same queries over disjoint key ranges.

The custom op ``iso_kernels::merge_attention_states`` runs the Triton kernel on CUDA tensors and the
reference (a few elementwise torch ops) on CPU tensors.
"""

import torch

from ..reference import merge_attention_states_ref
from ._checks import check_bshd, check_same_device, check_tensor


# --- custom op: CUDA runs the Triton kernel, CPU the reference ---
@torch.library.custom_op("iso_kernels::merge_attention_states", mutates_args=(), device_types="cuda")
def _merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from triton_ops.merge_attention_states import merge_attention_states as launch

    return launch(out_a, lse_a, out_b, lse_b)


@_merge_attention_states.register_kernel("cpu")
def _(out_a, lse_a, out_b, lse_b):
    out, lse = merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    return out.contiguous(), lse.contiguous()


@_merge_attention_states.register_fake
def _(out_a, lse_a, out_b, lse_b):
    batch, q_len, n_heads, _ = out_a.shape
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), out_a.new_empty(
        (batch, n_heads, q_len), dtype=torch.float32
    )


# --- public function ---
def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key ranges (exact, in fp32).

    out_a, out_b: (batch, q_len, n_heads, head_dim), one dtype (float16, bfloat16, float32), last stride 1;
    lse_a, lse_b: (batch, n_heads, q_len) float32, as returned by ``chunked_attention(..., return_lse=True)``;
    -inf marks a query whose range is empty: its output row gets weight 0 (keep it finite, as the zeros that
    ``chunked_attention`` writes for an empty key range are). All on one device.
    Returns ``(out, lse)``: out (batch, q_len, n_heads, head_dim) in out_a's dtype, lse (batch, n_heads, q_len)
    float32: the attention over the union of both key ranges.
    """
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        check_bshd(name, t)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b shape {tuple(out_b.shape)} must equal out_a shape {tuple(out_a.shape)}")
    if out_b.dtype != out_a.dtype:
        raise ValueError(f"out_b dtype {out_b.dtype} must equal out_a dtype {out_a.dtype}")
    batch, q_len, n_heads, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(name, t, dtypes=(torch.float32,))
        if tuple(t.shape) != (batch, n_heads, q_len):
            raise ValueError(f"{name} shape {tuple(t.shape)} must be (batch, n_heads, q_len) = "
                             f"{(batch, n_heads, q_len)}")
    check_same_device("out_a", out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return _merge_attention_states(out_a, lse_a, out_b, lse_b)
