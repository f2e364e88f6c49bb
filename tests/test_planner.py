"""The planner (``iso_kernels.plan``, ``candidate_plans``, the ``plan`` subcommand): its off rules, its
response to the link's speed, its inputs, its errors, its cost against the simulation it replaces, and the
decision table published in bench/README.md."""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

import iso_kernels
from iso_kernels import cli, planner
from iso_kernels.costmodel import LayerCosts, load_calibration, save_calibration, simulate_prefill
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.model import ModelArgs
from iso_kernels.planner import MIN_SPLIT_TOKENS, TABLE_MODELS, candidate_plans, plan
from iso_kernels.split import ChunkSplit

ROOT = Path(__file__).resolve().parents[1]
LLAMA7 = TABLE_MODELS["llama2-7b"]
LLAMA70 = TABLE_MODELS["llama2-70b"]
# meta-llama/Llama-2-7b-hf's config.json, the keys the model reads.
HF_LLAMA7 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "hidden_act": "silu",
             "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
# Bus bandwidths (GB/s) from far faster than NVLink down to where the all-reduces outlast compute.
BANDWIDTHS = [1e5, 1e4, 3e3, 1e3, 500, 300, 150, 80, 40, 20, 10, 5, 2, 1, 0.1]
SEQ_LENS = [1, 2, 17, 255, 256, 1000, 4096]


def hardware(gpu, **overrides):
    return dataclasses.replace(HARDWARE_PRESETS[gpu], **overrides)


def serial_shares(shape, tp, seq_len, spec):
    """(compute, communication) shares of the serial prefill."""
    costs = LayerCosts.from_datasheet(shape, spec, tp)
    sim = simulate_prefill(costs, shape.n_layers, seq_len, [seq_len], hidden=shape.hidden, dtype_bytes=2)
    return sim.compute_s / sim.total_s, sim.comm_s / sim.total_s


def effective_gain(p):
    """The plan's gain, or, when it is off, what its best split would have saved (0 if none was tried)."""
    return p.gain if not p.off else max(p.split_gain or 0.0, 0.0)


# --- off rules ---
def test_a_plan_that_splits():
    p = plan(LLAMA70, 8, 4096, hardware="a800-nvlink")
    assert not p.off and p.reason is None and p.off_rule is None and len(p.split) >= 2
    assert p.ends == p.split.ends and p.ends[-1] == 4096 and p.split_gain == p.gain
    assert p.gain == pytest.approx(1 - p.predicted_iso_s / p.predicted_serial_s) and p.gain >= planner.MIN_GAIN
    on_granularity = all(e % planner.SPLIT_GRANULARITY == 0 for e in p.ends[:-1])
    assert on_granularity or p.split == ChunkSplit.even(4096, len(p.split))


def test_tp1_is_off_unless_the_costs_model_a_link():
    p = plan(LLAMA7, 1, 4096, hardware="h100-nvlink")
    assert p.off and p.off_rule == "no-comm" and "tp=1" in p.reason
    assert p.ends == (4096,) and p.gain == 0 and p.predicted_iso_s == p.predicted_serial_s
    # One rank behind an emulated link (the engine's --link at TP 1): its all-reduces cost time, so ISO pays.
    emulated = dataclasses.replace(LayerCosts.from_datasheet(LLAMA7, HARDWARE_PRESETS["h100-nvlink"], 1),
                                   ar_latency=1e-5, ar_bandwidth=2e10)
    assert not plan(LLAMA7, 1, 4096, costs=emulated).off


def test_costs_without_communication_are_off_at_any_tp():
    silent = dataclasses.replace(LayerCosts.from_datasheet(LLAMA7, HARDWARE_PRESETS["h100-nvlink"], 4),
                                 ar_latency=0.0, ar_bandwidth=float("inf"))
    p = plan(LLAMA7, 4, 4096, costs=silent)
    assert p.off and p.off_rule == "no-comm" and "no communication" in p.reason


def test_short_prompts_are_off():
    short = plan(LLAMA70, 8, MIN_SPLIT_TOKENS - 1, hardware="rtx4090-pcie4")
    assert short.off and short.off_rule == "short" and str(MIN_SPLIT_TOKENS) in short.reason
    assert short.split_gain is None
    assert not plan(LLAMA70, 8, MIN_SPLIT_TOKENS, hardware="rtx4090-pcie4").off


def test_negligible_communication_is_off():
    p = plan(LLAMA70, 8, 4096, hardware=hardware("a800-nvlink", link_gbps=1e5))
    assert p.off and p.off_rule == "comm" and "negligible communication" in p.reason


def test_communication_bound_is_off():
    p = plan(LLAMA70, 8, 4096, hardware=hardware("a800-nvlink", link_gbps=0.01))
    assert p.off and p.off_rule == "compute" and "communication-bound" in p.reason


def test_latency_bound_regime_is_named():
    # A latency comparable to a block's compute: halving a message barely shortens its all-reduce.
    p = plan(LLAMA70, 8, 4096, hardware=hardware("a800-nvlink", link_latency_us=3000))
    assert p.off and p.off_rule == "latency" and "latency-bound" in p.reason
    # A latency well under a block's compute is hidden like bandwidth time: ISO still pays (more, in fact).
    hidden = plan(LLAMA70, 8, 4096, hardware=hardware("a800-nvlink", link_latency_us=300))
    assert not hidden.off and hidden.gain > plan(LLAMA70, 8, 4096, hardware="a800-nvlink").gain


def test_gain_below_the_margin_is_off():
    spec = HARDWARE_PRESETS["a800-nvlink"]
    on = plan(LLAMA70, 4, 4096, hardware=spec)
    compute, comm = serial_shares(LLAMA70, 4, 4096, spec)
    margin = (on.gain + min(compute, comm)) / 2  # above the split's gain, below the bound on any gain
    p = plan(LLAMA70, 4, 4096, hardware=spec, min_gain=margin)
    assert p.off and p.off_rule == "gain" and p.split_gain == pytest.approx(on.gain)
    assert "predicted to save" in p.reason
    assert set(planner.OFF_RULES) == {"no-comm", "short", "comm", "compute", "latency", "gain"}


# --- the link's speed ---
@pytest.mark.parametrize("gpu, tp, seq_len", [("a800-nvlink", 8, 4096), ("rtx4090-pcie4", 4, 1024),
                                              ("h100-nvlink", 2, 512)])
def test_gain_grows_as_the_link_slows_until_communication_dominates(gpu, tp, seq_len):
    plans, comm_below_compute = [], []
    for bandwidth in BANDWIDTHS:
        spec = hardware(gpu, link_gbps=bandwidth)
        plans.append(plan(LLAMA70, tp, seq_len, hardware=spec))
        compute, comm = serial_shares(LLAMA70, tp, seq_len, spec)
        comm_below_compute.append(comm <= compute)
    gains = [effective_gain(p) for p in plans]
    assert plans[0].off and plans[0].off_rule == "comm"  # a link fast enough: nothing worth hiding
    rising = [g for g, below in zip(gains, comm_below_compute, strict=True) if below]
    assert rising == sorted(rising), f"gain fell while the link slowed: {gains}"
    assert max(gains) > 0.2 and gains[-1] < max(gains)  # past the point where comm dominates, it falls again


# --- inputs ---
def test_hf_dict_model_args_and_shape_agree():
    assert planner.model_shape(HF_LLAMA7) == planner.model_shape(ModelArgs.from_hf_config(HF_LLAMA7)) == LLAMA7
    plans = [plan(config, 4, [512, 4096], hardware="a800-nvlink")
             for config in (HF_LLAMA7, ModelArgs.from_hf_config(HF_LLAMA7), LLAMA7)]
    assert plans[0] == plans[1] == plans[2] and len(plans[0]) == 2
    assert plans[0][1] == plan(LLAMA7, 4, 4096, hardware=HARDWARE_PRESETS["a800-nvlink"])


def test_exported_lazily_from_the_package():
    assert iso_kernels.plan is plan and iso_kernels.Plan is planner.Plan
    assert "plan" in iso_kernels.__all__


@pytest.mark.parametrize("call, error, message", [
    (lambda: plan(LLAMA7, 0, 4096, hardware="a800-nvlink"), ValueError, "tp must be >= 1"),
    (lambda: plan(LLAMA7, 3, 4096, hardware="a800-nvlink"), ValueError, r"tp: attention heads \(32\)"),
    (lambda: plan(LLAMA70, 16, 4096, hardware="a800-nvlink"), ValueError, r"tp: KV heads \(8\)"),
    (lambda: plan(LLAMA7, 2, 0, hardware="a800-nvlink"), ValueError, "prompt_lens must be >= 1"),
    (lambda: plan(LLAMA7, 2, [4096, 0], hardware="a800-nvlink"), ValueError, "prompt_lens must be >= 1"),
    (lambda: plan(LLAMA7, 2, 40.5, hardware="a800-nvlink"), TypeError, "prompt_lens must be an int"),
    (lambda: plan(LLAMA7, 2, 4096), ValueError, "exactly one of costs="),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink",
                  costs=LayerCosts(0, 1, 0, 0, 1, 0, 1)), ValueError, "exactly one of costs="),
    (lambda: plan(LLAMA7, 2, 4096, hardware="v100"), ValueError, "hardware: unknown preset 'v100'"),
    (lambda: plan(LLAMA7, 2, 4096, costs={"ar_latency": 0}), TypeError, "costs must be a LayerCosts"),
    (lambda: plan("llama2-7b", 2, 4096, hardware="a800-nvlink"), TypeError, "config must be"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", min_gain=1.0), ValueError, "min_gain"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", batch=0), ValueError, "batch must be >= 1"),
    (lambda: plan({"hidden_size": 64}, 2, 4096, hardware="a800-nvlink"), ValueError, "config.json lacks"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- candidates ---
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("gpu, tp", [("rtx4090-pcie4", 8), ("a800-nvlink", 2)])
def test_candidates_rank_by_prediction_and_keep_unsplit_and_even(gpu, tp, seq_len):
    costs = LayerCosts.from_datasheet(LLAMA70, HARDWARE_PRESETS[gpu], tp)
    kw = {"batch": 1, "hidden": LLAMA70.hidden, "dtype_bytes": 2}
    found = candidate_plans(costs, LLAMA70.n_layers, seq_len, **kw, keep=3)
    assert found == candidate_plans(costs, LLAMA70.n_layers, seq_len, **kw, keep=3)  # deterministic
    assert all(isinstance(c, ChunkSplit) and c.seq_len == seq_len for c in found)
    assert len(set(found)) == len(found) <= 3 + 3
    assert ChunkSplit((seq_len,)) in found
    assert all(seq_len < k or ChunkSplit.even(seq_len, k) in found for k in (2, 3))  # always, wherever they rank
    assert not any(planner._near(a, b, 16) for i, a in enumerate(found) for b in found[:i])  # none timed twice
    times = [simulate_prefill(costs, LLAMA70.n_layers, seq_len, c, **kw).total_s for c in found]
    assert times == sorted(times)
    assert all(len(c) <= 4 for c in found)


def test_candidates_reject_bad_counts():
    costs = LayerCosts(0, 1, 0, 0, 1, 0, 1)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        candidate_plans(costs, 2, 64, batch=1, hidden=1, dtype_bytes=1, keep=0)


# --- cost: the cached path against the simulation it stands for ---
def _best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.slow
def test_plan_from_a_cached_calibration_is_cheap(tmp_path):
    # A calibration stored and read back as the engine does (costmodel's calibration cache).
    fitted = LayerCosts(attn_fixed=3e-5, attn_per_token=2e-7, attn_per_pair=4e-11, mlp_fixed=3e-5,
                        mlp_per_token=5e-7, ar_latency=2e-5, ar_bandwidth=1.5e10)
    key = {"model": "llama2-70b", "tp": 8}
    save_calibration(tmp_path / "calibration.json", fitted, key)
    costs = load_calibration(tmp_path / "calibration.json", key)
    assert costs == fitted
    seq_len, kw = 4096, {"hidden": LLAMA70.hidden, "dtype_bytes": 2}

    def fresh():
        planner._plan_one.cache_clear()
        return plan(LLAMA70, 8, seq_len, costs=costs)

    chosen = fresh()
    assert not chosen.off
    first = _best_of(fresh)
    again = _best_of(lambda: plan(LLAMA70, 8, seq_len, costs=costs), repeats=20)
    one_simulation = _best_of(lambda: simulate_prefill(costs, LLAMA70.n_layers, seq_len, chosen.split, **kw))
    # What the planner replaces: simulating every two-chunk split on its grid, one event simulation each.
    grid = range(planner.SPLIT_GRANULARITY, seq_len, planner.SPLIT_GRANULARITY)
    naive = _best_of(lambda: [simulate_prefill(costs, LLAMA70.n_layers, seq_len, [s, seq_len], **kw)
                              for s in grid], repeats=2)
    print(f"plan(): first {1e3 * first:.2f} ms, again {1e6 * again:.1f} us; one simulate_prefill "
          f"{1e3 * one_simulation:.2f} ms; {len(grid)} two-chunk simulations {1e3 * naive:.1f} ms")
    assert again < one_simulation
    assert first < naive


# --- command line ---
def test_cli_plan(capsys):
    assert cli.main(["plan", "--model", "llama2-70b", "--tp", "8", "--seq-len", "100,4096",
                     "--hardware", "a800-nvlink"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "seq_len=100" in first and "off, prompt too short" in first
    assert "seq_len=4096" in second and "chunks, ends" in second and "gain" in second


def test_cli_plan_of_a_config_file_as_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(HF_LLAMA7))
    assert cli.main(["plan", "--model", str(config), "--tp", "4", "--seq-len", "4096", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    (got,) = row["plans"]
    expected = plan(HF_LLAMA7, 4, 4096, hardware="h100-nvlink")
    assert row["gpu"] == "h100-nvlink" and got["ends"] == list(expected.ends) and got["gain"] == expected.gain


def test_cli_plan_rejects_a_bad_tp(capsys):
    assert cli.main(["plan", "--model", "llama2-7b", "--tp", "3"]) == 2
    assert "tp: attention heads (32) are not divisible by tp=3" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--tp", "0"), ("--batch", "0"), ("--max-chunks", "-1"),
                                           ("--seq-len", "0")])
def test_cli_plan_names_a_bad_number_in_one_line(capsys, option, value):
    """A new user's ``plan --tp 0`` once ended in a ZeroDivisionError traceback (the table's memory column)."""
    assert cli.main(["plan", option, value]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {option} must be >= 1, got {value}"


def test_cli_table_is_the_published_one(capsys):
    assert cli.main(["plan", "--table", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    lines = table.splitlines()
    expected_rows = len(planner.TABLE_GPUS) * len(TABLE_MODELS) * len(planner.TABLE_TPS)
    assert len(lines) == 2 + expected_rows
    assert lines[0].startswith("| GPU | model | TP | fits | 256 | 512 | 1k")
    assert table in (ROOT / "bench" / "README.md").read_text(), \
        "bench/README.md's decision table is stale: python -m iso_kernels plan --table --markdown"
    assert np.all([line.count("|") == lines[0].count("|") for line in lines])
