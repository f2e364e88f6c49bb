"""The two-stream event simulation (``planning.simulation``): schedules checked by hand, the fast evaluation
against the event walk, the bound of ``predict``, and the inputs it rejects."""

import numpy as np
import pytest

from iso_kernels.planning import LayerCosts, PrefillShape, predict, simulate_prefill
from iso_kernels.planning.simulation import total_times
from iso_kernels.split import ChunkSplit

from helpers import datasheet_costs, toy_costs, unit_shape


# --- simulation, checked by hand ---
def test_simulate_toy_by_hand():
    # Chunks [0,2) and [2,4): attn 4 and 8, mlp 2 and 2, every all-reduce 1 + 2 = 3.
    # Layer 0  compute: attnA 0-4, attnB 4-12, mlpA 12-14 (ARA1 ended 7), mlpB 15-17 (waits ARB1 12-15)
    #          comm:    ARA1 4-7, ARB1 12-15, ARA2 15-18, ARB2 18-21
    # Layer 1  attnA 18-22 (waits ARA2), ARA1 22-25, attnB 22-30, ARB1 30-33, mlpA 30-32, ARA2 33-36,
    #          mlpB 33-35 (waits ARB1), ARB2 36-39.
    costs = toy_costs()
    one = simulate_prefill(costs, unit_shape(1), ChunkSplit((2, 4)), record=True)
    assert (one.total_s, one.compute_s, one.comm_s) == (21, 16, 12)
    spans = {(iv.stream, iv.chunk, iv.kind): (iv.start, iv.end) for iv in one.intervals}
    assert spans[("compute", 0, "mlp")] == (12, 14)
    assert spans[("compute", 1, "mlp")] == (15, 17)
    assert spans[("comm", 1, "ar2")] == (18, 21)
    assert len(one.intervals) == 8
    assert simulate_prefill(costs, unit_shape(2), ChunkSplit((2, 4))).total_s == 39
    # Serial: attn 1 + 4*2.5 = 11, AR 5, mlp 4, AR 5.
    serial = simulate_prefill(costs, unit_shape(1), ChunkSplit((4,)))
    assert (serial.total_s, serial.compute_s, serial.comm_s) == (25, 15, 10)


def test_predict_bound_by_hand():
    # [2,4], one layer: compute 16 + tail (ARB2) 3 = 19; head (attnA) 4 + comm 12 = 16.
    p = predict(toy_costs(), unit_shape(1), ChunkSplit((2, 4)))
    assert p.split == ChunkSplit((2, 4))
    assert (p.serial_s, p.iso_s, p.bound_s) == (25, 21, 19)
    assert p.reduction == pytest.approx(1 - 21 / 25)
    assert p.bound_reduction == pytest.approx(1 - 19 / 25)


@pytest.mark.parametrize("n_layers", [1, 3, 80])
def test_fast_evaluation_equals_event_simulation(n_layers):
    rng = np.random.default_rng(n_layers)
    shape = PrefillShape(n_layers, hidden=3, batch=2, dtype_bytes=2)
    for _ in range(20):
        costs = LayerCosts(*rng.uniform(0, 1, 5), rng.uniform(0, 1), rng.uniform(0.5, 5))
        k = int(rng.integers(1, 5))
        ends = sorted(rng.choice(np.arange(1, 200), size=k - 1, replace=False).tolist()) + [200]
        fast = total_times(costs, shape, np.array([ends]))[0]
        slow = simulate_prefill(costs, shape, ChunkSplit(tuple(ends))).total_s
        assert fast == pytest.approx(slow, rel=1e-12)


def test_no_communication_means_no_gain():
    costs = datasheet_costs("a800-nvlink", 1)
    sim = simulate_prefill(costs, PrefillShape(80, hidden=8192, dtype_bytes=2), ChunkSplit((2048, 4096)))
    assert sim.comm_s == 0 and sim.total_s == pytest.approx(sim.compute_s)


# --- bad input: the split validates itself (ChunkSplit), the shape its sizes (PrefillShape) ---
@pytest.mark.parametrize("call,match", [
    (lambda: simulate_prefill(toy_costs(), unit_shape(1), ChunkSplit((3, 2, 4))), "split"),
    (lambda: simulate_prefill(toy_costs(), unit_shape(1), ChunkSplit((0, 4))), "split"),
    (lambda: simulate_prefill(toy_costs(), unit_shape(1), ChunkSplit(())), "split"),
    (lambda: simulate_prefill(toy_costs(), unit_shape(0), ChunkSplit((4,))), "n_layers"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="chunk ends"):
        simulate_prefill(toy_costs(), unit_shape(1), ChunkSplit((4.0,)))
    with pytest.raises(TypeError, match="hidden"):
        PrefillShape(1, hidden=64.0)
