"""bench/bench_serving.py: one quick run on the tiny preset."""

import csv
import json

import pytest

from bench import bench_serving as bench


@pytest.mark.slow
def test_quick_run_on_the_tiny_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ISO_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    csv_path = tmp_path / "serving.csv"
    assert bench.main(["--quick", "--model", "llama-tiny", "--repeats", "1", "--warmup", "0",
                       "--comm-backend", "torch", "--csv", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert {(r["x_value"], r["provider"]) for r in rows} == {(b, p) for b in bench.QUICK_BATCHES
                                                            for p in ("serial", "iso")}
    config = json.loads(next(r for r in rows if r["x_value"] == "prefix")["config_json"])
    assert config["prefix"] == 32 and config["tokens"] == sum(bench.QUICK_BATCHES["prefix"][0])
    printed = capsys.readouterr().out
    assert "| mixed | ratio:1.0 | 6 | 176 | 0 |" in printed and "DISAGREE" not in printed  # 96 + 48 + 4 x 8
