"""The overlap metrics of a prefill's timelines (``metrics.overlap_metrics``), on synthetic traces."""

import math

import pytest

from iso_kernels.metrics import overlap_metrics


def rows(*spans):
    """Timeline rows from (stream, start_ms, end_ms)."""
    return [dict(stream=stream, kind="x", chunk=0, layer=0, start_ms=start, end_ms=end) for stream, start, end in spans]


# Serial: compute 0-40, comm 40-70 (busy 40 / 30). Serial over the ISO chunks: compute 44 ms in total.
# ISO: the first attention block takes 5 ms, the last all-reduce 6 ms.
SERIAL = [rows(("compute", 0, 40), ("comm", 40, 70)), rows(("compute", 0, 42), ("comm", 42, 72)),
          rows(("compute", 0, 38), ("comm", 38, 70))]
SERIAL_CHUNKS = [rows(("compute", 0, 20), ("compute", 20, 44))] * 3
ISO = [rows(("compute", 0, 5), ("comm", 5, 20), ("compute", 5, 44), ("comm", 44, 50))] * 3


def test_bound_and_efficiency():
    m = overlap_metrics(100.0, 70.0, {"serial": SERIAL, "serial-chunks": SERIAL_CHUNKS, "iso": ISO}, has_comm=True)
    assert (m.compute_ms, m.comm_ms, m.chunked_compute_ms) == (40, 30, 44)
    assert (m.head_ms, m.tail_ms) == (5, 6)
    assert m.bound_ms == max(44 + 6, 30 + 5) == 50
    assert m.reduction == pytest.approx(0.3)
    assert m.overlap_efficiency == pytest.approx((100 - 70) / (100 - 50))


def test_comm_bound_and_no_achievable_gain():
    slow_comm = [rows(("compute", 0, 10), ("comm", 10, 110))] * 3
    m = overlap_metrics(110.0, 112.0, {"serial": slow_comm, "serial-chunks": SERIAL_CHUNKS, "iso": ISO},
                        has_comm=True)
    assert m.bound_ms == 100 + 5
    assert m.reduction == pytest.approx(-2 / 110)
    assert m.overlap_efficiency == pytest.approx(-2 / 5)
    m = overlap_metrics(40.0, 45.0, {"serial": slow_comm, "serial-chunks": SERIAL_CHUNKS, "iso": ISO},
                        has_comm=True)
    assert math.isnan(m.overlap_efficiency)  # the bound is above serial: nothing to achieve


def test_no_comm_stream_to_time_gives_no_bound():
    untimed = [rows(("compute", 0, 40))] * 3
    m = overlap_metrics(100.0, 90.0, {"serial": untimed, "serial-chunks": SERIAL_CHUNKS, "iso": ISO},
                        has_comm=True)
    assert math.isnan(m.comm_ms) and math.isnan(m.bound_ms) and math.isnan(m.overlap_efficiency)
    # without a communicator there is nothing to reduce: comm is 0 and the bound is the compute
    m = overlap_metrics(100.0, 90.0, {"serial": untimed, "serial-chunks": SERIAL_CHUNKS, "iso": ISO},
                        has_comm=False)
    assert m.comm_ms == 0 and m.bound_ms == 44 + 6
