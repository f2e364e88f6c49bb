"""Input builders and the tolerance rule shared by the op tests."""

import torch

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
    # Guard against a trivially small comparison: the values must be well above the tolerance.
    assert ref.abs().mean().item() > 5 * ATOL[out.dtype] or ref.numel() == 0, f"{name}: reference too small"
