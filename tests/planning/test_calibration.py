"""The cost model fitted to measurements (``planning.calibration``): the block fit, its cache file, and the
correction fitted to timed plans."""

import dataclasses

import numpy as np
import pytest

from iso_kernels import envs
from iso_kernels.planning import (
    LayerCosts,
    PlanCorrection,
    PrefillShape,
    fit_layer_costs,
    fit_plan_correction,
    load_calibration,
    save_calibration,
    simulate_prefill,
)
from iso_kernels.split import ChunkSplit

from helpers import datasheet_costs, toy_costs


# --- the block fit ---
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


# --- the calibration file (the keyed file itself: tests/test_cache.py) ---
def test_calibration_roundtrip_and_key_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv(envs.CACHE_DIR_VAR, str(tmp_path / "cache"))
    key = {"gpu": "NVIDIA H100 80GB HBM3", "model": "llama2-70b", "tp": 8, "dtype": "bfloat16"}
    assert load_calibration(None, key) is None  # no file yet
    a, b = datasheet_costs("h100-nvlink", 8), datasheet_costs("h100-nvlink", 1)  # b: infinite bandwidth
    path = save_calibration(None, a, key)
    assert path.parent == tmp_path / "cache"
    save_calibration(None, b, {**key, "tp": 1})
    assert load_calibration(None, dict(reversed(list(key.items())))) == a  # key order does not matter
    assert load_calibration(None, {**key, "tp": 1}) == b
    assert load_calibration(None, {**key, "tp": 4}) is None
    save_calibration(path, b, key)  # replaces, does not duplicate
    assert load_calibration(path, key) == b


def test_calibration_ignores_corrupt_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable calibration cache"):
        assert load_calibration(path, {"tp": 2}) is None


def test_calibration_key_must_be_json():
    with pytest.raises(TypeError, match="key"):
        save_calibration(None, toy_costs(), {"f": object()})


# --- correcting the model with measured plans ---
@pytest.mark.parametrize("offset", [2e-3, -4e-4])
def test_fit_plan_correction_recovers_a_per_chunk_cost_the_calibration_missed(offset):
    costs, shape = LayerCosts(1e-3, 1e-5, 1e-8, 1e-3, 2e-5, 1e-4, 1e8), PrefillShape(8, hidden=512, dtype_bytes=4)
    truth = PlanCorrection(offset, 1.3).apply(costs)
    splits = [(512,), (256, 512), (170, 340, 512), (128, 256, 384, 512)]
    measured = {ends: simulate_prefill(truth, shape, ChunkSplit(ends)).total_s for ends in splits}
    fitted = fit_plan_correction(costs, shape, measured)
    assert fitted.block_offset_s == pytest.approx(offset, rel=0.01)
    assert fitted.compute_scale == pytest.approx(1.3, rel=0.01)
    with pytest.raises(ValueError, match="unsplit"):
        fit_plan_correction(costs, shape, {(256, 512): 1.0, (128, 512): 1.0})
    cheaper = PlanCorrection(-5e-3).apply(costs)  # more than the fixed costs: blocks become free, not negative
    assert (cheaper.attn_fixed, cheaper.mlp_fixed) == (0.0, 0.0)


def test_fit_plan_correction_rejects_a_split_of_another_prompt():
    costs, shape = LayerCosts(1e-3, 1e-5, 1e-8, 1e-3, 2e-5, 1e-4, 1e8), PrefillShape(8, hidden=512, dtype_bytes=4)
    with pytest.raises(ValueError, match="must end at the prompt's length 512"):
        fit_plan_correction(costs, shape, {(512,): 1.0, (256, 512): 0.8, (100, 300): 0.5})
