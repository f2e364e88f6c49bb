"""The tensor-parallel transform: TP=2 shards reassemble to the checkpoint's own tensors."""

import safetensors.torch
import torch

from iso_kernels import checkpoint


def test_tp_shards_reassemble(tiny_checkpoint):
    """The TP=2 pieces of every layer concatenate back to the checkpoint's own tensors: gate/up by rows,
    o/down by columns, and the fused qkv by whole heads, each rank holding its query heads, then its K heads,
    then its V heads."""
    stored = safetensors.torch.load_file(tiny_checkpoint / "model.safetensors")
    halves = [checkpoint.load_checkpoint(tiny_checkpoint, rank=r, world_size=2) for r in range(2)]
    args = halves[0].args
    q_size, kv_size = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    for i in range(args.n_layer):
        parts = [h.layers[i] for h in halves]
        hf = f"model.layers.{i}."
        for ours, theirs, dim in (("feed_forward.w1.weight", "mlp.gate_proj.weight", 0),
                                  ("feed_forward.w3.weight", "mlp.up_proj.weight", 0),
                                  ("feed_forward.w2.weight", "mlp.down_proj.weight", 1),
                                  ("attention.wo.weight", "self_attn.o_proj.weight", 1)):
            torch.testing.assert_close(torch.cat([p.get_parameter(ours) for p in parts], dim=dim),
                                       stored[hf + theirs], rtol=0, atol=0, msg=ours)
        pieces = [p.attention.wqkv.weight.split([q_size // 2, kv_size // 2, kv_size // 2]) for p in parts]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            torch.testing.assert_close(torch.cat([piece[j] for piece in pieces]),
                                       stored[f"{hf}self_attn.{name}.weight"], rtol=0, atol=0, msg=name)
        assert parts[0].attention.n_head == args.n_head // 2
        assert parts[0].attention.n_kv_heads == args.n_kv_heads // 2
