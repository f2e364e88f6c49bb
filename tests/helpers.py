"""Input builders and the tolerance rule shared by the op tests; the cost models the planning tests share."""

import dataclasses
import math

import torch

from iso_kernels import models, planning
from iso_kernels.hardware import HARDWARE_PRESETS

# Slack on top of "2x torch's own error", per dtype: covers reductions summed in another order.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def integer_valued(shape, dtype, *, low=1, high=16, generator=None):
    """Integer data so that sums are exact in every dtype and any summation order (collective tests)."""
    return torch.randint(low, high, shape, generator=generator).to(dtype)


def assert_close_to_ref(out, ref, torch_out, *, name="output"):
    """Tolerance rule: max|out - ref| <= 2 * max|torch_out - ref| + atol(dtype).

    ``ref`` is the fp32 oracle, ``torch_out`` the same computation done by PyTorch in the kernel's dtype.
    On failure prints the mismatch count and the first offending indices.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: contains NaN/Inf"
    err = (out.double() - ref.double()).abs()
    torch_err = (torch_out.double() - ref.double()).abs().max().item()
    bound = 2 * torch_err + ATOL[out.dtype]
    if err.max().item() > bound:
        bad = (err > bound).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} > bound {bound:.3e} (torch's own error {torch_err:.3e});"
            f" {(err > bound).sum().item()} of {err.numel()} elements off, first at {bad}"
        )
    assert_comparison_can_fail(ref, bound, name=name)


def assert_comparison_can_fail(ref, bound, *, name="output"):
    """The bound must stay well under the reference's scale: an output of zeros (or one off by half the
    largest reference value) has to fail it. Attention outputs over random V shrink like 1/sqrt(keys), so an
    absolute floor such as "mean |ref| > 5 atol" rejects every long bf16 case while this asks what matters."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert ref.numel() == 0 or bound < 0.5 * scale, (
        f"{name}: bound {bound:.3e} is not below half the reference's largest value {scale:.3e}, "
        f"so a wrong output could pass"
    )


def window_mask(q_len, kv_len, q_start, causal, window_size):
    """(q_len, kv_len) bool, True where query i, at position ``q_start + i`` (None: kv_len - q_len, bottom-right),
    may see key j: ``position - left <= j <= position + right`` for ``window_size = (left, right)`` (-1:
    unbounded), and ``j <= position`` with causal. The attention tests' oracle mask, written here from the
    documented convention rather than taken from the library."""
    q_start = kv_len - q_len if q_start is None else q_start
    left, right = window_size
    position = torch.arange(q_len)[:, None] + q_start
    key = torch.arange(kv_len)[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        mask &= key <= position
    if left >= 0:
        mask &= key >= position - left
    if right >= 0:
        mask &= key <= position + right
    return mask


# The tiny Hugging Face checkpoints of conftest.hf_checkpoints
HF_SEQ_LEN, HF_BATCH, HF_DECODE_STEPS = 37, 2, 3  # 37: not a multiple of any block size
HF_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32, "rope_theta": 500000.0}
HF_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)


# --- planning (tests/planning): cost models written in the tests ---
def toy_costs():
    """attn(n, p) = 1 + n(p + (n+1)/2); mlp(n) = n; all_reduce(b) = 1 + b: small integers, checkable by hand."""
    return planning.LayerCosts(attn_fixed=1, attn_per_token=0, attn_per_pair=1, mlp_fixed=0, mlp_per_token=1,
                               ar_latency=1, ar_bandwidth=1)


def unit_shape(n_layers, batch=1):
    """A prefill whose all-reduce bytes equal its tokens per sequence times ``batch``, so that ar_bandwidth
    reads as tokens per second."""
    return planning.PrefillShape(n_layers, hidden=1, batch=batch, dtype_bytes=1)


def published_shape(name):
    """The cost model's shape of a published checkpoint of ``iso_kernels.models`` (e.g. "llama2-70b")."""
    return planning.model_shape(models.config(name))


def preset(gpu, *, link_gbps=None, link_latency_us=None, **fields):
    """The hardware preset ``gpu`` with ``fields`` replaced, behind a what-if one-regime NCCL link where
    ``link_gbps`` or ``link_latency_us`` is given (``HardwareSpec.with_link``)."""
    spec = dataclasses.replace(HARDWARE_PRESETS[gpu], **fields)
    if link_gbps is None and link_latency_us is None:
        return spec
    return spec.with_link(bus_gbps=link_gbps, latency_us=link_latency_us)


# docs/cost-model.md's reference numbers assume GEMMs and attention at 70 % of peak, no fixed costs, no memory
# traffic and no all-reduce latency.
REFERENCE_ASSUMPTIONS = dict(gemm_efficiency=0.7, attention_efficiency=0.7, layer_fixed_us=0.0, hbm_gbps=math.inf,
                             link_latency_us=0.0)


def datasheet_costs(gpu, tp, shape="llama2-70b", **overrides):
    """The costs of ``shape`` (a published model's name or a ModelShape) over ``tp`` ranks of the hardware
    preset ``gpu``, with ``overrides`` as ``preset`` takes them."""
    shape = published_shape(shape) if isinstance(shape, str) else shape
    return planning.LayerCosts.from_datasheet(shape, preset(gpu, **overrides), tp)
