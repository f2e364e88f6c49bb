"""What planning needs to know about a model and a prefill: ``ModelShape`` (sizes and FLOPs), ``PrefillShape``
(the narrow interface the engine hands to planning), and the argument checks every entry point shares."""

import dataclasses
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..models import expert_config

if TYPE_CHECKING:  # annotations only: .model imports torch
    from ..model import ModelArgs


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """A TypeError or ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_fraction(name: str, value: Any) -> None:
    """A ValueError naming ``name`` unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes, as the cost model needs them (``models.PUBLISHED`` by name)."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    # Mixture of experts: sparse_layers of the n_layers route each token to experts_per_token of n_experts
    # experts of width moe_intermediate; the other layers run the dense MLP of width intermediate.
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    sparse_layers: int = 0

    @property
    def attention_gemm_flops(self) -> float:
        """Per token per layer: QKV projection plus ``o_proj``."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return 2.0 * self.hidden * (q + 2 * kv) + 2.0 * q * self.hidden

    @property
    def mlp_gemm_flops(self) -> float:
        """Per token per layer, averaged over the layers: the dense layers' gate, up and down projections and
        the sparse layers' router (``expert_gemm_flops`` apart)."""
        sparse = 2.0 * self.n_experts
        return self.hidden * (self.dense_share * 6.0 * self.intermediate + (1 - self.dense_share) * sparse)

    @property
    def expert_gemm_flops(self) -> float:
        """Per token per layer, averaged over the layers: the gate, up and down projections of the
        experts_per_token experts a token of a sparse layer is routed to."""
        return (1 - self.dense_share) * self.experts_per_token * 6.0 * self.hidden * self.moe_intermediate

    @property
    def dense_share(self) -> float:
        """The share of the layers that run the dense MLP."""
        return 1 - self.sparse_layers / self.n_layers

    @property
    def pair_flops(self) -> float:
        """Per visible (query, key) pair per layer: QK^T and PV over all heads."""
        return 4.0 * self.n_heads * self.head_dim

    @property
    def weight_bytes(self) -> int:
        """Decoder layers (a sparse layer: its router and every expert), untied embedding and LM head, norms."""
        h, dense = self.hidden, self.n_layers - self.sparse_layers
        experts = self.n_experts * (h + self.expert_weight_elements)
        layers = (self.n_layers * (self.attention_weight_elements + 2 * h) + dense * self.mlp_weight_elements
                  + self.sparse_layers * experts)
        return (layers + 2 * self.vocab * h + h) * self.dtype_bytes

    @property
    def attention_weight_elements(self) -> int:
        """Per layer: the QKV projection's and ``o_proj``'s weights."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden

    @property
    def mlp_weight_elements(self) -> int:
        """Per dense layer: gate, up and down projections' weights."""
        return 3 * self.hidden * self.intermediate

    @property
    def expert_weight_elements(self) -> int:
        """Per sparse layer, per expert: its gate, up and down projections' weights."""
        return 3 * self.hidden * self.moe_intermediate

    def elementwise_bytes(self, tp: int) -> tuple[int, int]:
        """Per token per layer on each of ``tp`` ranks, the (attention, MLP) block's memory traffic besides its
        GEMMs: the fused residual add + RMSNorm on the whole hidden state (reads x and the residual, writes
        both), RoPE on this rank's q and k (read, write) and their K/V cache writes; the second norm and
        SiLU * mul on this rank's MLP slice (reads gate and up, writes one; in a sparse layer, of each expert the
        token is routed to), averaged over the layers."""
        q, kv = self.n_heads * self.head_dim // tp, kv_heads_per_rank(self.n_kv_heads, tp) * self.head_dim
        norm = 4 * self.hidden
        sparse = self.experts_per_token * self.moe_intermediate
        mlp = self.dense_share * self.intermediate + (1 - self.dense_share) * sparse
        return ((norm + 2 * (q + kv) + 2 * kv) * self.dtype_bytes, round((norm + 3 * mlp / tp) * self.dtype_bytes))

    def prefill(self, batch: int = 1) -> "PrefillShape":
        return PrefillShape(self.n_layers, self.hidden, batch, self.dtype_bytes)


@dataclass(frozen=True)
class PrefillShape:
    """What the schedule simulation needs of one prefill: ``batch`` sequences through ``n_layers`` layers whose
    all-reduces carry ``hidden`` values of ``dtype_bytes`` bytes per token."""

    n_layers: int
    hidden: int
    batch: int = 1
    dtype_bytes: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_int(field.name, getattr(self, field.name))

    def message_bytes(self, tokens):
        """Bytes of one all-reduce of ``tokens`` tokens per sequence."""
        return self.batch * tokens * self.hidden * self.dtype_bytes


REQUIRED_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "vocab_size")


def model_shape(config: "dict[str, Any] | ModelArgs | ModelShape", dtype_bytes: int = 2) -> ModelShape:
    """The cost model's shape of ``config``: a Hugging Face ``config.json`` dict, a ``model.ModelArgs`` or a
    ``ModelShape`` (its ``dtype_bytes`` replaced by ``dtype_bytes``)."""
    check_int("dtype_bytes", dtype_bytes)
    if isinstance(config, ModelShape):
        return dataclasses.replace(config, dtype_bytes=dtype_bytes)
    if isinstance(config, dict):
        missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = config["num_attention_heads"]
        return ModelShape(hidden=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=heads,
                          n_kv_heads=config.get("num_key_value_heads") or heads,
                          head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                          intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                          dtype_bytes=dtype_bytes, **_shape_of_experts(expert_config(config)))
    from ..model import ModelArgs  # a caller holding a ModelArgs has imported torch already

    if not isinstance(config, ModelArgs):
        raise TypeError(f"config must be a config.json dict, a ModelArgs or a ModelShape, got {type(config).__name__}")
    return ModelShape(hidden=config.dim, n_layers=config.n_layer, n_heads=config.n_head,
                      n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                      intermediate=config.intermediate_size, vocab=config.vocab_size, dtype_bytes=dtype_bytes,
                      n_experts=config.n_experts, experts_per_token=config.experts_per_token,
                      moe_intermediate=config.moe_intermediate_size, sparse_layers=len(config.sparse_layers))


def _shape_of_experts(experts):
    return {**{k: v for k, v in experts.items() if k != "norm_topk_prob"},
            "sparse_layers": len(experts["sparse_layers"])} if experts else {}


def check_divisible(shape: ModelShape, tp: int) -> None:
    """Clear errors when a model cannot be split over ``tp`` ranks: whole query heads and an equal share of the
    MLP (and of every expert) per rank; whole KV heads per rank, or, where the ranks outnumber the KV heads
    (Qwen3-235B-A22B's 4 at TP 8), each rank holds the one KV head its query heads read (replicated). The one
    rule of ``iso_kernels.tp`` and the planner."""
    check_int("tp", tp)
    for what, size in (("attention heads", shape.n_heads), ("intermediate size", shape.intermediate),
                       ("expert intermediate size", shape.moe_intermediate)):
        if size % tp:
            raise ValueError(f"{what} ({size}) are not divisible by tp={tp}")
    if shape.n_kv_heads % tp and tp % shape.n_kv_heads:
        raise ValueError(f"KV heads ({shape.n_kv_heads}) are neither divisible by tp={tp} nor a divisor of it")


def kv_heads_per_rank(n_kv_heads: int, tp: int) -> int:
    """KV heads each of ``tp`` ranks holds: its share, or one replicated head where the ranks outnumber them."""
    return max(1, n_kv_heads // tp)
