"""iso_kernels/measure.py: what the prefill job measures for planning, and the key it caches it under."""

import dataclasses
import types

import pytest
import torch

from iso_kernels import comm, engine, launch, measure
from iso_kernels.split import ChunkSplit


def _prefill(**changes):
    cfg = engine.PrefillConfig(model="llama-tiny", **changes.pop("cfg", {}))
    fields = dict(cfg=cfg, communicator=None, packed=None, batch=1, seq_len=64, device="cpu", dtype=torch.float32)
    return types.SimpleNamespace(**{**fields, **changes})


def test_the_cache_key_holds_what_a_measurement_depends_on():
    base = measure.cache_key(_prefill())
    assert base["kind"] == "block-costs" and base["device"].startswith("cpu x") and base["comm"] is None
    for changed in (_prefill(cfg=dict(tp=4)), _prefill(seq_len=128), _prefill(batch=2),
                    _prefill(cfg=dict(link=comm.parse_link("pcie4"))), _prefill(dtype=torch.bfloat16),
                    _prefill(communicator=types.SimpleNamespace(name="torch")),
                    _prefill(packed=types.SimpleNamespace(q_lens=(30, 34)))):
        assert measure.cache_key(changed) != base
    assert measure.cache_key(_prefill(), kind="split-trial") == dict(base, kind="split-trial")


def test_short_prompts_and_serving_batches_get_no_costs():
    assert measure.fitted_costs(_prefill(seq_len=measure.MIN_CALIBRATION_TOKENS - 1), 1.0) is None
    assert measure.fitted_costs(_prefill(packed=types.SimpleNamespace(q_lens=(30, 34))), 1.0) is None


def _fitted_on_one_rank(rank, world_size, cfg):
    """The fitted costs and the scale they were fitted to, on one rank behind an emulated link."""
    with torch.inference_mode():
        job = engine.resolve(cfg)
        prefill, compute_only_s = engine.open_prefill(rank, world_size, cfg, job)
        costs = measure.fitted_costs(prefill, compute_only_s)
        link = prefill.communicator.link
        prefill.close()
    return dataclasses.asdict(costs), compute_only_s, link.latency_s, link.bus_bandwidth


@pytest.mark.slow
def test_costs_are_scaled_to_the_measured_prefill_and_take_an_emulated_link_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("ISO_KERNELS_CACHE_DIR", str(tmp_path))
    cfg = engine.PrefillConfig(model="llama-tiny", tp=1, seq_len=128, link=comm.parse_link("pcie4"),
                               device="cpu", recalibrate=True)
    (fields, compute_only_s, latency_s, bus_bandwidth), = launch.spawn_ranks(_fitted_on_one_rank, 1,
                                                                            args=(cfg,), timeout_s=120)
    costs = measure.planning.LayerCosts(**fields)
    # A lone rank behind an emulated link moves the message once (ring factor 1): the link's own numbers.
    assert (costs.ar_latency, costs.ar_bandwidth) == (latency_s, bus_bandwidth)
    shape = measure.planning.PrefillShape(n_layers=2, hidden=128, batch=1, dtype_bytes=4)
    modelled = measure.planning.simulate_prefill(costs, shape, ChunkSplit((128,)))
    assert modelled.compute_s == pytest.approx(compute_only_s, rel=1e-9)  # scaled to the measured prefill
    assert (tmp_path / "calibration.json").exists()
