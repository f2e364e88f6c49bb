"""``PrefillReport.to_json``: the flat JSON keys the CLI's --json has always written."""

import json
import math

import pytest

from iso_kernels.metrics import OverlapMetrics
from iso_kernels.planning import TrialCandidate
from iso_kernels.report import PrefillReport


def report(**fields):
    defaults = dict(tp=2, seq_len=96, batch=1, device="cpu x2", dtype="torch.float32", comm_backend="torch",
                    link=None, bounds=[(0, 40), (40, 96)], compute_only_ms=50.0, predicted_serial_ms=98.0,
                    predicted_iso_ms=math.nan, runs_ms={"serial": [3.0, 1.0, 2.0], "iso": [1.0, 1.0, 1.0]})
    return PrefillReport(**{**defaults, **fields})


def test_keys_per_schedule_and_the_split():
    out = report(runs_ms={"serial": [3.0, 1.0, 2.0], "iso": [1.0, 1.0, 1.0], "serial-chunks": [4.0, 6.0]}).to_json()
    assert (out["serial_ms"], out["iso_ms"], out["serial-chunks_ms"]) == (2.0, 1.0, 5.0)
    assert out["serial_runs_ms"] == [3.0, 1.0, 2.0] and out["split"] == 40 and out["chunks"] == 2
    assert "reduction" not in out and "agree" not in out  # only when both schedules ran
    assert json.loads(json.dumps(out))["bounds"] == [[0, 40], [40, 96]]


def test_overlap_agreement_and_trial_entries():
    overlap = OverlapMetrics(45.0, 40.0, 44.0, 60.0, 2.0, 3.0, 0.3, 0.8)
    out = report(overlap=overlap, max_abs_diff=1e-6, agree=True, iso_equals_serial_same_chunks=True,
                 bounds=[(0, 30), (30, 60), (60, 96)], split_source="trial",
                 trial=[TrialCandidate((96,), 99.0, 100.0, 3)], trial_ms=12.0, generated=[[1, 2]]).to_json()
    assert out["reduction"] == 0.3 and out["bound_ms"] == 60.0 and out["overlap_efficiency"] == 0.8
    assert out["agree"] and out["max_abs_diff"] == 1e-6 and out["iso_equals_serial_same_chunks"]
    assert out["split"] == [30, 60, 96] and out["generated"] == [[1, 2]]
    assert out["split_source"] == "trial" and out["trial"] == [{"ends": (96,), "predicted_iso_ms": 99.0,
                                                        "measured_iso_ms": 100.0, "rounds": 3}]


def test_the_reduction_states_its_spread_over_the_rounds():
    """Rounds run serial and ISO side by side: the per-round reductions' [p20, p80] decides whether ISO was
    measurably faster, slower, or neither (a spread that holds 0)."""
    faster = report(runs_ms={"serial": [100.0, 104.0, 98.0, 101.0, 99.0], "iso": [80.0, 85.0, 79.0, 82.0, 78.0]})
    mixed = report(runs_ms={"serial": [100.0, 100.0, 100.0, 100.0, 100.0], "iso": [90.0, 97.0, 101.0, 104.0, 108.0]})
    slower = report(runs_ms={"serial": [100.0, 100.0, 100.0], "iso": [110.0, 112.0, 105.0]})
    assert faster.difference == "gain" and mixed.difference == "none measurable" and slower.difference == "loss"
    assert mixed.reduction_spread == pytest.approx((-0.01, -0.048, 0.044))  # (p50, p20, p80)
    out = mixed.to_json()
    assert out["difference"] == "none measurable" and out["reduction_p20"] < 0 < out["reduction_p80"]
    serial_only = report(runs_ms={"serial": [1.0]})
    assert serial_only.difference is None and "difference" not in serial_only.to_json()
