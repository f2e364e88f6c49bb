"""add_rms_norm / rms_norm: the Triton kernel (interpreted on CPU) and the CPU kernel against a plain fp64
RMSNorm written here and against the reference; leading dimensions, strided rows, mixed weight dtype; opcheck;
bad inputs."""

import pytest
import torch

from iso_kernels.ops import add_rms_norm, rms_norm
from iso_kernels.reference import add_rms_norm_ref, rms_norm_ref

from helpers import assert_close_to_ref

# Hidden sizes are not powers of two (the kernel's block is the next one) except 128; 1 is the degenerate row.
SHAPES = [(1, 96), (2, 17, 200), (5, 128), (3, 1000), (7, 1)]
DTYPES = [torch.float32, torch.float16]
# The Triton kernel and each op's CPU kernel (the reference, so checked against the fp64 oracle only).
BACKENDS = ["triton", "torch"]
GPU_SHAPES = [(4, 1024, 4096), (2048, 8192), (3, 5, 5120)]
EPS = 1e-6


def plain_rms_norm(h, weight, eps, dtype=torch.float64):
    """The oracle: textbook RMSNorm in fp64; in the input's dtype, the error scale of the tolerance rule
    (written here, so that a broken reference cannot widen its own tolerance)."""
    h = h.to(dtype)
    return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)).to(h.dtype)


def make_inputs(shape, dtype, device, weight_dtype=None):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(weight_dtype or dtype)
    return x, residual, weight


def check_add_rms_norm(x, residual, weight, backend="triton"):
    out, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(new_residual, x + residual), "new residual must be the dtype-rounded sum"
    torch_out = plain_rms_norm(x + residual, weight, EPS, dtype=x.dtype)
    assert out.dtype == x.dtype and out.is_contiguous() and new_residual.is_contiguous()
    assert_close_to_ref(out, plain_rms_norm(x + residual, weight, EPS), torch_out, name="vs plain RMSNorm")
    if backend == "triton" or x.is_cuda:  # else the op is the reference: comparing them could not fail
        assert_close_to_ref(out, add_rms_norm_ref(x, residual, weight, EPS)[0], torch_out, name="vs reference")


def check_rms_norm(x, weight, backend="triton"):
    out = rms_norm(x, weight, EPS)
    torch_out = plain_rms_norm(x, weight, EPS, dtype=x.dtype)
    assert_close_to_ref(out, plain_rms_norm(x, weight, EPS), torch_out, name="vs plain RMSNorm")
    if backend == "triton" or x.is_cuda:
        assert_close_to_ref(out, rms_norm_ref(x, weight, EPS), torch_out, name="vs reference")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm(shape, dtype, backend, device):
    x, residual, weight = make_inputs(shape, dtype, device)
    check_add_rms_norm(x, residual, weight, backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype, backend, device):
    x, _, weight = make_inputs(shape, dtype, device)
    check_rms_norm(x, weight, backend)


def test_fp32_weight_with_fp16_input(device, triton_backend):
    x, residual, weight = make_inputs((2, 17, 200), torch.float16, device, weight_dtype=torch.float32)
    check_add_rms_norm(x, residual, weight)


def test_strided_rows(device, triton_backend):
    """Rows with a stride > hidden go in as a view; leading dims that cannot flatten into one stride are
    copied first. Both must give the same answer as contiguous inputs."""
    hidden = 96
    wide = torch.randn(2, 17, 2 * hidden, device=device)
    x, residual = wide[..., :hidden], wide[..., hidden:]
    weight = torch.randn(hidden, device=device)
    check_add_rms_norm(x, residual, weight)
    check_rms_norm(x, weight)
    every_other = torch.randn(2, 34, hidden, device=device)[:, ::2]
    check_add_rms_norm(every_other, residual, weight)


def test_empty_rows(device, triton_backend):
    x, residual, weight = make_inputs((0, 96), torch.float32, device)
    out, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert out.shape == new_residual.shape == (0, 96)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend, device):
    """Schema, fake, autograd registration and AOT dispatch of both custom ops, fp32 and fp16."""
    for dtype in (torch.float32, torch.float16):
        x, residual, weight = make_inputs((2, 5, 96), dtype, device, weight_dtype=torch.float32)
        torch.library.opcheck(torch.ops.iso_kernels.add_rms_norm.default, (x, residual, weight, 1e-6))
        torch.library.opcheck(torch.ops.iso_kernels.rms_norm.default, (x, weight, 1e-5))


def test_bad_inputs(device):
    x, residual, weight = make_inputs((4, 96), torch.float32, device)
    cases = [
        ((x, residual[:, :95], weight, EPS), "residual"),
        ((x, residual.half(), weight, EPS), "residual"),
        ((x, residual.to("meta"), weight, EPS), "residual"),
        ((x, residual, weight[:95], EPS), "weight"),
        ((x, residual, weight[None], EPS), "weight"),
        ((x, residual, weight.to(torch.int32), EPS), "weight"),
        ((x, residual, torch.stack([weight, weight], dim=1)[:, 0], EPS), "weight"),  # strided
        ((x.double(), residual.double(), weight, EPS), "x"),
        ((x.to(torch.int32), residual.to(torch.int32), weight, EPS), "x"),
        ((x.t(), residual.t(), weight[:4], EPS), "x"),
        ((x[:, :0], residual[:, :0], weight[:0], EPS), "x"),
        ((x, residual, weight, -1e-6), "eps"),
        ((x, residual, weight, float("nan")), "eps"),
        ((x, residual, weight, None), "eps"),
    ]
    add_rms_norm(x, residual, weight, EPS)  # the cases differ from this in one thing
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            add_rms_norm(*args)
    with pytest.raises(ValueError, match="x"):
        rms_norm(torch.zeros(2, 40000, device=device), torch.ones(40000, device=device), EPS)
    with pytest.raises(TypeError, match="residual"):
        add_rms_norm(x, None, weight, EPS)
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, weight.tolist(), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_norms_gpu(shape, dtype):
    x, residual, weight = make_inputs(shape, dtype, "cuda")
    check_add_rms_norm(x, residual, weight)
    check_rms_norm(x, weight)
