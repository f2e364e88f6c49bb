"""Per-op times of a tensor-parallel prefill (``LayerCosts``): the cost model's constants, from a datasheet or a fit.

How the schedule, this model and the solver fit together, and what is measured or assumed:
``docs/cost-model.md``. Per layer each chunk runs an attention block (norm, QKV, RoPE, attention, ``o_proj``)
and an MLP block (norm, gate/up, SiLU*mul, ``down_proj``); each block's output is all-reduced on a
communication stream. A chunk's MLP waits for its own attention all-reduce (AR1), its next
attention block for its own MLP all-reduce (AR2). Times are seconds throughout.

Per-op times (``LayerCosts``), for a chunk of ``n`` tokens per sequence after a prefix of ``p`` tokens, with
``batch`` sequences (the batch multiplies tokens, not fixed costs)::

    attention_block(n, p) = attn_fixed + max(batch * attn_per_token * n, attn_gemm_floor)
                            + batch * (attn_per_pair * n * (p + (n + 1) / 2) + attn_per_key * n * (p + n))
    mlp_block(n)          = mlp_fixed  + max(batch * mlp_per_token * n, mlp_gemm_floor) + mlp_experts_per_chunk * hit(n)
    all_reduce(nbytes)    = min(ar_latency + nbytes / ar_bandwidth, ar_small_latency + nbytes / ar_small_bandwidth)

``n * (p + (n + 1) / 2)`` counts the visible (query, key) pairs of causal attention for queries p..p+n-1;
``n * (p + n)`` counts all pairs, which an implementation that scores the masked future too (the CPU
reference) also pays for. A kernel that skips masked blocks has ``attn_per_key = 0`` (the datasheet model).
The floors are the time to stream a block's GEMM weights from memory: a chunk of few tokens cannot run its
GEMMs faster, so they run below peak (the datasheet model's shape-dependent efficiency). In a mixture of
experts each expert a chunk's tokens reach runs a grouped GEMM of few rows, which streams the expert's weights
and runs below peak: it costs ``mlp_experts_per_chunk`` (all E experts) times ``hit(n)`` = 1 - (1 - k /
E)^(batch n), the expected share of E experts that ``batch * n`` tokens routed uniformly to k each reach. A
chunk of a few hundred tokens reaches nearly all of them, so every chunk pays it again (uniform routing is an
assumption; real routers are skewed, which lowers ``hit`` for short chunks). The all-reduce takes
the faster of two regimes (NCCL's protocols for small and large messages; one regime leaves the second at
infinity). RMSNorm, RoPE, SiLU and residual adds are linear in tokens and folded into the per-token terms.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

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
    attn_gemm_floor: float = 0.0  # seconds: the attention block's GEMM weights read once
    mlp_gemm_floor: float = 0.0
    ar_small_latency: float = math.inf  # a second all-reduce regime (inf: none)
    ar_small_bandwidth: float = math.inf
    mlp_experts_per_chunk: float = 0.0  # seconds: every expert's small-GEMM cost, paid per chunk it is reached
    mlp_experts: int = 0  # E and k of ``hit(n)``; 0: no experts
    mlp_experts_per_token: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"LayerCosts.{field.name} must be >= 0, got {value}")
        if self.ar_bandwidth == 0 or self.ar_small_bandwidth == 0:
            raise ValueError("LayerCosts.ar_bandwidth and ar_small_bandwidth must be > 0")

    @property
    def has_comm(self) -> bool:
        """Whether an all-reduce costs anything (False at TP 1 without a modelled link)."""
        return bool(self.all_reduce(1.0) > 0)

    def attention_block(self, n, p, batch=1):
        pairs = n * (p + (n + 1) / 2)
        scored = n * (p + n)
        return (self.attn_fixed + np.maximum(batch * self.attn_per_token * n, self.attn_gemm_floor)
                + batch * (self.attn_per_pair * pairs + self.attn_per_key * scored))

    def mlp_block(self, n, batch=1):
        hit = 0.0
        if self.mlp_experts:
            hit = 1 - (1 - self.mlp_experts_per_token / self.mlp_experts) ** (batch * np.asarray(n))
        return (self.mlp_fixed + np.maximum(batch * self.mlp_per_token * n, self.mlp_gemm_floor)
                + self.mlp_experts_per_chunk * hit)

    def all_reduce(self, nbytes):
        return np.minimum(self.ar_latency + nbytes / self.ar_bandwidth,
                          self.ar_small_latency + nbytes / self.ar_small_bandwidth)

    def all_reduce_latency(self, nbytes):
        """The latency term of the regime an all-reduce of ``nbytes`` runs in."""
        small = self.ar_small_latency + nbytes / self.ar_small_bandwidth < self.ar_latency + nbytes / self.ar_bandwidth
        return self.ar_small_latency if small else self.ar_latency

    def scaled(self, *, compute=1.0, comm=1.0):
        """Compute terms times ``compute``, all-reduce terms times ``comm``. Blocks timed in isolation miss
        what a whole forward adds (norms, embedding, LM head, cache effects, a peer arriving late at the
        collective), so the engine rescales them to its measured prefill."""
        if not (compute > 0 and comm > 0):
            raise ValueError(f"compute and comm factors must be positive, got {compute}, {comm}")
        terms = {f: getattr(self, f) * compute for f in (
            "attn_fixed", "attn_per_token", "attn_per_pair", "attn_per_key", "mlp_fixed", "mlp_per_token",
            "attn_gemm_floor", "mlp_gemm_floor", "mlp_experts_per_chunk")}
        return dataclasses.replace(self, **terms, ar_latency=self.ar_latency * comm,
                                   ar_bandwidth=self.ar_bandwidth / comm, ar_small_latency=self.ar_small_latency * comm,
                                   ar_small_bandwidth=self.ar_small_bandwidth / comm)

    @classmethod
    def from_datasheet(cls, shape: ModelShape, hardware: HardwareSpec, tp: int,
                       collective: str = "nccl") -> "LayerCosts":
        """The costs ``hardware`` (a ``HardwareSpec``: its sources and fits) gives ``shape`` over ``tp`` ranks, with
        the all-reduces of its ``collective`` link: TP shards every FLOP, GEMM weight and attention head; GEMMs at
        ``gemm_efficiency`` of peak but no faster than their weights stream from HBM; attention pairs at
        ``attention_efficiency``; the blocks' other memory traffic at HBM speed; ``layer_fixed_us`` split over
        the two blocks."""
        check_int("tp", tp)
        link = hardware.link(collective)
        flops, hbm = tp * hardware.peak_tflops * 1e12, hardware.hbm_gbps * 1e9
        gemm, attention = flops * hardware.gemm_efficiency, flops * hardware.attention_efficiency
        experts = flops * hardware.expert_efficiency
        # the FLOPs of one row through one expert, averaged over the layers
        per_expert_row = shape.expert_gemm_flops / shape.experts_per_token if shape.experts_per_token else 0.0
        attn_bytes, mlp_bytes = shape.elementwise_bytes(tp)
        fixed = hardware.layer_fixed_us * 1e-6 / 2
        comm = {}
        if tp > 1:
            ring = ring_factor(tp)
            regimes = sorted(link.all_reduce.regimes)  # by latency: the small-message regime first
            latency, bus = regimes[-1]
            comm = dict(ar_latency=latency * 1e-6, ar_bandwidth=bus * 1e9 / ring)
            if len(regimes) > 1:
                comm.update(ar_small_latency=regimes[0][0] * 1e-6, ar_small_bandwidth=regimes[0][1] * 1e9 / ring)
        return cls(attn_fixed=fixed, attn_per_token=shape.attention_gemm_flops / gemm + attn_bytes / hbm,
                   attn_per_pair=shape.pair_flops / attention, mlp_fixed=fixed,
                   mlp_per_token=shape.mlp_gemm_flops / gemm + shape.expert_gemm_flops / experts + mlp_bytes / hbm,
                   attn_gemm_floor=shape.attention_weight_elements * shape.dtype_bytes / tp / hbm,
                   mlp_gemm_floor=shape.dense_share * shape.mlp_weight_elements * shape.dtype_bytes / tp / hbm,
                   mlp_experts=shape.n_experts,
                   mlp_experts_per_token=shape.experts_per_token,
                   mlp_experts_per_chunk=shape.n_experts * per_expert_row * hardware.expert_half_rows / experts,
                   **(comm or dict(ar_latency=0.0, ar_bandwidth=math.inf)))
