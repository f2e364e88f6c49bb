"""The one interface the package uses to "start an all-reduce now, wait for it later".

Backends:
  ``torch``     torch.distributed with async work handles (gloo on CPU, NCCL on GPU);
  ``nccl-ext``  the native extension: NCCL on its own comm stream, flag-triggered starts (``native_comm``);
  ``emulated``  wraps a real backend and makes each all-reduce take at least ``latency + bytes / bandwidth``,
                so overlap can be measured on machines without a real interconnect.
``make_communicator("auto")`` picks ``nccl-ext`` when it can start, else says why and uses ``torch``.

Every all-reduce is an in-place sum. ``all_reduce_start`` returns a ``PendingAllReduce``; its ``wait()`` orders
the caller after the collective (on GPU without blocking the host) and returns the reduced tensor.

Failures: a backend whose collectives can fail without the host noticing (``nccl-ext``: a timed-out flag wait,
an NCCL asynchronous error) reports them only at ``settle()``, which every rank calls at the same point (after a
prefill); the ranks agree there (``agree_on_status``), so all of them raise the same error, having issued the
same collectives, and none is left waiting in one that a failed peer never issues.
"""

import math
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .costmodel import HARDWARE_PRESETS, ring_factor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "torch", "nccl-ext", "emulated")


class PendingAllReduce:
    """An all-reduce in flight. ``wait()`` returns the reduced tensor; ``interval`` its (start, end) once known.

    ``interval`` is in ``time.perf_counter()`` seconds on CPU; on GPU, backends that own their comm stream set
    ``events`` (CUDA events at the collective's start and end) instead.
    """

    def __init__(self, tensor, wait_fn):
        self.tensor = tensor
        self._wait_fn = wait_fn
        self._done = False
        self.interval = None
        self.events = None

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._wait_fn()
            self._done = True
        return self.tensor


def group_device(group=None):
    """Where ``group``'s collectives run: the current CUDA device when it has NCCL and a GPU is visible,
    else the CPU (gloo; also a mixed "cpu:gloo,cuda:nccl" group on a machine without GPUs)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("communicator needs torch.distributed initialised (init_process_group)")
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Communicator:
    """Base class: a tensor-parallel group and the validation every backend shares."""

    name = "base"

    def __init__(self, group=None, *, world_size=None):
        self.device = group_device(group)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if world_size is not None and world_size != self.world_size:
            raise ValueError(f"world_size={world_size} does not match the process group's size {self.world_size}")

    def _check_tensor(self, tensor, name="tensor"):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {SUPPORTED_DTYPES}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the collective works on its storage in place)")
        if tensor.device.type != self.device.type:
            raise ValueError(f"{name} is on {tensor.device}, but the {self.name} communicator works on {self.device}")

    supports_ready_flag = False  # True where a collective can start from a device flag before its producer ends

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None) -> PendingAllReduce:
        """Start an in-place sum of ``tensor``. ``ready_flag=(signal, index, target)``: the data is complete
        once ``signal[index] >= target``; ``after``: a CUDA event, recorded before the producer, that the
        collective may wait for instead of everything on the caller's stream (flag-capable backends only)."""
        raise NotImplementedError

    def all_reduce(self, tensor) -> torch.Tensor:
        return self.all_reduce_start(tensor).wait()

    def settle(self):
        """Wait for every collective issued so far and raise, on every rank alike, if one failed on any rank.
        Collective: every rank of the group calls it at the same point. Here a no-op: torch's collectives raise
        through their own work handles and watchdog."""

    def close(self):
        pass

    def abort(self):
        """Tear down without waiting for peers (error paths)."""
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # After an exception peers may never match this rank's collectives: waiting for them could hang.
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class CommFailure(RuntimeError):
    """A communicator failed on one or more ranks; raised with the same text on every rank of the group.
    ``failures`` maps group rank -> cause."""

    def __init__(self, what, failures, world_size):
        self.failures = failures
        causes = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(failures.items()))
        super().__init__(f"{what} failed on {len(failures)} of {world_size} rank(s): {causes}")


def agree_on_status(local_error, group=None, *, what="the communicator"):
    """Collective: share whether this rank failed (``local_error``: its cause, or None) and raise one
    ``CommFailure`` naming every failed rank and its cause on every rank of ``group`` if any failed.

    Costs one all-reduce of one integer when no rank failed (an all-gather of the causes only when one did);
    works on any torch.distributed backend (gloo on CPU).
    """
    failed = torch.tensor([local_error is not None], dtype=torch.int32, device=group_device(group))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if not failed.item():
        return
    world_size = dist.get_world_size(group)
    causes = [None] * world_size
    dist.all_gather_object(causes, local_error, group=group)
    raise CommFailure(what, {rank: cause for rank, cause in enumerate(causes) if cause is not None}, world_size)


class TorchCommunicator(Communicator):
    """torch.distributed async all-reduce. On NCCL, ``work.wait()`` makes the current stream wait (no host
    block) and ProcessGroupNCCL keeps the tensor alive until the collective ends; on gloo the collective runs
    on gloo's own thread and ``wait()`` blocks the host."""

    name = "torch"

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        self._check_tensor(tensor)
        if ready_flag is not None:
            # torch.distributed cannot start a collective from a device flag: wait for the whole producer.
            signal, index, target = ready_flag
            _check_ready_flag(signal, index, target)
        start = time.perf_counter()
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        pending = PendingAllReduce(tensor, work.wait)
        if tensor.device.type == "cpu":
            # The future completes on gloo's thread: that is when the wire went quiet, not when we waited.
            def finished(_future):
                pending.interval = (start, time.perf_counter())

            work.get_future().add_done_callback(finished)
        return pending


@dataclass(frozen=True)
class LinkModel:
    """A modelled interconnect: one all-reduce of ``nbytes`` over ``world_size`` ranks takes
    ``latency_s + 2 (w - 1) / w * nbytes / bus_bandwidth`` seconds (ring all-reduce traffic per rank)."""

    name: str
    latency_s: float
    bus_bandwidth: float  # bytes per second, as nccl-tests' "busbw"

    def seconds(self, nbytes, world_size):
        return self.latency_s + ring_factor(world_size) * nbytes / self.bus_bandwidth


def _datasheet_link(name, hardware):
    spec = HARDWARE_PRESETS[hardware]
    return LinkModel(name, latency_s=spec.link_latency_us * 1e-6, bus_bandwidth=spec.link_gbps * 1e9)


# The same links the cost model and the simulator assume (sources in iso_kernels.costmodel.HARDWARE_PRESETS),
# so an emulated run and a simulated one describe one interconnect.
LINK_PRESETS = {
    "pcie4": _datasheet_link("pcie4", "rtx4090-pcie4"),  # PCIe 4.0 x16, no P2P: NCCL stages through host
    "a800-nvlink": _datasheet_link("a800-nvlink", "a800-nvlink"),
    "a100-nvlink": _datasheet_link("a100-nvlink", "a100-nvlink"),
    "h100-nvlink": _datasheet_link("h100-nvlink", "h100-nvlink"),
}


def link_for_ratio(ratio, compute_s, bytes_per_collective, collectives, world_size, latency_s=0.0):
    """A link whose total all-reduce time is ``ratio`` times ``compute_s`` for the given traffic."""
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be a positive number, got {ratio}")
    if compute_s <= 0 or collectives <= 0:
        raise ValueError("compute_s and collectives must be positive to derive a link from a ratio")
    per_collective = ratio * compute_s / collectives - latency_s
    if per_collective <= 0:
        raise ValueError(f"ratio {ratio} leaves no time for data once latency {latency_s}s is paid")
    return LinkModel(f"ratio:{ratio:g}", latency_s, ring_factor(world_size) * bytes_per_collective / per_collective)


class EmulatedCommunicator(Communicator):
    """Wraps a real communicator; each all-reduce takes at least the ``LinkModel``'s time.

    The link is a FIFO like a real comm stream: a collective starts when it is issued or when the previous one
    ends, whichever is later. On CPU the wait sleeps (no busy loop) until the modelled end, while the real
    collective runs underneath. On GPU the modelled time occupies a dedicated comm stream (a timer kernel after
    the real collective), so compute on the default stream genuinely overlaps with it.
    ``virtual_world_size`` lets one process stand in for a TP group (e.g. a single GPU measuring TP=8 traffic).
    """

    name = "emulated"

    def __init__(self, inner: Communicator, link: LinkModel, *, virtual_world_size=None):
        self.inner = inner
        self.link = link
        self.group, self.rank, self.device = inner.group, inner.rank, inner.device
        self.world_size = inner.world_size
        self.traffic_world_size = virtual_world_size or inner.world_size
        self._link_free_at = 0.0
        self._lock = threading.Lock()
        self._comm_stream = None

    def set_link(self, link: LinkModel):
        self.link = link

    def modelled_seconds(self, tensor):
        return self.link.seconds(tensor.numel() * tensor.element_size(), self.traffic_world_size)

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        self._check_tensor(tensor)
        if tensor.is_cuda:
            return self._start_cuda(tensor, ready_flag)
        # The real collective reduces a copy, delivered into ``tensor`` only at wait(): as on a real link, the
        # result does not exist before the modelled end, so a schedule that reads it early sees partial sums.
        staging = tensor.clone() if self.world_size > 1 else None
        inner = self.inner.all_reduce_start(staging) if staging is not None else None
        with self._lock:
            begin = max(time.perf_counter(), self._link_free_at)
            end = begin + self.modelled_seconds(tensor)
            self._link_free_at = end

        def wait():
            remaining = end - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
            if inner is not None:
                tensor.copy_(inner.wait())

        pending = PendingAllReduce(tensor, wait)
        pending.interval = (begin, end)
        return pending

    def _start_cuda(self, tensor, ready_flag):
        from . import _ext

        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream(device=tensor.device)
        caller = torch.cuda.current_stream(tensor.device)
        self._comm_stream.wait_stream(caller)
        started, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._comm_stream):
            started.record()
            if self.world_size > 1:
                self.inner.all_reduce_start(tensor, ready_flag=ready_flag).wait()
            nanoseconds = int(self.modelled_seconds(tensor) * 1e9)
            native = _ext.load()
            if native is not None:
                native.stream_sleep(self._comm_stream.cuda_stream, nanoseconds)
            else:
                torch.cuda._sleep(_cycles_for(nanoseconds, tensor.device))
            done.record()
        tensor.record_stream(self._comm_stream)
        pending = PendingAllReduce(tensor, lambda: torch.cuda.current_stream(tensor.device).wait_event(done))
        pending.events = (started, done)
        return pending

    def settle(self):
        self.inner.settle()

    def close(self):
        self.inner.close()

    def abort(self):
        self.inner.abort()


def _cycles_for(nanoseconds, device):
    """torch.cuda._sleep counts clock cycles; without the extension's timer kernel, use the SM clock rate."""
    clock_khz = torch.cuda.get_device_properties(device).clock_rate
    return max(1, int(nanoseconds * clock_khz / 1e6))


def _check_ready_flag(signal, index, target):
    if not isinstance(signal, torch.Tensor) or signal.dtype != torch.int32:
        raise ValueError("ready_flag[0] (signal) must be an int32 tensor")
    if not 0 <= index < signal.numel():
        raise ValueError(f"ready_flag[1] (index) {index} is outside signal of length {signal.numel()}")
    if target <= 0:
        raise ValueError(f"ready_flag[2] (target) must be positive, got {target}")


def parse_link(spec):
    """``None``/"none" -> None; a preset name -> LinkModel; "ratio:R" -> the float R (resolved later against
    measured compute with ``link_for_ratio``)."""
    if spec is None or spec == "none":
        return None
    if spec.startswith("ratio:"):
        try:
            ratio = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--link ratio must be a number, got {spec!r}") from None
        if not ratio > 0:
            raise ValueError(f"--link ratio must be positive, got {spec!r}")
        return ratio
    if spec not in LINK_PRESETS:
        raise ValueError(f"unknown link {spec!r}; choose one of {sorted(LINK_PRESETS)} or ratio:R")
    return LINK_PRESETS[spec]


def make_communicator(backend="auto", group=None, *, world_size=None, link=None, virtual_world_size=None,
                      verbose=True):
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
        from .native_comm import NcclExtCommunicator, agreed_unavailable_reason

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
