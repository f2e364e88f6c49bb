"""bench/bench_iso_prefill.py: helpers on synthetic engine reports, and one real run on the tiny preset."""

import csv
import json

import pytest
from safetensors import safe_open

from bench import bench_iso_prefill as bench
from iso_kernels import checkpoint, comm
from iso_kernels.metrics import OverlapMetrics
from iso_kernels.report import PrefillReport
from iso_kernels.split import ChunkSplit

GPU_COUNTS = [(2, 2), (3, 2), (6, 4), (8, 8), (16, 8)]


def fake_measured(iso_runs, serial_runs, *, chunks=2, agree=True, compute_only=50.0):
    """A bench measurement around a real ``PrefillReport`` with internally consistent values."""
    serial, iso = sorted(serial_runs)[len(serial_runs) // 2], sorted(iso_runs)[len(iso_runs) // 2]
    overlap = OverlapMetrics(compute_ms=45.0, comm_ms=40.0, chunked_compute_ms=44.0, bound_ms=60.0, head_ms=2.0,
                             tail_ms=3.0, reduction=1 - iso / serial,
                             overlap_efficiency=(serial - iso) / (serial - 60.0))
    report = PrefillReport(
        tp=2, seq_len=96, batch=1, device="cpu x2", dtype="torch.float32", comm_backend="torch",
        link={"name": "ratio:1", "latency_s": 0.0, "bus_bandwidth": 1e9},
        bounds=ChunkSplit.even(96, chunks).bounds(), compute_only_ms=compute_only, predicted_serial_ms=98.0,
        predicted_iso_ms=66.0, runs_ms={"serial": serial_runs, "iso": iso_runs}, overlap=overlap,
        max_abs_diff=0.0, agree=agree, iso_equals_serial_same_chunks=True)
    return bench.Measured(report, load_avg=[0.5, 0.6], compute_busy_ms={"serial": 45.0, "iso": 36.0})


def test_quantiles_and_prediction_error():
    assert bench.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))
    assert bench.quantiles([7.0]) == (7.0, 7.0, 7.0)
    assert bench.prediction_error(66.0, 60.0) == pytest.approx(10.0)
    assert bench.prediction_error(54.0, 60.0) == pytest.approx(-10.0)


@pytest.mark.parametrize("gpus, tp", GPU_COUNTS)
def test_device_defaults_use_a_power_of_two_of_the_gpus(gpus, tp):
    settings, chosen = bench.device_defaults("cuda", gpus)
    assert chosen == tp
    assert "none" in settings["links"]  # real NCCL without an emulated link is measured too


def test_device_defaults_for_cpu_and_one_gpu():
    cpu, cpu_tp = bench.device_defaults("cpu", 0)
    one, one_tp = bench.device_defaults("cuda", 1)
    assert cpu_tp == 2 and cpu["links"] == ["ratio:0.5", "ratio:1.0"]
    assert one_tp == 1 and "none" not in one["links"]  # one rank hides only an emulated link


def test_one_gpu_quick_run_measures_one_link_preset_at_one_length():
    settings, _ = bench.device_defaults("cuda", 1)
    seq_lens, links = bench.points(bench.parse_args(["--quick"]), settings)
    assert len(seq_lens) == 1 and len(links) == 1 and links[0] in comm.LINK_PRESETS
    full_lens, full_links = bench.points(bench.parse_args([]), settings)
    assert len(full_links) > 1 and len(full_lens) > 1
    assert bench.points(bench.parse_args(["--quick", "--links", "none,pcie4", "--seq-lens", "64"]), settings) \
        == ([64], ["none", "pcie4"])


def test_compute_busy_takes_the_slowest_rank_per_schedule():
    def span(stream, start, end):
        return {"stream": stream, "start_ms": start, "end_ms": end}

    lanes = {("serial", 0): [span("compute", 0, 4), span("comm", 4, 9), span("compute", 9, 12)],
             ("serial", 1): [span("compute", 0, 5)],
             ("iso", 0): [span("compute", 1, 3)], ("iso", 1): [span("compute", 0, 1), span("compute", 2, 3)]}
    assert bench.compute_busy(lanes) == {"serial": 7.0, "iso": 2.0}


def test_rows_pool_serial_runs_and_keep_each_variant_paired():
    reports = {"iso-auto": fake_measured([70.0, 64.0, 66.0], [100.0, 96.0, 98.0]),
               "iso-2even": fake_measured([75.0, 71.0, 73.0], [104.0, 102.0, 90.0], compute_only=54.0)}
    rows = bench.rows_for_point(96, "ratio:1.0", reports, {"model": "m"})
    by_key = {(r["provider"], r["metric"]): r for r in rows}
    assert set(by_key) == {("serial", "ms"), ("no-comm", "ms")} | {
        (p, m) for p in ("iso-auto", "iso-2even") for m in ("ms", "reduction", "overlap_efficiency")}
    assert all(r["op"] == "iso_prefill" and r["mode"] == "ratio:1.0" and r["x_value"] == 96 for r in rows)
    assert by_key["serial", "ms"]["p50"] == pytest.approx(99.0)  # median of all six serial runs
    assert by_key["no-comm", "ms"]["p50"] == pytest.approx(52.0)
    assert by_key["iso-auto", "ms"]["p50"] == 66.0 and by_key["iso-2even", "ms"]["p50"] == 73.0
    assert by_key["iso-2even", "reduction"]["p50"] == pytest.approx(1 - 73.0 / 102.0)
    assert by_key["iso-2even", "ms"]["config_json"]["paired_serial_ms"] == 102.0
    assert by_key["iso-auto", "ms"]["config_json"]["predicted_ms"] == 66.0


def test_summary_table_rows_and_disagreement_flag():
    reports = {"iso-auto": fake_measured([66.0], [100.0], chunks=3),
               "iso-2even": fake_measured([80.0], [100.0], agree=False)}
    table = bench.summary_table({(96, "ratio:1.0"): reports})
    header, rule, line = table.splitlines()
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|")) == rule.count("---")
    assert cells[:6] == ["96", "ratio:1.0 DISAGREE", "100.0", "66.0 (3)", "80.0", "50.0"]
    assert cells[6:10] == ["34.0%", "20.0%", "0.85", "0.50"]
    assert cells[10:] == ["+0.0", "-17.5", "0.80, 0.80"]


def test_links_none_needs_two_ranks():
    with pytest.raises(SystemExit, match="--tp >= 2"):
        bench.main(["--device", "cpu", "--tp", "1", "--links", "none,ratio:1.0"])


@pytest.mark.slow
def test_quick_run_on_the_tiny_preset(tmp_path, capsys):
    csv_path = tmp_path / "iso.csv"
    status = bench.main(["--device", "cpu", "--model", "llama-tiny", "--seq-lens", "40",
                         "--links", "ratio:1.0", "--repeats", "2", "--warmup", "0", "--comm-backend", "torch",
                         "--csv", str(csv_path)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 8
    assert {r["x_value"] for r in rows} == {"40"} and {r["mode"] for r in rows} == {"ratio:1.0"}
    by_key = {(r["provider"], r["metric"]): r for r in rows}
    even = json.loads(by_key["iso-2even", "ms"]["config_json"])
    assert even["chunks"] == 2 and even["bounds"] == [[0, 20], [20, 40]] and even["agree"]
    reduction = float(by_key["iso-2even", "reduction"]["p50"])
    assert reduction == pytest.approx(1 - float(by_key["iso-2even", "ms"]["p50"]) / even["paired_serial_ms"])
    assert all(float(by_key[p, "ms"]["p50"]) > 0 for p in bench.PROVIDERS)
    assert csv_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| 40 | ratio:1.0 |" in printed


def test_the_gpu_benchmark_model_is_drawn_and_stored_in_bf16(tmp_path):
    assert checkpoint.preset_config(bench.DEFAULTS["cuda"]["model"])["torch_dtype"] == "bfloat16"
    config = dict(checkpoint.preset_config("llama-tiny"), torch_dtype="bfloat16")
    folder = checkpoint.save_random_checkpoint(config, tmp_path / "tiny-bf16")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    model = checkpoint.load_checkpoint(folder)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.norm.weight.mean().item() == pytest.approx(1.0, abs=0.05)
