"""Measuring a prefill on a TP group: timed runs in step on every rank, and the overlap metrics of their
timelines (per-stream busy time, the achievable bound, the share of it ISO takes)."""

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .launch import max_over_ranks
from .timeline import Timeline, busy_ms


def device_name(device):
    """The machine a measurement ran on, as reports and calibration keys name it."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats=3):
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def quantiles(values):
    """(p50, p20, p80) of a list of numbers; a single value is its own quantiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=5, method="inclusive")  # the 20th, 40th, 60th, 80th percentiles
    return statistics.median(values), cuts[0], cuts[3]


def round_reductions(serial_ms, iso_ms):
    """Per-round reductions 1 - iso / serial of rounds run side by side (a ratio cancels the load they shared)."""
    return [1 - iso / serial for serial, iso in zip(serial_ms, iso_ms, strict=True)]


def traced_run(run_with_timeline, device):
    """One run started in step on every rank: (its output, the slowest rank's seconds, its intervals)."""
    dist.barrier()
    sync(device)
    timeline = Timeline(device)
    start = time.perf_counter()
    out = run_with_timeline(timeline)
    sync(device)
    return out, max_over_ranks(time.perf_counter() - start), timeline.intervals()


@dataclass(frozen=True)
class OverlapMetrics:
    """How much of the hideable communication ISO hid (ms are medians over the timed runs)."""

    compute_ms: float  # compute-stream busy time of the serial runs
    comm_ms: float  # comm-stream busy time of the serial runs (nan where no comm stream is timed)
    chunked_compute_ms: float  # compute-stream busy time of serial runs over ISO's chunks
    bound_ms: float  # max(chunked compute + tail, comm + head): no schedule of these chunks beats it
    head_ms: float  # ISO's first compute block, before which nothing can be communicated
    tail_ms: float  # ISO's last all-reduce, during which nothing can be computed
    reduction: float  # 1 - iso / serial
    overlap_efficiency: float  # (serial - iso) / (serial - bound)


def overlap_metrics(serial_ms, iso_ms, traces, *, has_comm) -> OverlapMetrics:
    """Per-stream busy time of the serial runs, the achievable bound, and the share of it ISO takes (medians
    over the timed runs). The bound is max(chunked compute + tail, comm + head) (see costmodel.predict), with
    the compute of the same chunks run serially, since chunking itself can change the amount of compute.

    traces: {"serial", "iso", "serial-chunks"} -> one list of timeline rows per timed run. has_comm: the
    prefill had a communicator; without comm rows in its serial runs (torch.distributed over NCCL exposes no
    stream to time) there is no bound.
    """

    def head(rows):  # the first chunk's first attention block: nothing can be communicated before it ends
        first = next(r for r in rows if r["stream"] == "compute")
        return first["end_ms"] - first["start_ms"]

    def tail(rows):  # the last all-reduce: nothing can be computed while it runs
        comm_rows = [r for r in rows if r["stream"] == "comm"]
        return comm_rows[-1]["end_ms"] - comm_rows[-1]["start_ms"] if comm_rows else 0.0

    compute_ms = statistics.median(busy_ms(rows, "compute") for rows in traces["serial"])
    comm_ms = statistics.median(busy_ms(rows, "comm") for rows in traces["serial"])
    chunked_compute_ms = statistics.median(busy_ms(rows, "compute") for rows in traces["serial-chunks"])
    head_ms = statistics.median(head(rows) for rows in traces["iso"])
    tail_ms = statistics.median(tail(rows) for rows in traces["iso"])
    if has_comm and not any(r["stream"] == "comm" for r in traces["serial"][0]):
        comm_ms = math.nan
    bound_ms = max(chunked_compute_ms + tail_ms, comm_ms + head_ms) if math.isfinite(comm_ms) else math.nan
    achievable = serial_ms - bound_ms
    gained = serial_ms - iso_ms
    return OverlapMetrics(compute_ms=compute_ms, comm_ms=comm_ms, chunked_compute_ms=chunked_compute_ms,
                          bound_ms=bound_ms, head_ms=head_ms, tail_ms=tail_ms, reduction=gained / serial_ms,
                          overlap_efficiency=gained / achievable if achievable > 0 else math.nan)
