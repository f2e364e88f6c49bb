"""Loading checkpoints: a sharded index loads like one file; clear errors for missing, mismatched or corrupt
files."""

import json
import os
from pathlib import Path

import pytest
import torch

from iso_kernels import checkpoint

transformers = pytest.importorskip("transformers")


def test_sharded_index_checkpoint_loads_like_single_file(tmp_path, hf_checkpoints):
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
    with pytest.raises(ValueError, match="KV heads"):
        checkpoint.load_checkpoint(hf_checkpoints["llama"]["folder"], world_size=4)
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
