"""torch.library.opcheck on the GEMM and norm custom ops (schema, fake, autograd registration, AOT dispatch),
on the CPU reference path and on the interpreted Triton path; and the package importing on a machine with
neither a GPU nor the interpreter."""

import os
import subprocess
import sys

import pytest
import torch

import iso_kernels.ops  # noqa: F401  (registers the ops)

BACKENDS = ["auto", "triton"]


def gemm_signal_cases(device):
    x = torch.randn(40, 24, device=device)
    weight = torch.randn(33, 24, device=device)
    signal = torch.zeros(3, dtype=torch.int32, device=device)
    return [(x, weight, None, 16), (x, weight, signal, 16), (x.half(), weight.half(), signal[:1], 64)]


def norm_cases(device):
    x = torch.randn(2, 5, 96, device=device)
    residual = torch.randn(2, 5, 96, device=device)
    weight = torch.randn(96, device=device)
    return [(x, residual, weight, 1e-6), (x.half(), residual.half(), weight, 1e-5)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_gemm_signal(backend, device, monkeypatch):
    monkeypatch.setenv("ISO_KERNELS_BACKEND", backend)
    for args in gemm_signal_cases(device):
        torch.library.opcheck(torch.ops.iso_kernels.gemm_signal.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_norms(backend, device, monkeypatch):
    monkeypatch.setenv("ISO_KERNELS_BACKEND", backend)
    for x, residual, weight, eps in norm_cases(device):
        torch.library.opcheck(torch.ops.iso_kernels.add_rms_norm.default, (x, residual, weight, eps))
        torch.library.opcheck(torch.ops.iso_kernels.rms_norm.default, (x, weight, eps))


def test_ops_run_without_gpu_or_interpreter():
    """A plain CPU process (no TRITON_INTERPRET, no CUDA) imports the ops and runs their reference path."""
    script = (
        "import torch, iso_kernels.ops as ops\n"
        "x, w = torch.randn(20, 8), torch.randn(12, 8)\n"
        "s = torch.full((2,), 9, dtype=torch.int32)\n"
        "assert torch.allclose(ops.gemm_signal(x, w, s, rows_per_signal=16), x @ w.T, atol=1e-5)\n"
        "assert s.tolist() == [16 * 12, 4 * 12], s\n"
        "w8 = torch.rand(8) + 0.5\n"
        "def rms(h): return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w8\n"
        "out, res = ops.add_rms_norm(x, x, w8, 1e-6)\n"
        "assert torch.equal(res, x + x)\n"
        "assert torch.allclose(out, rms(x + x), atol=1e-5)\n"
        "assert torch.allclose(ops.rms_norm(x, w8, 1e-6), rms(x), atol=1e-5)\n"
        "import sys; assert 'triton_ops.gemm_signal' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ISO_KERNELS_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert result.returncode == 0, result.stderr
