"""The one interface the package uses to "start an all-reduce now, wait for it later".

Backends, one module each:
  ``torch``     (``torch_dist``) torch.distributed with async work handles (gloo on CPU, NCCL on GPU);
  ``nccl-ext``  (``nccl_ext``) the native extension: NCCL on its own comm stream, flag-triggered starts;
  ``emulated``  (``emulated``) wraps a real backend and makes each all-reduce take at least
                ``latency + bytes / bandwidth``, so overlap can be measured on machines without a real
                interconnect.
``make_communicator("auto")`` picks ``nccl-ext`` when it can start, else says why and uses ``torch``.
Imports run one way: ``base`` <- the backends <- this factory.

Every all-reduce is an in-place sum. ``all_reduce_start`` returns a ``PendingAllReduce``; its ``wait()`` orders
the caller after the collective (on GPU without blocking the host) and returns the reduced tensor.

Failures: a backend whose collectives can fail without the host noticing (``nccl-ext``: a timed-out flag wait,
an NCCL asynchronous error) reports them only at ``settle()``, which every rank calls at the same point (after a
prefill); the ranks agree there (``agree_on_status``), so all of them raise the same error, having issued the
same collectives, and none is left waiting in one that a failed peer never issues.
"""

import warnings

import torch.distributed as dist

from .base import SUPPORTED_DTYPES, CommFailure, Communicator, PendingAllReduce, agree_on_status, group_device
from .emulated import LINK_PRESETS, EmulatedCommunicator, LinkModel, LinkSpec, link_for_ratio, parse_link
from .nccl_ext import NcclExtCommunicator, agreed_unavailable_reason
from .torch_dist import TorchCommunicator

__all__ = [
    "BACKENDS", "LINK_PRESETS", "SUPPORTED_DTYPES", "CommFailure", "Communicator", "EmulatedCommunicator",
    "LinkModel", "LinkSpec", "NcclExtCommunicator", "PendingAllReduce", "TorchCommunicator", "agree_on_status",
    "group_device", "link_for_ratio", "make_communicator", "parse_link",
]

BACKENDS = ("auto", "torch", "nccl-ext", "emulated")


def make_communicator(backend: str = "auto", group: dist.ProcessGroup | None = None, *, world_size: int | None = None,
                      link: LinkModel | None = None, virtual_world_size: int | None = None,
                      verbose: bool = True) -> Communicator:
    """Build the communicator for ``group``. Collective: every rank of ``group`` calls it.

    backend: "auto" (nccl-ext when it can start on every rank of ``group``, else torch on every rank), "torch",
    "nccl-ext" (raises on every rank when a rank cannot start it), or "emulated" (needs ``link``; wraps the
    auto choice). Passing ``link`` with another backend wraps that backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "emulated" and link is None:
        raise ValueError("backend='emulated' needs a link (a LinkModel)")
    real = "auto" if backend == "emulated" else backend
    if real in ("auto", "nccl-ext"):
        # One choice for the whole group: ranks on different backends would never meet in a collective.
        reason = agreed_unavailable_reason(group_device(group), group)
        if reason is None:
            comm = NcclExtCommunicator(group, world_size=world_size)
        elif real == "nccl-ext":
            raise RuntimeError(f"nccl-ext communicator cannot start: {reason}")
        else:
            if verbose and group_device(group).type == "cuda":
                warnings.warn(f"iso_kernels: using torch.distributed all-reduce ({reason})", stacklevel=2)
            comm = TorchCommunicator(group, world_size=world_size)
    else:
        comm = TorchCommunicator(group, world_size=world_size)
    if link is not None:
        comm = EmulatedCommunicator(comm, link, virtual_world_size=virtual_world_size)
    return comm
