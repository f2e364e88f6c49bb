"""``emulated``: a modelled interconnect around a real communicator, so overlap can be measured on machines
without one; and the link models it takes (presets from ``iso_kernels.hardware``, or derived from a ratio)."""

import math
import threading
import time
from dataclasses import dataclass

import torch

from .. import _ext
from ..hardware import HARDWARE_PRESETS, ring_factor
from .base import Communicator, PendingAllReduce


@dataclass(frozen=True)
class LinkModel:
    """A modelled interconnect: one all-reduce of ``nbytes`` over ``world_size`` ranks takes
    ``latency_s + 2 (w - 1) / w * nbytes / bus_bandwidth`` seconds (ring all-reduce traffic per rank)."""

    name: str
    latency_s: float
    bus_bandwidth: float  # bytes per second, as nccl-tests' "busbw"

    def seconds(self, nbytes: int, world_size: int) -> float:
        return self.latency_s + ring_factor(world_size) * nbytes / self.bus_bandwidth


def _datasheet_link(name, hardware):
    """The preset's NCCL all-reduce in its large-message regime (prefill messages are megabytes)."""
    latency_us, bus_gbps = max(HARDWARE_PRESETS[hardware].link("nccl").all_reduce.regimes)
    return LinkModel(name, latency_s=latency_us * 1e-6, bus_bandwidth=bus_gbps * 1e9)


# The links the cost model and the simulator assume (sources in iso_kernels.hardware.HARDWARE_PRESETS), so an
# emulated run and a simulated one describe one interconnect.
LINK_PRESETS = {
    "pcie4": _datasheet_link("pcie4", "rtx4090-pcie4"),  # PCIe 4.0 x16, no P2P: NCCL stages through host
    "a800-nvlink": _datasheet_link("a800-nvlink", "a800-nvlink"),
    "a100-nvlink": _datasheet_link("a100-nvlink", "a100-nvlink"),
    "h100-nvlink": _datasheet_link("h100-nvlink", "h100-nvlink"),
}


def link_for_ratio(ratio: float, compute_s: float, bytes_per_collective: int, collectives: int, world_size: int,
                   latency_s: float = 0.0) -> LinkModel:
    """A link whose total all-reduce time is ``ratio`` times ``compute_s`` for the given traffic."""
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be a positive number, got {ratio}")
    if compute_s <= 0 or collectives <= 0:
        raise ValueError("compute_s and collectives must be positive to derive a link from a ratio")
    per_collective = ratio * compute_s / collectives - latency_s
    if per_collective <= 0:
        raise ValueError(f"ratio {ratio} leaves no time for data once latency {latency_s}s is paid")
    return LinkModel(f"ratio:{ratio:g}", latency_s, ring_factor(world_size) * bytes_per_collective / per_collective)


@dataclass(frozen=True)
class LinkSpec:
    """What ``--link`` asks for: a ``fixed`` link (a preset), or all-reduces that take ``ratio`` times the
    prefill's compute time, a link known only once that is measured (``resolve``)."""

    fixed: LinkModel | None = None
    ratio: float | None = None

    def __str__(self) -> str:
        """The ``--link`` text this spec was parsed from."""
        return self.fixed.name if self.fixed is not None else f"ratio:{self.ratio:g}"

    def resolve(self, compute_s: float, bytes_per_collective: int, collectives: int,
                world_size: int) -> LinkModel:
        if self.fixed is not None:
            return self.fixed
        return link_for_ratio(self.ratio, compute_s, bytes_per_collective, collectives, world_size)


def parse_link(spec: str | None) -> LinkSpec | None:
    """``None``/"none" -> None (no emulated link); a preset name or "ratio:R" -> its LinkSpec."""
    if spec is None or spec == "none":
        return None
    if spec.startswith("ratio:"):
        try:
            ratio = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--link ratio must be a number, got {spec!r}") from None
        if not ratio > 0:
            raise ValueError(f"--link ratio must be positive, got {spec!r}")
        return LinkSpec(ratio=ratio)
    if spec not in LINK_PRESETS:
        raise ValueError(f"unknown link {spec!r}; choose one of {sorted(LINK_PRESETS)} or ratio:R")
    return LinkSpec(fixed=LINK_PRESETS[spec])


class EmulatedCommunicator(Communicator):
    """Wraps a real communicator; each all-reduce takes at least the ``LinkModel``'s time.

    The link is a FIFO like a real comm stream: a collective starts when it is issued or when the previous one
    ends, whichever is later. On CPU the wait sleeps (no busy loop) until the modelled end, while the real
    collective runs underneath. On GPU the modelled time occupies a dedicated comm stream (a timer kernel after
    the real collective), so compute on the default stream genuinely overlaps with it.
    ``virtual_world_size`` lets one process stand in for a TP group (e.g. a single GPU measuring TP=8 traffic).
    """

    name = "emulated"

    def __init__(self, inner: Communicator, link: LinkModel, *, virtual_world_size: int | None = None):
        self.inner = inner
        self.link = link
        self.group, self.rank, self.device = inner.group, inner.rank, inner.device
        self.world_size = inner.world_size
        self.traffic_world_size = virtual_world_size or inner.world_size
        self._link_free_at = 0.0
        self._lock = threading.Lock()
        self._comm_stream = None

    def modelled_seconds(self, tensor: torch.Tensor) -> float:
        return self.link.seconds(tensor.numel() * tensor.element_size(), self.traffic_world_size)

    def all_reduce_start(self, tensor: torch.Tensor, *, ready_flag: tuple[torch.Tensor, int, int] | None = None,
                         after: torch.cuda.Event | None = None) -> PendingAllReduce:
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

    def settle(self) -> None:
        self.inner.settle()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


def _cycles_for(nanoseconds, device):
    """torch.cuda._sleep counts clock cycles; without the extension's timer kernel, use the SM clock rate."""
    clock_khz = torch.cuda.get_device_properties(device).clock_rate
    return max(1, int(nanoseconds * clock_khz / 1e6))
