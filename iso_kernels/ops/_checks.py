"""Argument checks shared by the public ops: every error is a TypeError or ValueError that names the argument."""

import torch

# The dtypes every Triton kernel here loads and accumulates in fp32; fp64 and integers have no kernel path.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_names(dtypes):
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_tensor(name, t, *, ndim=None, layout="", dtypes=FLOAT_DTYPES):
    """TypeError unless ``t`` is a tensor; ValueError unless it has ``ndim`` dimensions (``layout`` names them in
    the message) and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D{' ' + layout if layout else ''}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be {_dtype_names(dtypes)}, got {t.dtype}")


def check_same_device(ref_name, ref, **tensors):
    """ValueError naming the first of ``tensors`` that is not on ``ref``'s device."""
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{name} device {t.device} must equal {ref_name} device {ref.device}")


def check_bshd(name, t):
    """An attention tensor: (batch, seqlen, heads, head_dim) with unit stride in head_dim."""
    check_tensor(name, t, ndim=4, layout="(batch, seqlen, heads, head_dim)")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last (head_dim) dimension, got {t.stride(-1)}")
