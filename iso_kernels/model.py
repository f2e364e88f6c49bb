"""A plain Llama-family decoder (Llama, Mistral, Qwen2, Qwen3; Mixtral and Qwen3-MoE experts), gpt-fast style.

``Transformer.forward(tokens, start)`` runs the whole model. Each block is two halves that end *before* their
all-reduce: ``attention_half`` (add-norm, QKV, RoPE, attention over the KV cache, o_proj) and ``mlp_half``
(add-norm, gate/up, SiLU*mul, down_proj). ``forward`` all-reduces each half's output at once; the ISO schedule
in ``iso_kernels.schedule`` runs the same halves chunk by chunk and waits for an all-reduce only where a chunk
needs it. At tensor parallel size 1 a partial output is already the full output. Tensor parallelism is a
transform applied to this model (``iso_kernels.tp``), not a different model. With ``setup_paged_caches`` instead
of ``setup_caches`` the same model runs packed batches of ragged requests over paged KV caches
(``iso_kernels.paged_cache``: ``start`` is then a ``PackedBatch``).
"""

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .models import expert_config
from .paged_cache import DEFAULT_BLOCK_SIZE, KVBuffers, PackedBatch, PagedCache, PagedKVCache

if TYPE_CHECKING:  # annotations only: the model runs without loading the communicators
    from .comm import Communicator


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_heads: int = -1  # -1 means n_head (MHA)
    head_dim: int = 0  # 0 means dim // n_head
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # HF "llama3" rope parameters, or empty
    max_seq_len: int = 2048
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    tie_embeddings: bool = False
    sliding_window: int = 0  # tokens a query sees, itself included (Mistral, Qwen2/3); 0 = unbounded
    first_sliding_layer: int = 0  # layers from this one on use the window (Qwen's max_window_layers)
    # Mixture of experts (Mixtral, Qwen3-MoE): layers in sparse_layers route each token to experts_per_token
    # of n_experts experts of width moe_intermediate_size; the others run the dense MLP.
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the chosen experts' router probabilities to sum to 1
    sparse_layers: tuple = ()

    def __post_init__(self):
        if self.n_kv_heads == -1:
            self.n_kv_heads = self.n_head
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of the KV heads {self.n_kv_heads}")

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face ``config.json`` of a Llama, Mistral, Qwen2, Qwen3, Mixtral or Qwen3-MoE model
        (transformers 4 or 5 keys). What the model does not implement is refused with the field and its value."""
        if not isinstance(config, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(config).__name__}")
        missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size") if key not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported ({', '.join(MODEL_TYPES)})")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _refuse_unsupported(config, model_type, rope_type)
        n_head, n_layer = config["num_attention_heads"], config["num_hidden_layers"]
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layer=n_layer,
            n_head=n_head,
            n_kv_heads=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_base=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope_type == "llama3" else {},
            max_seq_len=config.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            tie_embeddings=config.get("tie_word_embeddings", False),
            **_sliding_window(config, model_type, n_layer),
            **_expert_args(config),
        )

    def window(self, layer: int) -> int:
        """Tokens a query of layer ``layer`` sees, itself included; 0 = unbounded."""
        return self.sliding_window if layer >= self.first_sliding_layer else 0


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


def _refuse_unsupported(config, model_type, rope_type):
    """One line naming the config.json field and its value, for what this model does not implement."""
    refusals = {
        "hidden_act": (config.get("hidden_act", "silu"), lambda v: v == "silu", "only SiLU-gated MLPs"),
        "mlp_bias": (config.get("mlp_bias", False), lambda v: not v, "MLPs without bias"),
        # Qwen2's q/k/v always carry a bias (and o_proj none); elsewhere attention_bias adds o_proj's too.
        "attention_bias": (config.get("attention_bias", False), lambda v: not v or model_type == "qwen2",
                           "attention without bias (Qwen2's own q/k/v bias excepted)"),
        "rope type": (rope_type, lambda v: v in ("default", "llama3"), "default or llama3 RoPE"),
        "shared_expert_intermediate_size": (config.get("shared_expert_intermediate_size", 0), lambda v: not v,
                                            "experts without a shared expert"),
    }
    for field_name, (value, supported, what) in refusals.items():
        if not supported(value):
            raise ValueError(f"config.json: {field_name} {value!r} is not supported (only {what})")


def _expert_args(config):
    experts = expert_config(config)
    if not experts:
        return {}
    return dict(n_experts=experts["n_experts"], experts_per_token=experts["experts_per_token"],
                moe_intermediate_size=experts["moe_intermediate"], norm_topk_prob=experts["norm_topk_prob"],
                sparse_layers=experts["sparse_layers"])


def _sliding_window(config, model_type, n_layer):
    """ModelArgs' window fields: Mistral slides in every layer; Qwen2/3 where use_sliding_window is set, from
    layer max_window_layers on (transformers' layer_types, which must say the same where given)."""
    window = config.get("sliding_window") or 0
    first = 0
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        if not config.get("use_sliding_window", False):
            window = 0
        first = min(config.get("max_window_layers", 0), n_layer)
    if window and "layer_types" in config and config["layer_types"] is not None:
        expected = ["full_attention"] * first + ["sliding_attention"] * (n_layer - first)
        if list(config["layer_types"]) != expected:
            raise ValueError(f"config.json: layer_types {config['layer_types']!r} is not supported (only full "
                             "attention up to max_window_layers, sliding after)")
    return dict(sliding_window=window, first_sliding_layer=first if window else 0)



class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, update, residual):
        """(norm(residual + update), residual + update) in one fused op; update None: (norm(residual), residual)."""
        if update is None:
            return self(residual), residual
        return ops.add_rms_norm(update, residual, self.weight, self.eps)


class KVCache(KVBuffers):
    def __init__(self, batch, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__((batch, max_seq_len, n_kv_heads, head_dim), dtype, device)

    def update(self, start, k, v):
        """Write positions [start, start + len) and return views of K and V over [0, start + len)."""
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]

    def attend(self, q, k, v, start, *, window_size=(-1, -1)):
        """Store k, v at [start, start + len) and return the causal attention of q over [0, start + len) (within
        ``window_size``, flash-attn's (left, right))."""
        keys, values = self.update(start, k, v)
        return ops.chunked_attention(q, keys, values, q_start=start, window_size=window_size)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        window = args.window(layer)
        # A query sees itself and the window - 1 keys before it: flash-attn's (left, right) = (window - 1, 0).
        self.window_size = (window - 1, 0) if window else (-1, -1)
        # This module's heads: all of the model's, or one rank's share once iso_kernels.tp has sharded it.
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_head + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = RowParallelLinear(args.n_head * args.head_dim, args.dim)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.kv_cache = None

    @property
    def row_parallel(self):
        """The GEMM whose output the block's all-reduce completes (the schedule's row signals hook it)."""
        return self.wo

    def forward(self, x, start, rope):
        """x: (batch, n, dim) normed input at positions [start, start + n), or (1, total, dim) of a packed
        stream whose positions a ``PackedBatch`` ``start`` gives (paged caches). Returns the partial o_proj
        output."""
        batch, n, _ = x.shape
        qkv = F.linear(x, self.wqkv.weight, self.wqkv.bias)
        q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv_heads * self.head_dim,
                             self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, n, self.n_head, self.head_dim)
        k = k.view(batch, n, self.n_kv_heads, self.head_dim)
        v = v.view(batch, n, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = start.positions if isinstance(start, PackedBatch) else slice(start, start + n)
        cos, sin = rope[0][positions], rope[1][positions]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.kv_cache.attend(q, k, v, start, window_size=self.window_size)
        return self.wo(out.reshape(batch, n, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = RowParallelLinear(args.intermediate_size, args.dim)  # down

    @property
    def row_parallel(self):
        return self.w2

    def forward(self, x):
        return self.w2(F.silu(F.linear(x, self.w1.weight)) * F.linear(x, self.w3.weight))


class SparseMoE(nn.Module):
    """A mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router that is replicated on every rank picks
    ``experts_per_token`` experts per token; ``ops.moe_experts`` runs them. Under TP every expert's gate/up and
    down are sharded on the intermediate dimension, like the dense MLP, so the output is the partial sum that
    the block's all-reduce completes, and the ISO schedule overlaps it unchanged."""

    row_parallel = None  # the experts' down projection raises no row signals: one all-reduce per block

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts, width = args.n_experts, args.moe_intermediate_size
        self.gate = nn.Linear(args.dim, experts, bias=False)  # the router
        self.w_gate_up = nn.Parameter(torch.empty(experts, 2 * width, args.dim))  # gate rows, then up rows
        self.w_down = nn.Parameter(torch.empty(experts, args.dim, width))
        self.top_k, self.norm_topk_prob = args.experts_per_token, args.norm_topk_prob

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(F.linear(flat, self.gate.weight).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = ops.moe_experts(flat, ids, weights.to(x.dtype), self.w_gate_up, self.w_down, check_ids=False)
        return out.view_as(x)


class RowParallelLinear(nn.Linear):
    """o_proj / down_proj, whose output is the partial sum that the block's all-reduce completes under TP.

    While the ISO schedule's GPU row-signal path sets ``row_signal`` (a ``schedule.RowSignal``), the
    GEMM-plus-signal kernel announces finished row groups, so each group's all-reduce can start before the
    GEMM ends. An attribute rather than an argument: nothing between the schedule and this GEMM needs to know.
    """

    row_signal = None

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        signal = self.row_signal
        if signal is None:
            return F.linear(x, self.weight)
        flat = ops.gemm_signal(x.reshape(-1, x.shape[-1]), self.weight, signal.counters,
                               rows_per_signal=signal.rows_per_signal)
        return flat.view(*x.shape[:-1], self.weight.shape[0])


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = SparseMoE(args) if layer in args.sparse_layers else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    # Each half takes the residual stream and the previous half's all-reduced output (None: the residual is
    # the embedding), and returns its own partial output, to be all-reduced, and the updated residual.
    def attention_half(self, residual, update, start, rope):
        normed, residual = self.attention_norm.add_forward(update, residual)
        return self.attention(normed, start, rope), residual

    def mlp_half(self, residual, update):
        normed, residual = self.ffn_norm.add_forward(update, residual)
        return self.feed_forward(normed), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, layer) for layer in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = None

    def forward(self, tokens: torch.Tensor, start: int | PackedBatch = 0,
                comm: "Communicator | None" = None) -> torch.Tensor:
        """fp32 logits (batch, n, vocab) of ``tokens`` (batch, n) at positions [start, start + n), unsplit; or,
        with a ``PackedBatch`` ``start`` (paged caches), of the packed stream ``tokens`` (1, total).

        comm: the tensor-parallel group's ``iso_kernels.comm`` communicator; None at TP=1.
        """
        self.check_positions(tokens, start)
        residual, update = self.tok_embeddings(tokens), None
        for layer in self.layers:
            out, residual = layer.attention_half(residual, update, start, self.rope)
            update = comm.all_reduce(out.contiguous()) if comm is not None else out
            out, residual = layer.mlp_half(residual, update)
            update = comm.all_reduce(out.contiguous()) if comm is not None else out
        return self.head(residual, update)

    def head(self, residual, update):
        """The final add-norm and the LM head: fp32 logits."""
        normed, _ = self.norm.add_forward(update, residual)
        return F.linear(normed, self.output.weight).float()

    def check_positions(self, tokens, start):
        """Refuse positions beyond what ``setup_caches`` allocated (or before it ran), and a packed batch
        (``start`` a ``PackedBatch``) unless the caches are the paged ones, or the other way round."""
        if self.rope is None:
            raise RuntimeError("call model.setup_caches(batch, max_seq_len) before running the model")
        packed = isinstance(start, PackedBatch)
        if packed != isinstance(self.layers[0].attention.kv_cache, PagedKVCache):
            raise ValueError("a PackedBatch runs on the caches of setup_paged_caches, positions from an int on "
                             "those of setup_caches")
        if packed:
            start.check_tokens(tokens)
            start.check_pages(self.layers[0].attention.kv_cache.k.shape[0])
        end = start.max_end if packed else start + tokens.shape[1]
        if end > self.rope[0].shape[0]:
            raise ValueError(f"positions up to {end} are beyond the {self.rope[0].shape[0]} that setup_caches "
                             "allocated")

    def setup_caches(self, batch, max_seq_len):
        """Allocate KV caches and RoPE tables for ``batch`` sequences of up to ``max_seq_len`` tokens."""
        self._setup(max_seq_len, functools.partial(KVCache, batch, max_seq_len))

    def setup_paged_caches(self, num_blocks, max_seq_len, *, block_size=DEFAULT_BLOCK_SIZE):
        """Allocate every layer's pool of ``num_blocks`` KV pages of ``block_size`` tokens and RoPE tables for
        requests of up to ``max_seq_len`` tokens; returns the ``PagedCache`` that hands the pages out to
        requests (``add_request``, then ``append`` gives the ``PackedBatch`` to run)."""
        self._setup(max_seq_len, functools.partial(PagedKVCache, num_blocks, block_size))
        return PagedCache([layer.attention.kv_cache for layer in self.layers], max_seq_len)

    def _setup(self, max_seq_len, make_cache):
        """RoPE tables for ``max_seq_len`` positions; each layer's cache ``make_cache(n_kv_heads, head_dim, dtype,
        device)`` for its (possibly sharded) heads."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.args.max_seq_len} positions")
        weight = self.output.weight
        for layer in self.layers:
            attention = layer.attention
            attention.kv_cache = make_cache(attention.n_kv_heads, attention.head_dim, weight.dtype, weight.device)
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
