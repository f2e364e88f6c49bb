"""Megatron-style tensor parallelism as a transform of the plain model.

Column-parallel: the fused qkv projection (whole heads per rank) and gate/up; row-parallel: o_proj and
down_proj, whose partial outputs the schedules all-reduce. Embedding, norms and the LM head stay replicated.
The same slicing serves in-memory weights (``shard_model``) and safetensors slices read from disk
(``iso_kernels.checkpoint``), so a rank never materialises more than its share of the sharded layers.
At world size 1 the transform changes nothing.
"""

import torch

from .planning import shapes


def check_divisible(args, world_size):
    """Clear errors when a model (``ModelArgs``) cannot be split over ``world_size`` ranks."""
    shapes.check_divisible(shapes.model_shape(args), world_size)


def shard_range(size, rank, world_size):
    per_rank = size // world_size
    return rank * per_rank, (rank + 1) * per_rank


def qkv_piece(q, k, v, args, rank, world_size):
    """This rank's rows of the fused qkv weight (or bias): its query heads, then its KV heads.

    q, k, v: full-size tensors or safetensors slices (anything that supports ``[a:b]``).
    """
    qa, qb = shard_range(args.n_head * args.head_dim, rank, world_size)
    ka, kb = kv_range(args, rank, world_size)
    return torch.cat([q[qa:qb], k[ka:kb], v[ka:kb]], dim=0)


def kv_range(args, rank, world_size):
    """This rank's rows of the K (or V) projection: its share of the KV heads or, where the ranks outnumber
    them, the one head its query heads read (query head j reads KV head j // (n_head / n_kv_heads))."""
    if world_size <= args.n_kv_heads:
        return shard_range(args.n_kv_heads * args.head_dim, rank, world_size)
    head = rank * args.n_kv_heads // world_size
    return head * args.head_dim, (head + 1) * args.head_dim


def column_piece(weight, rank, world_size):
    """Rows of an (out, in) weight: the rank's share of the outputs (gate/up)."""
    a, b = shard_range(weight.shape[0] if hasattr(weight, "shape") else weight.get_shape()[0], rank, world_size)
    return weight[a:b]


def row_piece(weight, rank, world_size):
    """Columns of an (out, in) weight: the rank's share of the inputs (o_proj, down_proj)."""
    a, b = shard_range(weight.shape[1] if hasattr(weight, "shape") else weight.get_shape()[1], rank, world_size)
    return weight[:, a:b]


def experts_gate_up_piece(gate_up, rank, world_size):
    """(experts, 2 x width, hidden) gate rows then up rows of every expert -> this rank's share of each."""
    width = gate_up.shape[1] // 2
    a, b = shard_range(width, rank, world_size)
    return torch.cat([gate_up[:, a:b], gate_up[:, width + a:width + b]], dim=1)


def experts_down_piece(down, rank, world_size):
    """(experts, hidden, width) -> this rank's share of every expert's inputs."""
    a, b = shard_range(down.shape[2], rank, world_size)
    return down[:, :, a:b]


# How each sharded per-layer weight is split (besides the fused qkv, split by whole heads with qkv_piece); the
# norms and an MoE block's router are replicated. shard_model and checkpoint.load_checkpoint follow this plan.
LAYER_SPLITS = {
    "attention.wo.weight": row_piece,
    "feed_forward.w1.weight": column_piece,
    "feed_forward.w3.weight": column_piece,
    "feed_forward.w2.weight": row_piece,
    "feed_forward.w_gate_up": experts_gate_up_piece,
    "feed_forward.w_down": experts_down_piece,
}


def shard_model(model, rank, world_size):
    """Keep only rank ``rank``'s share of every sharded layer, in place; returns the model."""
    args = model.args
    check_divisible(args, world_size)
    if world_size == 1:
        return model
    q_size, kv_size = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    for layer in model.layers:
        attention = layer.attention
        for param_name in ("weight", "bias"):
            fused = getattr(attention.wqkv, param_name)
            if fused is not None:
                q, k, v = fused.detach().split([q_size, kv_size, kv_size], dim=0)
                _replace(attention.wqkv, param_name, qkv_piece(q, k, v, args, rank, world_size))
        for name, param in list(layer.named_parameters()):
            if name in LAYER_SPLITS:
                module_name, param_name = name.rsplit(".", 1)
                _replace(layer.get_submodule(module_name), param_name, LAYER_SPLITS[name](param.detach(), rank,
                                                                                           world_size))
        attention.n_head //= world_size
        attention.n_kv_heads = shapes.kv_heads_per_rank(attention.n_kv_heads, world_size)
    return model


def _replace(module, name, piece):
    """Own a contiguous copy, so the full tensor can be freed and GEMMs see a dense weight."""
    setattr(module, name, torch.nn.Parameter(piece.contiguous().clone(), requires_grad=False))
