"""iso_kernels/timeline.py: spans on the host clock, all-reduce intervals from pending handles, Chrome trace and
Gantt export."""

import json
import time
import types

import pytest

from iso_kernels.timeline import Timeline, busy_ms, chrome_trace, plot_gantt, write_chrome_trace


def test_spans_and_all_reduce_intervals_in_ms_since_creation():
    timeline = Timeline("cpu")
    start = time.perf_counter()
    with timeline.span("attn", chunk=1, layer=3):
        time.sleep(0.01)
    now = time.perf_counter()
    timeline.comm(types.SimpleNamespace(interval=(now, now + 0.002)), "ar1", chunk=1, layer=3)
    timeline.comm(types.SimpleNamespace(), "ar2", chunk=1, layer=3)  # a handle that timed nothing: no row
    compute, comm = timeline.intervals()
    assert (compute["stream"], compute["kind"], compute["chunk"], compute["layer"]) == ("compute", "attn", 1, 3)
    assert 0 <= compute["start_ms"] <= 1e3 * (time.perf_counter() - start)
    assert compute["end_ms"] - compute["start_ms"] >= 10
    assert comm["kind"] == "all-reduce ar1" and comm["end_ms"] - comm["start_ms"] == pytest.approx(2.0)


ROWS = [dict(stream="compute", kind="attn", chunk=0, layer=0, start_ms=0.0, end_ms=2.0),
        dict(stream="comm", kind="all-reduce ar1", chunk=0, layer=0, start_ms=2.0, end_ms=5.0),
        dict(stream="compute", kind="mlp", chunk=1, layer=0, start_ms=2.0, end_ms=3.5)]


def test_busy_time_per_stream():
    assert busy_ms(ROWS, "compute") == pytest.approx(3.5) and busy_ms(ROWS, "comm") == pytest.approx(3.0)


def test_chrome_trace_has_a_process_per_lane_and_a_thread_per_stream(tmp_path):
    lanes = {("iso", 1): ROWS, ("iso", 0): ROWS[:1]}
    path = tmp_path / "trace.json"
    write_chrome_trace(path, lanes)
    events = json.loads(path.read_text())["traceEvents"]
    assert events == chrome_trace(lanes)["traceEvents"]
    names = [e["args"]["name"] for e in events if e["name"] == "process_name"]
    assert names == ["iso rank 0", "iso rank 1"]
    spans = [e for e in events if e["ph"] == "X" and e["pid"] == 1]
    assert [(e["name"], e["tid"], e["ts"], e["dur"]) for e in spans] == [
        ("attn c0", 0, 0.0, 2000.0), ("all-reduce ar1 c0", 1, 2000.0, 3000.0), ("mlp c1", 0, 2000.0, 1500.0)]


def test_gantt_chart_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gantt.png"
    plot_gantt(path, {("serial", 0): ROWS})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
