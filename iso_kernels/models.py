"""Every named model, as a Hugging Face ``config.json`` dict: the presets that run here with random weights
(``PRESETS``), and the shapes of published checkpoints that the planner and its tables describe
(``PUBLISHED``). No torch: the planner reads this registry.

    models.config("llama2-70b")            # -> the config dict, with the Llama defaults filled in
    planning.model_shape(models.config(n)) # -> the cost model's ModelShape
"""

import json
from pathlib import Path
from typing import Any

# Small Llama-style models that are made locally with random weights (no downloads): ``--model NAME``.
PRESETS = {
    # The CLI's default: big enough that compute dominates Python overhead on a 2-core CPU, small enough that
    # a 2-rank prefill of 512 tokens takes a fraction of a second.
    "llama-small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096),
    # GPU benchmarks (bench/bench_iso_prefill.py): a 1B-class Llama (0.89 B parameters), chosen so that on one
    # H100 a bf16 block of a few thousand tokens takes far longer than launching its kernels, as llama-small's
    # do not. Its random checkpoint is stored in bf16, the dtype GPU runs use: 1.8 GB, made in 10 s on the
    # 2-core dev machine (fp32 after nn.Linear's default init: 3.6 GB, 27 s in the same run).
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192,
                     torch_dtype="bfloat16"),
    # Tests: seconds for a whole TP=4 run.
    "llama-tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
    # The 2026 families at llama-tiny's size, TP 1, 2 or 4. Qwen3: q/k norms and a head_dim that is not
    # hidden / heads; Qwen3-MoE: 8 experts, 2 per token, its second layer dense (mlp_only_layers); Mixtral: 4
    # experts, 2 per token.
    "qwen3-tiny": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512,
                       max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                           num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                           mlp_only_layers=[1], vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6),
    "mixtral-tiny": dict(model_type="mixtral", hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                         vocab_size=512, max_position_embeddings=512),
}

# Published checkpoints, planned and simulated only (too large to make here). The keys the cost model reads,
# copied from each model's config.json on the Hugging Face hub (the repository named beside it).
PUBLISHED = {
    # meta-llama/Llama-2-7b-hf, -13b-hf (MHA); codellama/CodeLlama-34b-hf; meta-llama/Llama-2-70b-hf.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "codellama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=32000, max_position_embeddings=16384),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    # The ~30B class of the ISO paper: huggyllama/llama-30b (LLaMA-1-33B, MHA).
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048),
    # meta-llama/Meta-Llama-3-8B and -70B (Llama-3.3-70B-Instruct has the 70B's shape).
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    # Qwen/Qwen2.5-72B-Instruct.
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                        max_position_embeddings=32768, rms_norm_eps=1e-6),
    # Qwen/Qwen3-32B; Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (128 experts, 8 per token, every layer
    # sparse); mistralai/Mixtral-8x22B-v0.1 (8 experts, 2 per token).
    "qwen3-32b": dict(model_type="qwen3", hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                      max_position_embeddings=40960, rms_norm_eps=1e-6),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288,
                            moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                            max_position_embeddings=40960, rms_norm_eps=1e-6),
    "mixtral-8x22b": dict(model_type="mixtral", hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                          num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          vocab_size=32768, max_position_embeddings=65536,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

# What every registered model leaves at the Llama defaults.
LLAMA_DEFAULTS = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def config(name: str, *, runnable: bool = False) -> dict[str, Any]:
    """The config.json dict of model ``name`` (a preset, or with ``runnable=False`` a published shape)."""
    known = PRESETS if runnable else {**PUBLISHED, **PRESETS}
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(known))}")
    return {**LLAMA_DEFAULTS, **known[name]}


def read_config(folder):
    """The parsed ``config.json`` of a checkpoint folder (a Hugging Face model, or one of ours)."""
    config_path = Path(folder) / "config.json"
    try:
        return json.loads(config_path.read_text())
    except OSError:
        raise FileNotFoundError(f"{config_path} is missing or unreadable") from None
    except ValueError as exc:
        raise ValueError(f"{config_path}: invalid JSON ({exc})") from None


def expert_config(config: dict[str, Any]) -> dict[str, Any]:
    """The experts of a Mixtral or Qwen3-MoE config.json ({} for a dense model): n_experts, experts_per_token,
    moe_intermediate, norm_topk_prob and sparse_layers (the indices of the layers that route). Mixtral's every
    layer routes; Qwen3-MoE's every decoder_sparse_step-th layer but those in mlp_only_layers."""
    model_type = config.get("model_type")
    if model_type not in ("mixtral", "qwen3_moe"):
        return {}
    layers = range(config["num_hidden_layers"])
    if model_type == "mixtral":
        sparse, width, norm, top_k = tuple(layers), config["intermediate_size"], True, 2
    else:
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        sparse = tuple(i for i in layers if i not in dense and step > 0 and (i + 1) % step == 0)
        width, norm, top_k = config["moe_intermediate_size"], config.get("norm_topk_prob", False), 8
    return dict(n_experts=config.get("num_experts") or config.get("num_local_experts") or 0,
                experts_per_token=config.get("num_experts_per_tok", top_k), moe_intermediate=width,
                norm_topk_prob=norm, sparse_layers=sparse)
