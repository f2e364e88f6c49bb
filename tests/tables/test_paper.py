"""The simulated paper settings (``tables.paper``, ``python -m iso_kernels simulate``): table contents, memory
flags, overrides, the "auto" column (the policy's decision), the command line and its errors."""

import argparse
import json
import re

import pytest

from iso_kernels import cli, models
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.planning import LayerCosts, Policy, decide, model_shape, predict
from iso_kernels.planning.policy import MIN_GAIN
from iso_kernels.tables import paper

GPUS = ["rtx4090-pcie4", "a800-nvlink"]
MODELS = ["llama-30b", "llama2-70b"]
TPS = [2, 4, 8]
SEQ_LENS = [1000, 4096]  # 1000 is not a multiple of the solver's granularity
# (gpu, model, tp) -> fits: 70B is 128 GiB of bf16 weights, the 30B class 61 GiB; 4090 24 GiB, A800 80 GiB.
FITS = {("rtx4090-pcie4", "llama2-70b", 4): False, ("rtx4090-pcie4", "llama2-70b", 8): True,
        ("rtx4090-pcie4", "llama-30b", 2): False, ("rtx4090-pcie4", "llama-30b", 4): True,
        ("a800-nvlink", "llama2-70b", 2): True, ("a800-nvlink", "llama-30b", 2): True}


@pytest.fixture(scope="module")
def rows():
    return paper.simulate_table(GPUS, MODELS, TPS, SEQ_LENS)


def find(rows, gpu, model, tp, seq_len):
    (row,) = [r for r in rows if (r["gpu"], r["model"], r["tp"], r["seq_len"]) == (gpu, model, tp, seq_len)]
    return row


def test_the_paper_models_are_published_shapes():
    assert set(paper.PAPER_MODELS) <= set(models.PUBLISHED)
    assert set(paper.DEFAULT_MODELS.split(",")) <= set(paper.PAPER_MODELS)


def test_one_row_per_setting(rows):
    assert len(rows) == len(GPUS) * len(MODELS) * len(TPS) * len(SEQ_LENS)
    assert [r["gpu"] for r in rows[:2]] == ["rtx4090-pcie4"] * 2 and rows[-1]["gpu"] == "a800-nvlink"


def test_row_invariants(rows):
    for r in rows:
        assert r["serial_ms"] == pytest.approx(r["compute_ms"] + r["comm_ms"])  # serial: nothing overlaps
        c, m = r["compute_ms"], r["comm_ms"]
        assert r["bound_reduction"] == pytest.approx(min(c, m) / (c + m))
        assert r["reduction_2even"] <= r["bound_reduction"] and r["reduction_solver"] <= r["bound_reduction"]
        assert r["reduction_2even"] == pytest.approx(1 - r["iso_2even_ms"] / r["serial_ms"])
        assert r["reduction_solver"] == pytest.approx(1 - r["iso_solver_ms"] / r["serial_ms"])
        assert r["solver_boundaries"][-1] == r["seq_len"]
        # The policy's split is at least as good as the paper's two even chunks (short of the even split's
        # own grid offset), unless the policy keeps the prompt whole, which it does only below MIN_GAIN.
        if len(r["solver_boundaries"]) > 1:
            assert r["reduction_solver"] >= r["reduction_2even"] - 0.005
        else:
            assert r["reduction_solver"] == 0 and r["reduction_2even"] < MIN_GAIN


def test_auto_is_the_policys_decision_on_the_tables_grid(rows):
    for r in rows:
        shape = model_shape(models.config(r["model"]))
        costs = LayerCosts.from_datasheet(shape, HARDWARE_PRESETS[r["gpu"]], r["tp"])
        planned = decide(costs, shape.prefill(), r["seq_len"], Policy(granularity=16))
        assert r["solver_boundaries"] == list(planned.ends)
        assert r["iso_solver_ms"] == pytest.approx(1e3 * predict(costs, shape.prefill(), planned.split).iso_s)
    # The table's knobs reach the policy: at most two chunks, boundaries on a 128-token grid.
    for r in paper.simulate_table(["rtx4090-pcie4"], ["llama2-70b"], [8], [4096], max_chunks=2, granularity=128):
        assert len(r["solver_boundaries"]) <= 2 and all(e % 128 == 0 for e in r["solver_boundaries"][:-1])


def test_batch_multiplies_tokens():
    one, two = (paper.simulate_table(["a800-nvlink"], ["llama2-70b"], [8], [2048], batch=b)[0] for b in (1, 2))
    assert two["batch"] == 2 and two["compute_ms"] > 1.5 * one["compute_ms"] and two["comm_ms"] > one["comm_ms"]


@pytest.mark.parametrize("key,fits", sorted(FITS.items()))
def test_memory_flag(rows, key, fits):
    gpu, model, tp = key
    assert find(rows, gpu, model, tp, 4096)["fits_memory"] is fits


def test_paper_column(rows):
    assert {r["gpu"]: r["paper_reduction"] for r in rows} == {"rtx4090-pcie4": 0.35, "a800-nvlink": 0.15}
    (h100,) = paper.simulate_table(["h100-nvlink"], ["llama3-70b"], [8], [2048])
    assert h100["paper_reduction"] is None


def test_overrides_scale_compute_and_communication():
    def row(**overrides):
        return paper.simulate_table(["rtx4090-pcie4"], ["llama2-70b"], [8], [4096], **overrides)[0]

    base, fast_link = row(), row(bandwidth_gbps=40.0)
    ((latency_us, bus_gbps),) = HARDWARE_PRESETS["rtx4090-pcie4"].link("nccl").all_reduce.regimes
    assert bus_gbps == pytest.approx(20.0)  # what is doubled
    latency_ms = 2 * 80 * latency_us * 1e-3  # two all-reduces per layer
    assert fast_link["comm_ms"] - latency_ms == pytest.approx((base["comm_ms"] - latency_ms) / 2)
    assert fast_link["compute_ms"] == base["compute_ms"] and fast_link["bus_gbps"] == 40.0
    # Halving the efficiency doubles the FLOPs' time; the rest (fixed costs, memory traffic) stays.
    rest_ms = row(efficiency=1e12)["compute_ms"]
    full, half = row(efficiency=0.7), row(efficiency=0.35)
    assert half["compute_ms"] - rest_ms == pytest.approx(2 * (full["compute_ms"] - rest_ms))
    assert half["efficiency"] == 0.35 and half["comm_ms"] == base["comm_ms"]


def test_chunk_specs_select_columns():
    (row,) = paper.simulate_table(["a800-nvlink"], ["llama2-70b"], [8], [999], chunks=(3,))
    assert "iso_3even_ms" in row and "reduction_3even" in row
    assert not any(k.startswith(("iso_2", "iso_solver", "solver")) for k in row)


def test_unknown_preset_names_the_argument():
    with pytest.raises(ValueError, match="gpus: unknown preset 'tpu-v5'"):
        paper.simulate_table(["tpu-v5"], MODELS, TPS, SEQ_LENS)
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        paper.simulate_table(GPUS, ["gpt-5"], TPS, SEQ_LENS)


@pytest.mark.parametrize("kw, message", [
    ({"batch": 0}, "batch must be >= 1"), ({"batch": 1.5}, "batch must be an int"),
    ({"max_chunks": 0}, "max_chunks must be >= 1"), ({"granularity": 0}, "granularity must be >= 1"),
    ({"efficiency": -1.0}, "efficiency must be > 0"), ({"efficiency": 0.0}, "efficiency must be > 0"),
    ({"bandwidth_gbps": 0.0}, "bandwidth_gbps must be > 0"),
])
def test_bad_numbers_name_the_argument(kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        paper.simulate_table(GPUS, MODELS, TPS, SEQ_LENS, **kw)


# --- command line ---
def test_cli_markdown_and_json(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    code = cli.main(["simulate", "--gpu", "a800-nvlink", "--model", "llama2-70b", "--tp", "4",
                     "--seq-len", "1024,4096", "--markdown", "--json", str(out_json)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| GPU | model | TP | S |") and "R solver" in lines[0] and "fits" in lines[0]
    assert len(lines) == 4 and all(line.startswith("| a800-nvlink | llama2-70b | 4 |") for line in lines[2:])
    saved = json.loads(out_json.read_text())
    assert [r["seq_len"] for r in saved] == [1024, 4096]
    assert f"{100 * saved[1]['reduction_2even']:.1f}%" in lines[3]
    assert saved == json.loads(json.dumps(paper.simulate_table(["a800-nvlink"], ["llama2-70b"], [4], [1024, 4096])))


def test_cli_plain_table_is_aligned(capsys):
    parser = argparse.ArgumentParser()
    paper.add_arguments(parser)
    assert paper.run(parser.parse_args(["--tp", "8", "--seq-len", "2048", "--chunks", "2,3,auto"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 4 and len({len(line) for line in lines}) == 1
    assert "ISO 3 even ms" in lines[0]


BAD_OPTIONS = [(["--gpu", "tpu"], "unknown gpu"), (["--model", "x"], "unknown model"),
               (["--tp", "0"], "integers >= 1"), (["--chunks", "two"], "integers")]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS)
def test_cli_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, name", [
    (["--batch", "0"], "batch"), (["--max-chunks", "0"], "max[-_]chunks"), (["--granularity", "0"], "granularity"),
    (["--efficiency", "-1"], "efficiency"), (["--bandwidth", "0"], "bandwidth"),
])
def test_cli_names_a_bad_number_in_one_line(argv, name, capsys):
    assert cli.main(["simulate", "--tp", "8", "--seq-len", "1024", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(name, err) and argv[1] in err, err
    assert captured.out == ""
