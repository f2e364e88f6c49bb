"""Cost model and split solver: hand-checked schedules, the reference numbers of docs/cost-model.md, solver
regimes, fit and calibration cache."""

import dataclasses
import math
import time

import numpy as np
import pytest

from iso_kernels import costmodel as cm
from iso_kernels import envs
from iso_kernels.costmodel import (
    LayerCosts,
    balanced_split,
    choose_split,
    fit_layer_costs,
    load_calibration,
    predict,
    save_calibration,
    simulate_prefill,
)
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.simulate import PAPER_MODELS

SEQ_LENS = [1024, 2048, 4096, 8192]
# Two-chunk even-split reductions (%) of Llama-2-70B without fixed costs: docs/cost-model.md, reference numbers.
DOC_TWO_CHUNK = {
    ("rtx4090-pcie4", 4): [30.9, 31.3, 32.1, 33.6],
    ("rtx4090-pcie4", 8): [37.5, 37.7, 38.2, 39.1],
    ("a800-nvlink", 4): [14.2, 14.0, 13.8, 13.4],
    ("a800-nvlink", 8): [27.2, 27.3, 27.2, 26.5],
}
UNIT = {"hidden": 1, "dtype_bytes": 1}  # all-reduce bytes == tokens, so ar_bandwidth is "tokens per second"
LLAMA70 = PAPER_MODELS["llama2-70b"]


def toy_costs():
    """attn(n, p) = 1 + n(p + (n+1)/2); mlp(n) = n; all_reduce(b) = 1 + b."""
    return LayerCosts(attn_fixed=1, attn_per_token=0, attn_per_pair=1, mlp_fixed=0, mlp_per_token=1,
                      ar_latency=1, ar_bandwidth=1)


def datasheet(gpu, tp, shape=LLAMA70, **overrides):
    return LayerCosts.from_datasheet(shape, dataclasses.replace(HARDWARE_PRESETS[gpu], **overrides), tp)


def two_chunk_reduction(costs, shape, seq_len):
    kw = {"hidden": shape.hidden, "dtype_bytes": shape.dtype_bytes}
    return predict(costs, shape.n_layers, seq_len, [seq_len // 2, seq_len], **kw).reduction


# --- simulation, checked by hand ---
def test_simulate_toy_by_hand():
    # Chunks [0,2) and [2,4): attn 4 and 8, mlp 2 and 2, every all-reduce 1 + 2 = 3.
    # Layer 0  compute: attnA 0-4, attnB 4-12, mlpA 12-14 (ARA1 ended 7), mlpB 15-17 (waits ARB1 12-15)
    #          comm:    ARA1 4-7, ARB1 12-15, ARA2 15-18, ARB2 18-21
    # Layer 1  attnA 18-22 (waits ARA2), ARA1 22-25, attnB 22-30, ARB1 30-33, mlpA 30-32, ARA2 33-36,
    #          mlpB 33-35 (waits ARB1), ARB2 36-39.
    costs = toy_costs()
    one = simulate_prefill(costs, 1, 4, [2, 4], **UNIT, record=True)
    assert (one.total_s, one.compute_s, one.comm_s) == (21, 16, 12)
    spans = {(iv.stream, iv.chunk, iv.kind): (iv.start, iv.end) for iv in one.intervals}
    assert spans[("compute", 0, "mlp")] == (12, 14)
    assert spans[("compute", 1, "mlp")] == (15, 17)
    assert spans[("comm", 1, "ar2")] == (18, 21)
    assert len(one.intervals) == 8
    assert simulate_prefill(costs, 2, 4, [2, 4], **UNIT).total_s == 39
    # Serial: attn 1 + 4*2.5 = 11, AR 5, mlp 4, AR 5.
    serial = simulate_prefill(costs, 1, 4, [4], **UNIT)
    assert (serial.total_s, serial.compute_s, serial.comm_s) == (25, 15, 10)


def test_predict_bound_by_hand():
    # [2,4], one layer: compute 16 + tail (ARB2) 3 = 19; head (attnA) 4 + comm 12 = 16.
    p = predict(toy_costs(), 1, 4, [2, 4], **UNIT)
    assert (p.serial_s, p.iso_s, p.bound_s) == (25, 21, 19)
    assert p.reduction == pytest.approx(1 - 21 / 25)
    assert p.bound_reduction == pytest.approx(1 - 19 / 25)


@pytest.mark.parametrize("n_layers", [1, 3, 80])
def test_fast_evaluation_equals_event_simulation(n_layers):
    rng = np.random.default_rng(n_layers)
    for _ in range(20):
        costs = LayerCosts(*rng.uniform(0, 1, 5), rng.uniform(0, 1), rng.uniform(0.5, 5))
        k = int(rng.integers(1, 5))
        ends = sorted(rng.choice(np.arange(1, 200), size=k - 1, replace=False).tolist()) + [200]
        fast = cm._total_times(costs, n_layers, np.array([ends]), 2, 3, 2)[0]
        slow = simulate_prefill(costs, n_layers, 200, ends, 2, hidden=3, dtype_bytes=2).total_s
        assert fast == pytest.approx(slow, rel=1e-12)


def test_no_communication_means_no_gain():
    costs = datasheet("a800-nvlink", 1)
    sim = simulate_prefill(costs, 80, 4096, [2048, 4096], hidden=8192, dtype_bytes=2)
    assert sim.comm_s == 0 and sim.total_s == pytest.approx(sim.compute_s)


# --- datasheet model against docs/cost-model.md ---
@pytest.mark.parametrize("gpu,tp,rho", [("rtx4090-pcie4", 4, 0.66), ("rtx4090-pcie4", 8, 1.55),
                                        ("a800-nvlink", 4, 0.17), ("a800-nvlink", 8, 0.39)])
def test_datasheet_comm_to_compute_ratio(gpu, tp, rho):
    costs = datasheet(gpu, tp)
    comm_per_token = 2 * LLAMA70.hidden * 2 / costs.ar_bandwidth  # two all-reduces per layer
    assert comm_per_token / (costs.attn_per_token + costs.mlp_per_token) == pytest.approx(rho, abs=0.006)


def test_model_flops_and_weights():
    assert LLAMA70.attention_gemm_flops + LLAMA70.mlp_gemm_flops == pytest.approx(1711.3e6, rel=1e-4)
    assert LLAMA70.weight_bytes / 1e9 == pytest.approx(138, abs=1)


@pytest.mark.parametrize("gpu,tp", sorted(DOC_TWO_CHUNK))
def test_doc_table_reproduced_under_its_assumptions(gpu, tp):
    # The reference table ignores launch gaps and all-reduce latency; so does this case.
    costs = datasheet(gpu, tp, link_latency_us=0, block_overhead_us=0)
    got = [round(100 * two_chunk_reduction(costs, LLAMA70, s), 1) for s in SEQ_LENS]
    assert got == pytest.approx(DOC_TWO_CHUNK[gpu, tp], abs=0.11)


@pytest.mark.parametrize("gpu,tp,doc", [("rtx4090-pcie4", 8, 38.2), ("a800-nvlink", 4, 13.8),
                                        ("rtx4090-pcie4", 4, 32.1), ("a800-nvlink", 8, 27.2)])
def test_presets_stay_near_doc_table(gpu, tp, doc):
    assert 100 * two_chunk_reduction(datasheet(gpu, tp), LLAMA70, 4096) == pytest.approx(doc, abs=2)


# --- split solver ---
def test_balanced_split_even_without_attention_core():
    costs = LayerCosts(1e-3, 1.0, 0.0, 1e-3, 2.0, 0, 1.0)
    assert balanced_split(costs, 1000, 2) == [500, 1000]
    assert balanced_split(costs, 999, 3) == [333, 666, 999]


@pytest.mark.parametrize("seq_len", [1024, 4096, 8192])
def test_balanced_split_matches_doc_closed_form(seq_len):
    costs = datasheet("a800-nvlink", 8)
    r = costs.attn_per_pair * seq_len / (2 * (costs.attn_per_token + costs.mlp_per_token))  # 2hS/g
    x_star = (-1 + math.sqrt(1 + 2 * r * (1 + r))) / (2 * r)
    assert balanced_split(costs, seq_len, 2)[0] == pytest.approx(x_star * seq_len, abs=2)
    # docs/cost-model.md's 70B values: x* = 0.502 / 0.509 / 0.518 at 1k / 4k / 8k.
    assert x_star == pytest.approx({1024: 0.502, 4096: 0.509, 8192: 0.518}[seq_len], abs=0.0015)


def test_balanced_split_first_chunk_longer_with_attention():
    ends = balanced_split(LayerCosts(0, 1.0, 0.05, 0, 1.0, 0, 1.0), 1024, 3)
    sizes = np.diff([0] + ends)
    assert sizes[0] > sizes[1] > sizes[2]


@pytest.mark.parametrize("seq_len", [1000, 1024, 4000])
def test_solver_even_split_for_symmetric_costs(seq_len):
    # attn == mlp per token, no attention core, each all-reduce as long as its block: nothing favours a side.
    s = choose_split(LayerCosts(0, 1.0, 0.0, 0, 1.0, 0, 1.0), 10, seq_len, **UNIT, max_chunks=2)
    assert s[1] == seq_len and abs(s[0] - seq_len / 2) <= 16


def test_solver_first_chunk_longer_when_attention_dominates():
    # Communication-bound (each all-reduce twice its block). Stall-free needs every block of one chunk to fit
    # under the other chunk's all-reduce; chunk 2's attention covers all keys, so chunk 1 must grow.
    flat = choose_split(LayerCosts(0, 1.0, 0.0, 0, 1.0, 0, 0.5), 10, 1024, **UNIT, max_chunks=2)
    heavy = choose_split(LayerCosts(0, 1.0, 0.01, 0, 1.0, 0, 0.5), 10, 1024, **UNIT, max_chunks=2)
    assert heavy[0] > 512 + 64
    assert heavy[0] > flat[0]


def test_solver_one_chunk_without_communication():
    costs = LayerCosts(1e-5, 1e-6, 1e-9, 1e-5, 2e-6, 0.0, math.inf)
    assert choose_split(costs, 80, 4096, hidden=8192, dtype_bytes=2) == [4096]


def test_solver_one_chunk_when_fixed_costs_outweigh_communication():
    # Hiding ~1.3 us of all-reduce per block cannot pay for another 1 ms block overhead.
    costs = LayerCosts(1e-3, 1e-6, 0.0, 1e-3, 1e-6, 0.0, 1e11)
    assert choose_split(costs, 10, 1024, hidden=64, dtype_bytes=2) == [1024]
    assert predict(costs, 10, 1024, [512, 1024], hidden=64, dtype_bytes=2).reduction < 0


def test_solver_more_chunks_when_attention_blocks_are_small():
    # comm ~ compute, attention block 1/10 of the MLP: with two chunks, chunk 1's AR1 cannot hide under
    # chunk 2's tiny attention block and the compute stream stalls (docs/cost-model.md, two chunks).
    costs = LayerCosts(0, 0.1, 0.0, 0, 1.0, 0, 1 / 0.55)
    best = choose_split(costs, 10, 1024, **UNIT)
    two = choose_split(costs, 10, 1024, **UNIT, max_chunks=2)
    assert len(best) > 2
    assert predict(costs, 10, 1024, best, **UNIT).iso_s < 0.9 * predict(costs, 10, 1024, two, **UNIT).iso_s


def test_solver_two_chunk_grid_is_exhaustive():
    costs = datasheet("rtx4090-pcie4", 8)
    kw = {"hidden": 8192, "dtype_bytes": 2}
    chosen = choose_split(costs, 4, 512, **kw, max_chunks=2, granularity=16, min_gain=0)
    brute = min(simulate_prefill(costs, 4, 512, [s, 512], **kw).total_s for s in range(16, 512, 16))
    assert simulate_prefill(costs, 4, 512, chosen, **kw).total_s == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("seq_len,granularity", [(20, 16), (3, 16), (1, 16), (1000, 16), (4097, 64)])
def test_solver_respects_granularity_and_length(seq_len, granularity):
    costs = LayerCosts(0, 0.1, 1e-4, 0, 1.0, 0, 1 / 0.55)
    ends = choose_split(costs, 4, seq_len, **UNIT, granularity=granularity, min_gain=0)
    sizes = np.diff([0] + ends)
    assert ends[-1] == seq_len and (sizes >= 1).all() and len(ends) <= min(4, seq_len)
    if seq_len >= len(ends) * granularity:
        assert (sizes >= granularity).all() and all(e % granularity == 0 for e in ends[:-1])


@pytest.mark.slow
def test_solver_speed():
    costs = datasheet("rtx4090-pcie4", 4)
    start = time.perf_counter()
    choose_split(costs, 80, 8192, hidden=8192, dtype_bytes=2)
    assert time.perf_counter() - start < 0.5  # ~10 ms here; a guard against an accidental slow path


# --- calibration fit ---
def test_fit_recovers_constants_from_noisy_timings():
    truth = LayerCosts(attn_fixed=30e-6, attn_per_token=2e-7, attn_per_pair=3e-11, mlp_fixed=0.0,
                       mlp_per_token=9e-7, ar_latency=25e-6, ar_bandwidth=20e9)
    rng = np.random.default_rng(0)

    def noisy(t):
        return float(t * (1 + rng.normal(0, 0.01)))

    fit = fit_layer_costs(lambda n, p: noisy(truth.attention_block(n, p, 2)),
                          lambda n: noisy(truth.mlp_block(n, 2)), lambda b: noisy(truth.all_reduce(b)),
                          token_sizes=[64, 256, 1024, 4096], prefix_sizes=[0, 2048, 8192],
                          byte_sizes=[2**k for k in range(12, 28, 2)], batch=2)
    got = fit.costs
    for name in ("attn_fixed", "attn_per_token", "attn_per_pair", "mlp_per_token", "ar_latency",
                 "ar_bandwidth"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=0.1), name
    assert 0 <= got.mlp_fixed < 5e-6  # true value 0: a negative estimate must be clamped, not kept
    assert all(0 < r < 0.03 for r in fit.residual.values())


def test_fit_separates_scored_from_visible_pairs():
    """An attention that scores the masked future too (the CPU reference) is told apart from a causal one."""
    truth = LayerCosts(attn_fixed=30e-6, attn_per_token=2e-7, attn_per_pair=0.0, mlp_fixed=1e-5,
                       mlp_per_token=9e-7, ar_latency=25e-6, ar_bandwidth=20e9, attn_per_key=4e-11)
    fit = fit_layer_costs(lambda n, p: truth.attention_block(n, p), truth.mlp_block, truth.all_reduce,
                          token_sizes=[64, 256, 1024], prefix_sizes=[0, 512, 1024], byte_sizes=[1024, 4096])
    assert fit.costs.attn_per_key == pytest.approx(4e-11, rel=1e-3)
    assert fit.costs.attn_per_pair == pytest.approx(0.0, abs=1e-14)
    # the pair terms of two chunks then cost less than the unsplit prompt's, as measured on CPU (3/4 of it)
    pairs_only = dataclasses.replace(fit.costs, attn_fixed=0.0, attn_per_token=0.0)
    halves = pairs_only.attention_block(512, 0) + pairs_only.attention_block(512, 512)
    assert halves == pytest.approx(0.75 * pairs_only.attention_block(1024, 0), rel=1e-3)


def test_fit_clamps_negative_coefficient():
    # Times that shrink with size would need a negative slope; the fit keeps slope 0 and the mean as fixed.
    fit = fit_layer_costs(lambda n, p: 1e-3, lambda n: 2e-3 - 1e-7 * n, lambda b: 1e-5,
                          token_sizes=[16, 64, 256], prefix_sizes=[0, 256], byte_sizes=[1024, 4096])
    assert fit.costs.mlp_per_token == 0 and fit.costs.mlp_fixed > 0
    assert fit.costs.ar_latency == pytest.approx(1e-5) and fit.costs.all_reduce(2**30) == pytest.approx(1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"token_sizes": [64], "prefix_sizes": [0], "byte_sizes": [1, 2]}, "measure_attention"),
    ({"token_sizes": [64, 128, 256], "prefix_sizes": [0], "byte_sizes": [8]}, "measure_all_reduce"),
])
def test_fit_rejects_underdetermined_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_layer_costs(lambda n, p: 1e-3 * n, lambda n: 1e-3 * n, lambda b: 1e-6 * b, **kwargs)


def test_fit_rejects_non_positive_timings():
    with pytest.raises(ValueError, match="measure_mlp"):
        fit_layer_costs(lambda n, p: 1e-3 * n, lambda n: 0.0, lambda b: 1e-6 * b,
                        token_sizes=[16, 64, 256], prefix_sizes=[0, 256], byte_sizes=[8, 64])


# --- calibration cache ---
def test_cache_roundtrip_and_key_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv(envs.CACHE_DIR_VAR, str(tmp_path / "cache"))
    key = {"gpu": "NVIDIA H100 80GB HBM3", "model": "llama2-70b", "tp": 8, "dtype": "bfloat16"}
    assert load_calibration(None, key) is None  # no file yet
    a, b = datasheet("h100-nvlink", 8), datasheet("h100-nvlink", 1)  # b: infinite bandwidth
    path = save_calibration(None, a, key)
    assert path.parent == tmp_path / "cache"
    save_calibration(None, b, {**key, "tp": 1})
    assert load_calibration(None, dict(reversed(list(key.items())))) == a  # key order does not matter
    assert load_calibration(None, {**key, "tp": 1}) == b
    assert load_calibration(None, {**key, "tp": 4}) is None
    save_calibration(path, b, key)  # replaces, does not duplicate
    assert load_calibration(path, key) == b


def test_cache_ignores_corrupt_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_calibration(path, {"tp": 2}) is None


# --- bad input ---
@pytest.mark.parametrize("call,match", [
    (lambda: balanced_split(toy_costs(), 2, 3), "seq_len"),
    (lambda: simulate_prefill(toy_costs(), 1, 4, [3, 2, 4], **UNIT), "split"),
    (lambda: simulate_prefill(toy_costs(), 1, 4, [2, 5], **UNIT), "split"),
    (lambda: simulate_prefill(toy_costs(), 1, 4, [0, 4], **UNIT), "split"),
    (lambda: simulate_prefill(toy_costs(), 1, 4, [], **UNIT), "split"),
    (lambda: simulate_prefill(toy_costs(), 0, 4, [4], **UNIT), "n_layers"),
    (lambda: choose_split(toy_costs(), 1, 64, **UNIT, granularity=0), "granularity"),
    (lambda: choose_split(toy_costs(), 1, 64, **UNIT, min_gain=1.5), "min_gain"),
    (lambda: LayerCosts(0, -1.0, 0, 0, 0, 0, 1), "attn_per_token"),
    (lambda: LayerCosts.from_datasheet(LLAMA70, HARDWARE_PRESETS["a800-nvlink"], 0), "tp"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="seq_len"):
        simulate_prefill(toy_costs(), 1, 4.0, [4], **UNIT)
    with pytest.raises(TypeError, match="key"):
        save_calibration(None, toy_costs(), {"f": object()})


def test_scaled_scales_compute_and_comm_separately():
    costs = cm.LayerCosts(1e-3, 2e-6, 3e-9, 4e-4, 5e-6, 6e-5, 7e9)
    doubled = costs.scaled(compute=2.0)
    assert doubled.attention_block(100, 50) == pytest.approx(2 * costs.attention_block(100, 50))
    assert doubled.mlp_block(100) == pytest.approx(2 * costs.mlp_block(100))
    assert doubled.all_reduce(1 << 20) == costs.all_reduce(1 << 20)
    tripled = costs.scaled(comm=3.0)
    assert tripled.all_reduce(1 << 20) == pytest.approx(3 * costs.all_reduce(1 << 20))
    assert tripled.mlp_block(100) == costs.mlp_block(100)
    with pytest.raises(ValueError, match="factors"):
        costs.scaled(compute=0.0)


@pytest.mark.parametrize("offset", [2e-3, -4e-4])
def test_fit_plan_correction_recovers_a_per_chunk_cost_the_calibration_missed(offset):
    from iso_kernels.costmodel import PlanCorrection, fit_plan_correction

    costs, kw = LayerCosts(1e-3, 1e-5, 1e-8, 1e-3, 2e-5, 1e-4, 1e8), {"hidden": 512, "dtype_bytes": 4}
    truth = PlanCorrection(offset, 1.3).apply(costs)
    splits = [(512,), (256, 512), (170, 340, 512), (128, 256, 384, 512)]
    measured = {ends: simulate_prefill(truth, 8, 512, list(ends), **kw).total_s for ends in splits}
    fitted = fit_plan_correction(costs, 8, 512, measured, **kw)
    assert fitted.block_offset_s == pytest.approx(offset, rel=0.01)
    assert fitted.compute_scale == pytest.approx(1.3, rel=0.01)
    with pytest.raises(ValueError, match="unsplit"):
        fit_plan_correction(costs, 8, 512, {(256, 512): 1.0, (128, 512): 1.0}, **kw)
    cheaper = PlanCorrection(-5e-3).apply(costs)  # more than the fixed costs: blocks become free, not negative
    assert (cheaper.attn_fixed, cheaper.mlp_fixed) == (0.0, 0.0)
