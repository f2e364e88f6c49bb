"""bench/bench_planner.py: the summary on synthetic rounds, and one real run on the tiny preset."""

import csv
import json

import pytest

from bench import bench_planner as bench


def synthetic(auto=(24, 48)):
    # serial 100 ms per round; the even split gains 30 %, a 3-chunk split 35 %, no split nothing
    return {"serial": [100.0, 100.0, 100.0], "auto": auto, "trial_ms": 5.0, "compute_only_ms": 40.0,
            "correction": {"block_offset_s": 1e-4, "compute_scale": 1.1}, "select_rounds": 0,
            "splits": {(48,): [100.0, 101.0, 99.0], (24, 48): [70.0, 69.0, 71.0], (16, 32, 48): [65.0, 66.0, 64.0]},
            "predicted": {(48,): (90.0, 100.0), (24, 48): (56.0, 70.0), (16, 32, 48): (65.0, 65.0)}}


def test_summary_picks_best_on_the_rounds_and_pairs_each_round_with_its_serial():
    plans = bench.summarize(synthetic())
    assert plans["best"][0] == (16, 32, 48) and plans["none"][0] == (48,) and plans["even-2"][0] == (24, 48)
    assert plans["auto"][1][0] == pytest.approx(0.30) and plans["best"][1][0] == pytest.approx(0.35)
    assert plans["none"][1][0] == pytest.approx(0.0)
    *_, line, _, verdict = bench.summary_table({(48, "ratio:1.0"): synthetic()}).splitlines()
    assert verdict.endswith("0 of 1 cells")  # 5 points below best
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["ratio:1.0", "48", "100.0"] and cells[-3:] == ["+0.0", "-5.0", "10.0% / 0.0%"]


def test_best_is_picked_on_the_selection_rounds_and_measured_after_them():
    measured = dict(synthetic(), select_rounds=1, serial=[100.0] * 3,
                    splits={(48,): [100.0] * 3, (24, 48): [60.0, 80.0, 80.0], (16, 32, 48): [70.0, 70.0, 70.0]})
    plans = bench.summarize(measured)
    assert plans["best"][0] == (24, 48)  # lucky in round 1
    assert plans["best"][1][0] == pytest.approx(0.20) and plans["auto"][1][0] == pytest.approx(0.20)


def test_rounds_must_pair_up():
    with pytest.raises(ValueError):
        bench.round_reductions([100.0, 100.0], [70.0])


@pytest.mark.slow
def test_quick_run_on_the_tiny_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ISO_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    csv_path = tmp_path / "planner.csv"
    assert bench.main(["--model", "llama-tiny", "--links", "ratio:1.0", "--seq-lens", "40", "--repeats", "2",
                       "--comm-backend", "torch", "--csv", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    by_key = {(r["provider"], r["metric"]): r for r in rows}
    assert set(by_key) == {("serial", "ms")} | {(p, m) for p in bench.PLANS for m in ("ms", "reduction")}
    config = json.loads(by_key["auto", "ms"]["config_json"])
    assert config["ends"] == config["auto"] and config["trial_ms"] > 0 and config["candidates"] >= 2
    assert json.loads(by_key["even-2", "ms"]["config_json"])["ends"] == [20, 40]
    assert float(by_key["best", "reduction"]["p50"]) >= float(by_key["auto", "reduction"]["p50"])
    assert csv_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| ratio:1.0 | 40 |" in capsys.readouterr().out
