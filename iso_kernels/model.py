"""A plain Llama-family decoder (Llama, Mistral, Qwen2), gpt-fast style.

The layer is written as two halves that end *before* their all-reduce: ``attention_partial`` (QKV, RoPE,
attention over the KV cache, o_proj) and ``mlp_partial`` (gate/up, SiLU*mul, down_proj). The schedules in
``iso_kernels.schedule`` call the halves chunk by chunk and put the all-reduces where they belong; at tensor
parallel size 1 a partial output is already the full output. Tensor parallelism is a transform applied to this
model (``iso_kernels.tp``), not a different model.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1  # KV heads (gpt-fast's name); -1 means n_head (MHA)
    head_dim: int = 0  # 0 means dim // n_head
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # HF "llama3" rope parameters, or empty
    max_seq_len: int = 2048
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False
    sliding_window: int = 0  # Mistral; 0 = none. Prompts longer than the window are refused.

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of the KV heads {self.n_local_heads}")

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face ``config.json`` of a Llama, Mistral or Qwen2 model (transformers 4 or 5 keys)."""
        if not isinstance(config, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(config).__name__}")
        missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size") if key not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        model_type = config.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"config.json: model_type {model_type!r} is not supported (llama, mistral, qwen2)")
        if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias", False):
            raise ValueError("config.json: only SiLU-gated MLPs without bias are supported")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (default, llama3)")
        sliding = config.get("sliding_window") or 0
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            sliding = 0
        n_head = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_local_heads=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_base=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope_type == "llama3" else {},
            max_seq_len=config.get("max_position_embeddings", 2048),
            qkv_bias=config.get("attention_bias", model_type == "qwen2"),
            tie_embeddings=config.get("tie_word_embeddings", False),
            sliding_window=sliding,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class KVCache(nn.Module):
    def __init__(self, batch, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        """Write positions [start, start + len) and return views of K and V over [0, start + len)."""
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        qkv_out = (args.n_head + 2 * args.n_local_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache = None

    def forward(self, x, start, rope, row_signal=None):
        """x: (batch, n, dim) normed input at positions [start, start + n). Returns the partial o_proj output."""
        batch, n, _ = x.shape
        qkv = F.linear(x, self.wqkv.weight, self.wqkv.bias)
        q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                             self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(batch, n, self.n_head, self.head_dim)
        k = k.view(batch, n, self.n_kv_head, self.head_dim)
        v = v.view(batch, n, self.n_kv_head, self.head_dim)
        cos, sin = rope[0][start:start + n], rope[1][start:start + n]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = self.kv_cache.update(start, k, v)
        out = ops.chunked_attention(q, keys, values, q_start=start)
        return row_parallel_linear(out.reshape(batch, n, -1), self.wo.weight, row_signal)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x, row_signal=None):
        hidden = F.silu(F.linear(x, self.w1.weight)) * F.linear(x, self.w3.weight)
        return row_parallel_linear(hidden, self.w2.weight, row_signal)


def row_parallel_linear(x, weight, row_signal=None):
    """o_proj / down_proj. With ``row_signal`` (an int32 counter buffer) the GEMM-plus-signal kernel announces
    finished row groups so the all-reduce can start on them before the GEMM ends."""
    if row_signal is None:
        return F.linear(x, weight)
    flat = ops.gemm_signal(x.reshape(-1, x.shape[-1]), weight, row_signal.counters,
                           rows_per_signal=row_signal.rows_per_signal)
    return flat.view(*x.shape[:-1], weight.shape[0])


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = None

    def setup_caches(self, batch, max_seq_len):
        """Allocate KV caches and RoPE tables for ``batch`` sequences of up to ``max_seq_len`` tokens."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.args.max_seq_len} positions")
        if self.args.sliding_window and max_seq_len > self.args.sliding_window:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the sliding window "
                             f"{self.args.sliding_window}, which this model does not implement")
        weight = self.output.weight
        for layer in self.layers:
            attention = layer.attention
            attention.kv_cache = KVCache(batch, max_seq_len, attention.n_kv_head, attention.head_dim,
                                         weight.dtype, weight.device)
        self.rope = rope_tables(self.args, max_seq_len, weight.device, weight.dtype)


def rope_tables(args: ModelArgs, length, device, dtype):
    """(cos, sin), each (length, head_dim), in Hugging Face's rotate-half layout."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64, device=device).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_base ** exponents)
    if args.rope_scaling:
        inv_freq = _llama3_scaled(inv_freq, args.rope_scaling)
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _llama3_scaled(inv_freq, rope):
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, a smooth ramp in between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x: (batch, n, heads, head_dim); cos, sin: (n, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
