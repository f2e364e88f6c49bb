"""Per-op times of a tensor-parallel prefill (``LayerCosts``): the cost model's constants, from a datasheet or a fit.

How the schedule, this model and the solver fit together, and what is measured or assumed:
``docs/cost-model.md``. Per layer each chunk runs an attention block (norm, QKV, RoPE, attention, ``o_proj``)
and an MLP block (norm, gate/up, SiLU*mul, ``down_proj``); each block's output is all-reduced on a
communication stream. A chunk's MLP waits for its own attention all-reduce (AR1), its next
attention block for its own MLP all-reduce (AR2). Times are seconds throughout.

Per-op times (``LayerCosts``), for a chunk of ``n`` tokens per sequence after a prefix of ``p`` tokens, with
``batch`` sequences (the batch multiplies tokens, not fixed costs)::

    attention_block(n, p) = attn_fixed + batch * (attn_per_token * n + attn_per_pair * n * (p + (n + 1) / 2)
                                                  + attn_per_key * n * (p + n))
    mlp_block(n)          = mlp_fixed  + batch * mlp_per_token * n
    all_reduce(nbytes)    = ar_latency + nbytes / ar_bandwidth

``n * (p + (n + 1) / 2)`` counts the visible (query, key) pairs of causal attention for queries p..p+n-1;
``n * (p + n)`` counts all pairs, which an implementation that scores the masked future too (the CPU
reference) also pays for. A kernel that skips masked blocks has ``attn_per_key = 0`` (the datasheet model).
RMSNorm, RoPE, SiLU and residual adds are not modelled apart: they are linear in tokens, so they are folded
into the per-token terms (a fit absorbs them; the datasheet model ignores them).
"""

import dataclasses
import math
from dataclasses import dataclass

from ..hardware import HardwareSpec, ring_factor
from .shapes import ModelShape, check_int


# --- per-op time model ---
@dataclass(frozen=True)
class LayerCosts:
    attn_fixed: float
    attn_per_token: float
    attn_per_pair: float
    mlp_fixed: float
    mlp_per_token: float
    ar_latency: float
    ar_bandwidth: float  # bytes/s of message size, ring factor already folded in; inf = no communication
    attn_per_key: float = 0.0  # per (query, key) pair scored whether visible or masked

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"LayerCosts.{field.name} must be >= 0, got {value}")
        if self.ar_bandwidth == 0:
            raise ValueError("LayerCosts.ar_bandwidth must be > 0")

    def attention_block(self, n, p, batch=1):
        pairs = n * (p + (n + 1) / 2)
        scored = n * (p + n)
        return self.attn_fixed + batch * (self.attn_per_token * n + self.attn_per_pair * pairs
                                          + self.attn_per_key * scored)

    def mlp_block(self, n, batch=1):
        return self.mlp_fixed + batch * self.mlp_per_token * n

    def all_reduce(self, nbytes):
        return self.ar_latency + nbytes / self.ar_bandwidth

    def scaled(self, *, compute=1.0, comm=1.0):
        """Compute terms times ``compute``, all-reduce terms times ``comm``. Blocks timed in isolation miss
        what a whole forward adds (norms, embedding, LM head, cache effects, a peer arriving late at the
        collective), so the engine rescales them to its measured prefill."""
        if not (compute > 0 and comm > 0):
            raise ValueError(f"compute and comm factors must be positive, got {compute}, {comm}")
        terms = {f: getattr(self, f) * compute for f in (
            "attn_fixed", "attn_per_token", "attn_per_pair", "attn_per_key", "mlp_fixed", "mlp_per_token")}
        return dataclasses.replace(self, **terms, ar_latency=self.ar_latency * comm,
                                   ar_bandwidth=self.ar_bandwidth / comm)

    @classmethod
    def from_datasheet(cls, shape: ModelShape, hardware: HardwareSpec, tp: int) -> "LayerCosts":
        """Peak FLOP/s x efficiency for compute, bus bandwidth and latency for the all-reduce; TP shards
        every FLOP."""
        check_int("tp", tp)
        flops = tp * hardware.efficiency * hardware.peak_tflops * 1e12
        overhead = hardware.block_overhead_us * 1e-6
        ring = ring_factor(tp)
        return cls(attn_fixed=overhead, attn_per_token=shape.attention_gemm_flops / flops,
                   attn_per_pair=shape.pair_flops / flops, mlp_fixed=overhead,
                   mlp_per_token=shape.mlp_gemm_flops / flops,
                   ar_latency=hardware.link_latency_us * 1e-6 if tp > 1 else 0.0,
                   ar_bandwidth=hardware.link_gbps * 1e9 / ring if tp > 1 else math.inf)
