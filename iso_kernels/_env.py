"""Runtime switches: which implementation an op runs, and whether Triton is being interpreted.

``ISO_KERNELS_BACKEND``:
  ``auto``   (default) Triton kernels for CUDA tensors, PyTorch references for everything else;
  ``triton`` Triton kernels always (CPU tensors need ``TRITON_INTERPRET=1``, which is how the tests run them);
  ``torch``  PyTorch references always.
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    value = os.environ.get("ISO_KERNELS_BACKEND", "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"ISO_KERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when an op on ``tensor`` should run its Triton kernel rather than its reference."""
    chosen = backend()
    if chosen == "torch":
        return False
    if chosen == "triton":
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                "ISO_KERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before import"
            )
        return True
    return tensor.is_cuda
