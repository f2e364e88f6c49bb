"""``moe_experts``: the routed experts of a mixture-of-experts block (Mixtral, Qwen3-MoE: SwiGLU experts), each
token through its top_k experts, weighted by its router weights and summed. Under tensor parallelism every
expert's gate/up rows and down columns are sharded on the intermediate dimension, so one rank's result is a
partial sum that the block's all-reduce completes, as for a dense MLP. On CUDA tensors the custom op runs
``triton_ops.moe_experts`` (two grouped GEMMs over the tokens sorted by expert); on CPU tensors the reference,
which sorts them the same way."""

import torch

from .. import reference
from ._checks import check_same_device, check_tensor

_ID_DTYPES = (torch.int32, torch.int64)


# --- custom op: CUDA runs the Triton kernels, CPU the reference ---
@torch.library.custom_op("iso_kernels::moe_experts", mutates_args=(), device_types="cuda")
def _moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
    from triton_ops.moe_experts import moe_experts as launch

    return launch(x, topk_ids, topk_weights, w_gate_up, w_down)


@_moe_experts.register_kernel("cpu")
def _(x, topk_ids, topk_weights, w_gate_up, w_down):
    return reference.moe_experts_ref(x, topk_ids, topk_weights, w_gate_up, w_down)


@_moe_experts.register_fake
def _(x, topk_ids, topk_weights, w_gate_up, w_down):
    return x.new_empty(x.shape)


# --- validation ---
def _check_moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down):
    check_tensor("x", x, ndim=2, layout="(tokens, hidden)")
    check_tensor("topk_ids", topk_ids, ndim=2, layout="(tokens, top_k)", dtypes=_ID_DTYPES)
    check_tensor("topk_weights", topk_weights, ndim=2, layout="(tokens, top_k)")
    check_tensor("w_gate_up", w_gate_up, ndim=3, layout="(experts, 2 * inter, hidden)")
    check_tensor("w_down", w_down, ndim=3, layout="(experts, hidden, inter)")
    tokens, hidden = x.shape
    if topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_ids must be (tokens, top_k) with tokens = x.shape[0] = {tokens}, "
                         f"got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{name} dtype {w.dtype} must equal x dtype {x.dtype}")
    experts, two_inter, w_hidden = w_gate_up.shape
    if experts == 0:
        raise ValueError("w_gate_up must hold at least one expert, got shape (0, ...)")
    if two_inter % 2 or w_hidden != hidden:
        raise ValueError(f"w_gate_up must be (experts, 2 * inter, hidden) with hidden = x.shape[1] = {hidden}, "
                         f"gate rows then up rows, got {tuple(w_gate_up.shape)}")
    if w_down.shape != (experts, hidden, two_inter // 2):
        raise ValueError(f"w_down must be (experts, hidden, inter) = {(experts, hidden, two_inter // 2)} from "
                         f"w_gate_up {tuple(w_gate_up.shape)}, got {tuple(w_down.shape)}")
    check_same_device("x", x, topk_ids=topk_ids, topk_weights=topk_weights, w_gate_up=w_gate_up, w_down=w_down)


def _id_checks_possible(topk_ids):
    """Whether the ids may be read: not while tracing (torch.compile, fake tensors) and not while a CUDA graph
    captures (reading them synchronises)."""
    if torch.compiler.is_compiling():
        return False
    return not (topk_ids.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_ids(topk_ids, experts):
    """ValueError naming the first id outside [0, experts); one host read (on CUDA a sync)."""
    outside = (topk_ids < 0) | (topk_ids >= experts)
    if not outside.any():
        return
    token, slot = outside.nonzero()[0].tolist()
    raise ValueError(f"topk_ids[{token}, {slot}] = {topk_ids[token, slot].item()} is outside [0, experts = "
                     f"{experts})")


# --- public function ---
def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, *, check_ids: bool = True) -> torch.Tensor:
    """The routed experts of a MoE block: ``out[t] = sum_s topk_weights[t, s] * expert_e(x[t])`` with
    ``e = topk_ids[t, s]`` and ``expert_e(v) = (silu(v @ gate_e.T) * (v @ up_e.T)) @ down_e.T``.

    x: (tokens, hidden) fp16, bf16 or fp32; topk_ids: (tokens, top_k) int32 or int64, in [0, experts) (distinct
    per token, as top-k gives them, though a repeated id is simply counted twice); topk_weights: (tokens, top_k)
    any float dtype, the router's weights as the model applies them (normalised or not: they are used as
    given); w_gate_up: (experts, 2 * inter, hidden), expert e's gate rows ``w_gate_up[e, :inter]`` then its
    up rows ``w_gate_up[e, inter:]`` (the Linear layout, out x in); w_down: (experts, hidden, inter). The
    weights in x's dtype, everything on one device, any strides. Returns (tokens, hidden) in x's dtype.

    Tensor parallelism: with each rank holding every expert's gate and up rows ``[r * inter, (r + 1) * inter)``
    and the same columns of down, each rank's result is a partial sum; their sum (the block's all-reduce) is
    the unsharded result. The products accumulate in fp32; on CUDA ``silu(gate) * up`` and each slot's
    weighted row are rounded to x's dtype before the next step (as vLLM's fused MoE does), the slots summed in
    fp32. Experts that receive no token cost nothing.

    ``check_ids`` reads topk_ids to raise ValueError on an id outside [0, experts): on CUDA one host sync per
    call. It is skipped while a CUDA graph captures and under torch.compile, where the values cannot be read,
    and with ``check_ids=False``, for a caller whose ids come from a top-k over the experts (a model's router);
    an out-of-range id is then undefined behaviour that reads and writes nothing outside the tensors.
    """
    _check_moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down)
    if check_ids and _id_checks_possible(topk_ids):
        _check_ids(topk_ids, w_gate_up.shape[0])
    return _moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down)
