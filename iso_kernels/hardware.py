"""Every GPU and link fact the package uses: hardware presets from datasheets and published measurements,
the ring all-reduce's traffic factor, and per-architecture limits for compiling kernels without the GPU.

Shared by the cost model (``planning.costs.LayerCosts.from_datasheet``, the tables), the emulated links of
``iso_kernels.comm`` (``LINK_PRESETS``) and the compile report (``tools/compile_report.py``), so a simulated
run, an emulated one and a compile check describe the same machines. No torch: planning imports it.
"""

from dataclasses import dataclass

# Chunked prefill pays these per block whatever the chunk size: ~5 kernels (norm, GEMM, RoPE, attention,
# GEMM) at ~4 us of launch and tail each. Our estimate, not a measurement; a fit replaces it.
BLOCK_OVERHEAD_US = 20.0
# Fraction of peak tensor throughput large prefill GEMMs reach: an assumption (docs/cost-model.md).
EFFICIENCY = 0.7


@dataclass(frozen=True)
class HardwareSpec:
    """``link_gbps`` is NCCL *bus* bandwidth (GB/s); all-reduce time is bytes * 2(t-1)/t / bus bandwidth."""

    name: str
    peak_tflops: float
    link_gbps: float
    link_latency_us: float
    memory_gib: float
    efficiency: float = EFFICIENCY
    block_overhead_us: float = BLOCK_OVERHEAD_US


def ring_factor(world_size):
    """Bytes a ring all-reduce moves per rank, per byte of message: 2 (w - 1) / w (1 for a lone rank whose
    link is emulated, which moves the message once)."""
    return 2 * (world_size - 1) / world_size if world_size > 1 else 1.0


# Sources (peak = dense bf16 tensor throughput with fp32 accumulation):
# - RTX 4090: 165.2 TFLOP/s (waredb.com/processor/nvidia-geforce-rtx-4090). 20 GB/s: stock driver has no P2P
#   so NCCL stages PCIe 4.0 traffic through host memory (NVIDIA/nccl-tests#117, NVIDIA/nccl#814); a
#   P2P-patched driver reached ~25.9 GB/s on 4 cards (tinygrad/open-gpu-kernel-modules#36). 40 us: an
#   8-byte all-reduce on 8x4090 took ~42 us (NVIDIA/nccl#1530). 24 GiB.
# - A800: A100 silicon, 312 TFLOP/s (glennklockwood.com/garden/processors/A100); NVLink cut to 400 GB/s
#   bidirectional (aiwiki.ai/wiki/nvidia_a800); 150 GB/s bus bandwidth assumed from typical A100 results.
# - A100 SXM: 312 TFLOP/s; ~200-208 GB/s bus bandwidth measured on 8-GPU NVLink nodes (NVIDIA/nccl-tests#149,
#   #178).
# - H100 SXM: 989 TFLOP/s (NVIDIA H100 datasheet); 340 GB/s from NCCL's 348 us for a 64 MiB bf16 all-reduce
#   (4096 tokens x hidden 8192) on 8xH100, as reported by TokenWeave (arXiv 2505.11329).
# - NVLink latency 10 us: small all-reduces take a few us at 2 GPUs and grow with GPU count
#   (NVIDIA/nccl#1259); an order-of-magnitude assumption, negligible at prefill message sizes.
HARDWARE_PRESETS = {
    "rtx4090-pcie4": HardwareSpec("rtx4090-pcie4", 165.2, 20.0, 40.0, 24.0),
    "a800-nvlink": HardwareSpec("a800-nvlink", 312.0, 150.0, 10.0, 80.0),
    "a100-nvlink": HardwareSpec("a100-nvlink", 312.0, 200.0, 10.0, 80.0),
    "h100-nvlink": HardwareSpec("h100-nvlink", 989.0, 340.0, 10.0, 80.0),
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
