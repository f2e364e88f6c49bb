"""Hugging Face safetensors checkpoints: each rank reads only its slices; random checkpoints for presets.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Tensor names are those of transformers' Llama/Mistral/Qwen2 models.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import cache, envs, models, tp
from .model import ModelArgs, Transformer

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_config(name):
    """The config.json dict of a preset (``models.PRESETS``), made locally with random weights."""
    return models.config(name, runnable=True)


# Our per-layer parameter -> its tensor under "model.layers.N." in a Hugging Face checkpoint. The fused qkv
# projection is made of HF_QKV's three projections, and an MoE block's stacked experts of one tensor per
# expert and projection (HF_EXPERTS).
HF_ATTENTION_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_QK_NORM_NAMES = {"attention.q_norm.weight": "self_attn.q_norm.weight",
                    "attention.k_norm.weight": "self_attn.k_norm.weight"}
HF_MLP_NAMES = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
HF_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# model_type -> (the MoE block's module, each expert's gate, up and down projection)
HF_EXPERTS = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
              "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def hf_layer_names(args, layer, model_type):
    """Ours -> Hugging Face's name of layer ``layer``'s tensors (besides the fused qkv and the experts)."""
    names = dict(HF_ATTENTION_NAMES, **(HF_QK_NORM_NAMES if args.qk_norm else {}))
    if layer in args.sparse_layers:
        names["feed_forward.gate.weight"] = f"{HF_EXPERTS[model_type][0]}.gate.weight"
    else:
        names.update(HF_MLP_NAMES)
    return names


def hf_expert_names(model_type, expert):
    """Hugging Face's (gate, up, down) weight names of one expert, under "model.layers.N."."""
    block, *projections = HF_EXPERTS[model_type]
    return [f"{block}.experts.{expert}.{name}.weight" for name in projections]


class _Reader:
    """Name -> safetensors slice across one file or an index of shards, with shape checks."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        elif single.exists():
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.folder, self.weight_map, self._files = folder, weight_map, {}
        if weight_map is None:
            self._files["model.safetensors"] = self._open(single)

    def _open(self, path):
        if not path.exists():
            raise FileNotFoundError(f"checkpoint shard {path} is missing")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: unreadable safetensors file ({exc})") from None

    def has(self, name):
        if self.weight_map is not None:
            return name in self.weight_map
        return name in self._files["model.safetensors"].keys()

    def slice(self, name, shape):
        """The lazily-read tensor ``name``, after checking its full shape against the config's."""
        file_name = self.weight_map.get(name) if self.weight_map is not None else "model.safetensors"
        if file_name is None or not self.has(name):
            raise ValueError(f"checkpoint {self.folder} lacks tensor {name!r}")
        if file_name not in self._files:
            self._files[file_name] = self._open(self.folder / file_name)
        handle = self._files[file_name]
        if name not in handle.keys():
            raise ValueError(f"{file_name} lacks tensor {name!r} that the index assigns to it")
        piece = handle.get_slice(name)
        if list(piece.get_shape()) != list(shape):
            raise ValueError(f"checkpoint tensor {name} has shape {piece.get_shape()}, config implies {list(shape)}")
        return piece


def load_checkpoint(folder: str | os.PathLike[str], *, rank: int = 0, world_size: int = 1,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build this rank's shard of the model in ``folder``, reading only the slices it owns."""
    folder = Path(folder)
    config = models.read_config(folder)
    args, model_type = ModelArgs.from_hf_config(config), config.get("model_type", "llama")
    tp.check_divisible(args, world_size)
    reader = _Reader(folder)
    with torch.device("meta"):
        model = Transformer(args)
    q_out, kv_out = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim

    def full(name, *shape):
        return reader.slice(name, shape)[:]

    state = {"tok_embeddings.weight": full("model.embed_tokens.weight", args.vocab_size, args.dim),
             "norm.weight": full("model.norm.weight", args.dim)}
    state["output.weight"] = (state["tok_embeddings.weight"] if args.tie_embeddings
                              else full("lm_head.weight", args.vocab_size, args.dim))
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        full_shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
        for ours, theirs in hf_layer_names(args, i, model_type).items():
            piece = reader.slice(prefix + theirs, full_shapes[ours])
            split = tp.LAYER_SPLITS.get(ours)
            state[f"layers.{i}.{ours}"] = split(piece, rank, world_size) if split else piece[:]
        if i in args.sparse_layers:
            state.update(_expert_slices(reader, prefix, f"layers.{i}.", args, model_type, rank, world_size))
        for param_name in ("weight", "bias") if args.qkv_bias else ("weight",):
            shapes = [(out, args.dim) if param_name == "weight" else (out,) for out in (q_out, kv_out, kv_out)]
            q, k, v = (reader.slice(f"{prefix}{name}.{param_name}", shape)
                       for name, shape in zip(HF_QKV, shapes, strict=True))
            state[f"layers.{i}.attention.wqkv.{param_name}"] = tp.qkv_piece(q, k, v, args, rank, world_size)

    tp.shard_model(model, rank, world_size)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def _expert_slices(reader, prefix, ours, args, model_type, rank, world_size):
    """This rank's share of every expert's gate/up (stacked, gate rows then up rows) and down projection."""
    width, dim = args.moe_intermediate_size, args.dim
    gate_up, down = [], []
    for expert in range(args.n_experts):
        gate, up, down_name = hf_expert_names(model_type, expert)
        gate_up.append(torch.cat([tp.column_piece(reader.slice(prefix + name, (width, dim)), rank, world_size)
                                  for name in (gate, up)]))
        down.append(tp.row_piece(reader.slice(prefix + down_name, (dim, width)), rank, world_size))
    return {ours + "feed_forward.w_gate_up": torch.stack(gate_up), ours + "feed_forward.w_down": torch.stack(down)}


def to_hf_state_dict(model, model_type="llama"):
    """The unsharded model's weights under transformers' names for ``model_type`` (for saving checkpoints)."""
    args = model.args
    q_out, kv_out = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not args.tie_embeddings:
        state["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in hf_layer_names(args, i, model_type).items():
            state[prefix + theirs] = layer.get_parameter(ours)
        if i in args.sparse_layers:
            experts = layer.feed_forward
            for expert in range(args.n_experts):
                gate, up = experts.w_gate_up[expert].chunk(2)
                for name, tensor in zip(hf_expert_names(model_type, expert), (gate, up, experts.w_down[expert]),
                                        strict=True):
                    state[prefix + name] = tensor
        for param_name in ("weight", "bias"):
            fused = getattr(layer.attention.wqkv, param_name)
            if fused is not None:
                for name, piece in zip(HF_QKV, fused.split([q_out, kv_out, kv_out], dim=0), strict=True):
                    state[f"{prefix}{name}.{param_name}"] = piece
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def save_random_checkpoint(config, folder, *, seed=0, std=0.02):
    """Write ``config`` and normal(0, std) weights (norm weights around 1) as a HF checkpoint; returns folder.
    The weights are drawn and stored in the config's ``torch_dtype`` (default float32)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    dtype = STORAGE_DTYPES[config.get("torch_dtype", "float32")]
    # Allocated uninitialised: nn.Linear's default init of llama-1b takes 13 s on the dev machine, and every
    # weight is drawn again below.
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(config))
    model = model.to(dtype).to_empty(device="cpu")
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)
    save_file(to_hf_state_dict(model, config.get("model_type", "llama")), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --- presets: random checkpoints made once in the cache folder ---
def model_folder(model):
    """A checkpoint folder, or a preset's random checkpoint made once in the cache folder."""
    if model in models.PRESETS:
        return preset_checkpoint(model)  # safe when several runs or torchrun's ranks make it at once
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(models.PRESETS))}) "
                         "nor a checkpoint folder")
    return folder


def preset_checkpoint(name) -> Path:
    """The folder of preset ``name``'s random checkpoint, made once in the cache folder."""
    config = preset_config(name)
    folder = envs.cache_dir() / "models" / name
    if (folder / "model.safetensors").exists():
        return folder
    try:
        with cache.locked(folder):
            if not (folder / "model.safetensors").exists():  # else another process made it while we waited
                shutil.rmtree(folder, ignore_errors=True)  # a folder left half-made by an older version
                scratch = Path(tempfile.mkdtemp(prefix=f"{name}.", suffix=".tmp", dir=folder.parent))
                try:
                    save_random_checkpoint(config, scratch)
                    scratch.rename(folder)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
    except OSError as exc:
        raise ValueError(f"cannot make the {name} checkpoint in {folder.parent}: {exc.strerror or exc} "
                         f"(set {envs.CACHE_DIR_VAR} to a writable folder)") from None
    return folder
