"""A plain Llama-family decoder (Llama, Mistral, Qwen2), gpt-fast style.

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
    tie_embeddings: bool = False
    sliding_window: int = 0  # Mistral; 0 = none. Prompts longer than the window are refused.

    def __post_init__(self):
        if self.n_kv_heads == -1:
            self.n_kv_heads = self.n_head
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of the KV heads {self.n_kv_heads}")

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
            n_kv_heads=config.get("num_key_value_heads") or n_head,
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

    def attend(self, q, k, v, start):
        """Store k, v at [start, start + len) and return the causal attention of q over [0, start + len)."""
        keys, values = self.update(start, k, v)
        return ops.chunked_attention(q, keys, values, q_start=start)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # This module's heads: all of the model's, or one rank's share once iso_kernels.tp has sharded it.
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_head + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = RowParallelLinear(args.n_head * args.head_dim, args.dim)
        self.kv_cache = None

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
        positions = start.positions if isinstance(start, PackedBatch) else slice(start, start + n)
        cos, sin = rope[0][positions], rope[1][positions]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.kv_cache.attend(q, k, v, start)
        return self.wo(out.reshape(batch, n, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = RowParallelLinear(args.intermediate_size, args.dim)  # down

    def forward(self, x):
        return self.w2(F.silu(F.linear(x, self.w1.weight)) * F.linear(x, self.w3.weight))


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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
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
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
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
        if self.args.sliding_window and max_seq_len > self.args.sliding_window:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the sliding window "
                             f"{self.args.sliding_window}, which this model does not implement")
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
