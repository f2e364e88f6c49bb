"""Loading checkpoints: a rank's tensor-parallel shard read from the file, a sharded index that loads like one
file, and clear errors for missing, mismatched or corrupt files."""

import json
import os
from pathlib import Path

import pytest
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


def test_sharded_index_checkpoint_loads_like_single_file(tmp_path, hf_checkpoints):
    transformers = pytest.importorskip("transformers")
    made = hf_checkpoints["llama"]
    model = transformers.LlamaForCausalLM.from_pretrained(made["folder"])
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = checkpoint.load_checkpoint(tmp_path, rank=1, world_size=2)
    single = checkpoint.load_checkpoint(made["folder"], rank=1, world_size=2)
    sharded, single = sharded.state_dict(), single.state_dict()
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.equal(sharded[name], tensor), name


def test_checkpoint_errors(tmp_path, hf_checkpoints):
    folder = tmp_path / "broken"
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_checkpoint(folder)
    folder.mkdir()
    config = json.loads((Path(hf_checkpoints["llama"]["folder"]) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint.load_checkpoint(folder)
    with pytest.raises(ValueError, match="attention heads"):
        checkpoint.load_checkpoint(hf_checkpoints["llama"]["folder"], world_size=8)
    # A config that disagrees with the weights: the shape check names the tensor.
    wrong = dict(config, intermediate_size=128)
    (folder / "config.json").write_text(json.dumps(wrong))
    os.symlink(os.path.join(hf_checkpoints["llama"]["folder"], "model.safetensors"), folder / "model.safetensors")
    with pytest.raises(ValueError, match="gate_proj"):
        checkpoint.load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.load_checkpoint(folder)
