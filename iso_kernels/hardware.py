"""Every GPU and link fact the package uses: hardware presets from datasheets and published measurements,
the ring all-reduce's traffic factor, and per-architecture limits for compiling kernels without the GPU.

Shared by the cost model (``planning.costs.LayerCosts.from_datasheet``, the tables), the emulated links of
``iso_kernels.comm`` (``LINK_PRESETS``) and the compile report (``tools/compile_report.py``), so a simulated
run, an emulated one and a compile check describe the same machines. No torch: planning imports it.
"""

import dataclasses
from dataclasses import dataclass

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


def ring_factor(world_size):
    """Bytes a ring all-reduce moves per rank, per byte of message: 2 (w - 1) / w (1 for a lone rank whose
    link is emulated, which moves the message once)."""
    return 2 * (world_size - 1) / world_size if world_size > 1 else 1.0


def traffic_factor(collective, world_size):
    """Bytes per rank per byte of the whole message: an all-reduce's ``ring_factor``; a reduce-scatter or an
    all-gather moves half of that, (w - 1) / w."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {', '.join(COLLECTIVES)}, got {collective!r}")
    return ring_factor(world_size) / (2 if collective != "all_reduce" and world_size > 1 else 1)


# --- collectives ---
@dataclass(frozen=True)
class Collective:
    """One collective's time: the fastest of its regimes, each ``latency + traffic / bus bandwidth`` with traffic
    = message bytes x ``traffic_factor`` (nccl-tests' bus bandwidth). One regime is the alpha-beta model; NCCL
    switches protocol and algorithm with the message size, so its fits have two, and its bus bandwidth depends
    on the size."""

    regimes: tuple[tuple[float, float], ...]  # (latency_us, bus_gbps) each

    def __post_init__(self):
        if not self.regimes or any(not (latency >= 0 and bandwidth > 0) for latency, bandwidth in self.regimes):
            raise ValueError(f"regimes must be (latency_us >= 0, bus_gbps > 0) pairs, got {self.regimes}")

    def seconds(self, traffic_bytes):
        """Seconds to move ``traffic_bytes`` per rank (a number or an array)."""
        return min(latency * 1e-6 + traffic_bytes / (bandwidth * 1e9) for latency, bandwidth in self.regimes)


@dataclass(frozen=True)
class Link:
    """A collective implementation over an interconnect: "nccl" (NCCL's ring and tree algorithms, what
    ``torch.distributed`` and ``nccl-ext`` run) or "multimem" (NVLink SHARP multicast over symmetric memory)."""

    collective: str
    all_reduce: Collective
    reduce_scatter: Collective | None = None
    all_gather: Collective | None = None

    def seconds(self, collective, nbytes, world_size):
        """Seconds of one ``collective`` of a message of ``nbytes`` over ``world_size`` ranks."""
        model = getattr(self, collective) if collective in COLLECTIVES else None
        if model is None:
            raise ValueError(f"the {self.collective} link has no model of {collective!r}")
        return model.seconds(nbytes * traffic_factor(collective, world_size))


def _one_regime(latency_us, bus_gbps):
    return Collective(((latency_us, bus_gbps),))


# --- GPUs ---
@dataclass(frozen=True)
class HardwareSpec:
    """A GPU and its interconnect, as the cost model reads them (``planning.costs.LayerCosts.from_datasheet``).

    Compute: GEMMs run at ``gemm_efficiency`` of ``peak_tflops`` (dense bf16) and never faster than their
    weights stream from HBM (``hbm_gbps``), so a GEMM of few rows per rank runs far below peak; causal
    attention's quadratic term at ``attention_efficiency``; norms, RoPE, K/V writes and SiLU * mul move their
    bytes at HBM speed; every layer pays ``layer_fixed_us`` whatever its tokens (launches, small kernels).
    A mixture of experts' grouped GEMMs run at ``expert_efficiency`` on many rows per expert, and each expert a
    chunk reaches costs ``expert_half_rows`` rows more (its GEMM's efficiency at m rows is expert_efficiency x
    m / (m + expert_half_rows)). ``links``: the collective implementations modelled, the first the default."""

    name: str
    peak_tflops: float
    hbm_gbps: float
    memory_gib: float
    gemm_efficiency: float
    attention_efficiency: float
    layer_fixed_us: float
    links: tuple[Link, ...]
    expert_efficiency: float
    expert_half_rows: float

    def link(self, collective: str = "nccl") -> Link:
        for link in self.links:
            if link.collective == collective:
                return link
        known = ", ".join(link.collective for link in self.links)
        raise ValueError(f"collective: {self.name} has no {collective!r} model; known: {known}")

    def with_link(self, *, bus_gbps: float | None = None, latency_us: float | None = None) -> "HardwareSpec":
        """This GPU behind a what-if NCCL link: one all-reduce regime of ``bus_gbps`` and ``latency_us`` (each
        defaulting to the NCCL all-reduce's large-message regime)."""
        latency, bandwidth = max(self.link("nccl").all_reduce.regimes)
        regime = _one_regime(latency if latency_us is None else latency_us,
                             bandwidth if bus_gbps is None else bus_gbps)
        return dataclasses.replace(self, links=(Link("nccl", regime, regime, regime),))


# Sources, per number (peak = dense bf16 tensor throughput with fp32 accumulation):
# - H100 SXM: 989 TFLOP/s and 3.35 TB/s HBM3 (NVIDIA H100 datasheet), 80 GiB. gemm_efficiency 0.614,
#   attention_efficiency 0.572 and layer_fixed_us 110: fitted to the whole prefill of Llama-3.3-70B at TP 8
#   with its all-reduces removed (vLLM, eager, 1k..64k tokens; TokenWeave's figure_11a.csv, no_ar column);
#   collectives fitted to TokenWeave's 8xH100 microbenchmarks (figure_6.csv, 64..32768 tokens of hidden 8192),
#   NCCL through torch.distributed and NVLS multimem on symmetric memory. Both fits: ``python -m
#   tools.fit_presets`` on tests/data/tokenweave. Taken for every TP size: NVSwitch gives each GPU its full
#   NVLink bandwidth at any group size (no 4- or 2-GPU measurements were fitted).
# - A100 SXM: 312 TFLOP/s, 2.04 TB/s HBM2e (NVIDIA A100 datasheet), 80 GiB; ~200-208 GB/s all-reduce bus
#   bandwidth measured on 8-GPU NVLink nodes (NVIDIA/nccl-tests#149, #178); 10 us latency: small all-reduces
#   take a few us at 2 GPUs and grow with GPU count (NVIDIA/nccl#1259), an order-of-magnitude assumption.
# - A800: A100 silicon and memory, NVLink cut to 400 GB/s bidirectional (aiwiki.ai/wiki/nvidia_a800); 150 GB/s
#   bus bandwidth assumed from the A100's in that ratio; latency as the A100's.
# - RTX 4090: 165.2 TFLOP/s (waredb.com/processor/nvidia-geforce-rtx-4090), 1.01 TB/s GDDR6X, 24 GiB. 20 GB/s:
#   the stock driver has no P2P, so NCCL stages PCIe 4.0 traffic through host memory (NVIDIA/nccl-tests#117,
#   NVIDIA/nccl#814); a P2P-patched driver reached ~25.9 GB/s on 4 cards (tinygrad/open-gpu-kernel-modules#36).
#   40 us: an 8-byte all-reduce on 8x4090 took ~42 us (NVIDIA/nccl#1530).
# - H100 experts: expert_efficiency 0.495 and expert_half_rows 108, fitted (the same tool) to the whole prefill of
#   Mixtral-8x22B at TP 8 with its all-reduces removed (figure_11a.csv, no_ar column), the dense terms above held.
# - The A100, A800 and RTX 4090 have no published whole-prefill measurement to fit: they take the H100 fit's
#   efficiencies and per-layer fixed cost (eager launches cost the same host time on any of them), an
#   assumption; their links have one regime each.
H100_EFFICIENCY = dict(gemm_efficiency=0.614, attention_efficiency=0.572, layer_fixed_us=110.0,
                       expert_efficiency=0.495, expert_half_rows=108.0)
HARDWARE_PRESETS = {
    "rtx4090-pcie4": HardwareSpec("rtx4090-pcie4", 165.2, 1008.0, 24.0, **H100_EFFICIENCY,
                                  links=(Link("nccl", _one_regime(40.0, 20.0)),)),
    "a800-nvlink": HardwareSpec("a800-nvlink", 312.0, 2039.0, 80.0, **H100_EFFICIENCY,
                                links=(Link("nccl", _one_regime(10.0, 150.0)),)),
    "a100-nvlink": HardwareSpec("a100-nvlink", 312.0, 2039.0, 80.0, **H100_EFFICIENCY,
                                links=(Link("nccl", _one_regime(10.0, 200.0)),)),
    "h100-nvlink": HardwareSpec("h100-nvlink", 989.0, 3350.0, 80.0, **H100_EFFICIENCY, links=(
        Link("nccl", all_reduce=Collective(((15.8, 92.3), (53.1, 389.4))),
             reduce_scatter=Collective(((20.1, 106.7), (43.7, 343.1))),
             all_gather=Collective(((23.0, 142.1), (40.7, 331.3)))),
        Link("multimem", all_reduce=Collective(((12.7, 478.9),)), reduce_scatter=Collective(((13.2, 315.4),)),
             all_gather=Collective(((11.0, 327.4),))),
    )),
}


# --- architectures, for compiling without the GPU ---
@dataclass(frozen=True)
class GpuArch:
    """What a compile-only driver must report for compute capability ``capability``: opt-in shared memory
    per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and the SM count of the GPUs named."""

    capability: int
    gpus: str
    shared_memory_bytes: int
    multiprocessors: int

    @property
    def name(self) -> str:
        return f"sm_{self.capability} ({self.gpus})"


GPU_ARCHS = {
    80: GpuArch(80, "A100/A800", 166912, 108),
    89: GpuArch(89, "RTX 4090", 101376, 128),
    90: GpuArch(90, "H100/H200", 232448, 132),
}
