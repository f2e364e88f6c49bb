"""The split policy (``planning.policy``): ``decide``, the one function that says whether and where to split a
prompt, and its knobs (``Policy``), on cost models written in the test; then ``plan``, its entry from a model
config."""

import dataclasses
import math
import time

import numpy as np
import pytest

import iso_kernels
from iso_kernels import models
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.model import ModelArgs
from iso_kernels.planning import (
    LayerCosts,
    Plan,
    Policy,
    PrefillShape,
    best_split,
    decide,
    load_calibration,
    model_shape,
    plan,
    predict,
    save_calibration,
    simulate_prefill,
    split_trial,
)
from iso_kernels.planning.policy import (
    MAX_AUTO_CHUNKS,
    MIN_GAIN,
    OFF_RULES,
    SPLIT_GRANULARITY,
    TRIAL_GRANULARITY,
    UNEVEN_SPLIT_MIN_GAIN,
)
from iso_kernels.split import ChunkSplit
from iso_kernels.tables import decision, paper

from helpers import preset

SHAPE = PrefillShape(10, hidden=64, batch=1, dtype_bytes=2)


# --- decide: the split ---
def _gain_over_even(costs, split):
    even = ChunkSplit.even(split.seq_len, len(split))
    return 1 - predict(costs, SHAPE, split).iso_s / predict(costs, SHAPE, even).iso_s


def test_policy_keeps_the_even_split_unless_the_uneven_one_is_clearly_faster():
    # Linear costs: the solver's best two-chunk split beats the even one by well under UNEVEN_SPLIT_MIN_GAIN.
    flat = LayerCosts(0, 1.0, 0.0, 0, 1.0, 0, 0.5)
    solver = best_split(flat, SHAPE, 1024, max_chunks=2)
    assert solver != ChunkSplit.even(1024) and 0 < _gain_over_even(flat, solver) < UNEVEN_SPLIT_MIN_GAIN
    assert decide(flat, SHAPE, 1024, Policy(granularity=16, chunks=2)).split == ChunkSplit.even(1024)
    # A quadratic attention term and a link about as slow as compute: the uneven split is clearly faster.
    quadratic = LayerCosts(0, 0.1, 1e-3, 0, 0.1, 0, 3e2)
    chosen = decide(quadratic, SHAPE, 1024, Policy(granularity=16, chunks=2)).split
    assert chosen != ChunkSplit.even(1024) and _gain_over_even(quadratic, chosen) > UNEVEN_SPLIT_MIN_GAIN


def test_policy_gives_the_chunks_asked_for():
    costs = LayerCosts(0, 0.1, 1e-3, 0, 0.1, 0, 3e2)
    for chunks in (1, 2, 3, 4):
        fixed = decide(costs, SHAPE, 1024, Policy(granularity=16, chunks=chunks))
        assert len(fixed.split) == chunks and not fixed.off
    assert 1 <= len(decide(costs, SHAPE, 1024, Policy(granularity=16)).split) <= MAX_AUTO_CHUNKS


def test_policy_gives_the_chunks_asked_for_in_a_prompt_shorter_than_the_grid():
    costs = LayerCosts(0, 0.1, 1e-3, 0, 0.1, 0, 3e2)
    for seq_len in (2, 10, 15):
        assert len(decide(costs, SHAPE, seq_len, Policy(granularity=16, chunks=2)).split) == 2


def test_policy_keeps_the_prompt_whole_without_communication():
    # The solver's side of this case: test_solver.py (splitting only adds fixed costs).
    costs = LayerCosts(1e-5, 1e-6, 1e-9, 1e-5, 2e-6, 0.0, math.inf)
    for min_gain in (0.0, 0.01):
        got = decide(costs, PrefillShape(80, hidden=8192), 4096, Policy(granularity=16, min_gain=min_gain))
        assert (got.split, got.off, got.off_rule) == (ChunkSplit((4096,)), True, "no-comm")


def test_policy_keeps_the_prompt_whole_when_fixed_costs_outweigh_communication():
    # Hiding ~1.3 us of all-reduce per block cannot pay for another 1 ms block overhead: with a margin the
    # communication is too small to bother; without one, still no split beats the unsplit prompt.
    costs, shape = LayerCosts(1e-3, 1e-6, 0.0, 1e-3, 1e-6, 0.0, 1e11), PrefillShape(10, hidden=64)
    margin = decide(costs, shape, 1024, Policy(granularity=16, min_gain=0.01))
    assert (margin.split, margin.off, margin.off_rule) == (ChunkSplit((1024,)), True, "comm")
    none = decide(costs, shape, 1024, Policy(granularity=16, min_gain=0.0))
    assert (none.split, none.off, none.off_rule, none.split_gain) == (ChunkSplit((1024,)), True, "gain", 0.0)
    assert none.predicted_iso_s == none.predicted_serial_s


def test_policy_rejects_a_min_gain_outside_zero_to_one():
    with pytest.raises(ValueError, match="min_gain"):
        Policy(min_gain=1.5)


# Without costs (a prompt too short to calibrate on) the policy is the even split: the split trial's default.
def test_policy_without_costs_is_the_even_split():
    timed = []

    def time_split(split):
        timed.append(split)
        return 1.0  # all alike: the trial keeps its default

    def choose(seq_len, chunks=None):
        return split_trial(None, SHAPE, seq_len, time_split, {"test": "no costs"}, chunks=chunks, writer=False)

    assert choose(100).split == ChunkSplit.even(100, 2)
    assert set(timed) == {ChunkSplit((100,)), ChunkSplit.even(100, 2)}
    timed.clear()
    assert choose(100, 3).split == ChunkSplit.even(100, 3)
    assert choose(1).split == ChunkSplit((1,))
    assert timed == []  # one candidate each: nothing to time


# --- plan(): the Python entry, from a model config; its off rules ---
LLAMA7 = model_shape(models.config("llama2-7b"))
LLAMA70 = model_shape(models.config("llama2-70b"))
# meta-llama/Llama-2-7b-hf's config.json, the keys the model reads.
HF_LLAMA7 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "hidden_act": "silu",
             "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
# Bus bandwidths (GB/s) from far faster than NVLink down to where the all-reduces outlast compute.
BANDWIDTHS = [1e5, 1e4, 3e3, 1e3, 500, 300, 150, 80, 40, 20, 10, 5, 2, 1, 0.1]


def serial_shares(shape, tp, seq_len, spec):
    """(compute, communication) shares of the serial prefill."""
    costs = LayerCosts.from_datasheet(shape, spec, tp)
    sim = simulate_prefill(costs, shape.prefill(), ChunkSplit((seq_len,)))
    return sim.compute_s / sim.total_s, sim.comm_s / sim.total_s


def effective_gain(p):
    """The plan's gain, or, when it is off, what its best split would have saved (0 if none was tried)."""
    return p.gain if not p.off else max(p.split_gain or 0.0, 0.0)


def test_a_plan_that_splits():
    p = plan(LLAMA70, 8, 4096, hardware="a800-nvlink")
    assert not p.off and p.reason is None and p.off_rule is None and len(p.split) >= 2
    assert p.ends == p.split.ends and p.ends[-1] == 4096 and p.split_gain == p.gain
    assert p.gain == pytest.approx(1 - p.predicted_iso_s / p.predicted_serial_s) and p.gain >= MIN_GAIN
    on_granularity = all(e % SPLIT_GRANULARITY == 0 for e in p.ends[:-1])
    assert on_granularity or p.split == ChunkSplit.even(4096, len(p.split))
    assert p.as_dict()["ends"] == list(p.ends) and p.as_dict()["chunks"] == len(p.split)


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
    min_split_tokens = 2 * SPLIT_GRANULARITY
    assert Policy().min_split_tokens == min_split_tokens
    short = plan(LLAMA70, 8, min_split_tokens - 1, hardware="rtx4090-pcie4")
    assert short.off and short.off_rule == "short" and str(min_split_tokens) in short.reason
    assert short.split_gain is None
    assert not plan(LLAMA70, 8, min_split_tokens, hardware="rtx4090-pcie4").off
    # The rule is the policy's granularity's: at the trial's grid the same prompt may split.
    costs = LayerCosts.from_datasheet(LLAMA70, HARDWARE_PRESETS["rtx4090-pcie4"], 8)
    assert not decide(costs, LLAMA70.prefill(), min_split_tokens - 1, Policy(granularity=TRIAL_GRANULARITY)).off
    assert decide(costs, LLAMA70.prefill(), 2 * TRIAL_GRANULARITY - 1,
                  Policy(granularity=TRIAL_GRANULARITY)).off_rule == "short"


def test_negligible_communication_is_off():
    p = plan(LLAMA70, 8, 4096, hardware=preset("a800-nvlink", link_gbps=1e5))
    assert p.off and p.off_rule == "comm" and "negligible communication" in p.reason


def test_communication_bound_is_off():
    p = plan(LLAMA70, 8, 4096, hardware=preset("a800-nvlink", link_gbps=0.01))
    assert p.off and p.off_rule == "compute" and "communication-bound" in p.reason


def test_latency_bound_regime_is_named():
    # A latency comparable to a block's compute: halving a message barely shortens its all-reduce.
    p = plan(LLAMA70, 8, 4096, hardware=preset("a800-nvlink", link_latency_us=3000))
    assert p.off and p.off_rule == "latency" and "latency-bound" in p.reason
    # A latency well under a block's compute is hidden like bandwidth time: ISO still pays (more, in fact).
    hidden = plan(LLAMA70, 8, 4096, hardware=preset("a800-nvlink", link_latency_us=300))
    assert not hidden.off and hidden.gain > plan(LLAMA70, 8, 4096, hardware="a800-nvlink").gain


def test_gain_below_the_margin_is_off():
    spec = HARDWARE_PRESETS["a800-nvlink"]
    on = plan(LLAMA70, 4, 4096, hardware=spec)
    compute, comm = serial_shares(LLAMA70, 4, 4096, spec)
    margin = (on.gain + min(compute, comm)) / 2  # above the split's gain, below the bound on any gain
    p = plan(LLAMA70, 4, 4096, hardware=spec, min_gain=margin)
    # The best split considered: the even one that ran, or an uneven one a little faster (kept where the even
    # split alone would not clear the margin).
    assert p.off and p.off_rule == "gain" and on.gain <= p.split_gain < margin
    assert p.split_gain == pytest.approx(on.gain, abs=UNEVEN_SPLIT_MIN_GAIN)
    assert "predicted to save" in p.reason
    assert set(OFF_RULES) == {"no-comm", "short", "comm", "compute", "latency", "gain"}


def test_a_fixed_chunk_count_is_never_off():
    costs = LayerCosts.from_datasheet(LLAMA70, preset("a800-nvlink", link_gbps=1e5), 8)  # "comm" when free
    assert decide(costs, LLAMA70.prefill(), 4096).off_rule == "comm"
    fixed = decide(costs, LLAMA70.prefill(), 4096, Policy(chunks=2))
    assert not fixed.off and len(fixed.split) == 2 and fixed.gain < MIN_GAIN


# --- the link's speed ---
@pytest.mark.parametrize("gpu, tp, seq_len", [("a800-nvlink", 8, 4096), ("rtx4090-pcie4", 4, 1024),
                                              ("h100-nvlink", 2, 512)])
def test_gain_grows_as_the_link_slows_until_communication_dominates(gpu, tp, seq_len):
    plans, comm_below_compute = [], []
    for bandwidth in BANDWIDTHS:
        spec = preset(gpu, link_gbps=bandwidth, link_latency_us=10.0)  # NVLink's small-message latency
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
    assert model_shape(HF_LLAMA7) == model_shape(ModelArgs.from_hf_config(HF_LLAMA7)) == LLAMA7
    assert model_shape(models.config("llama2-7b")) == LLAMA7
    plans = [plan(config, 4, [512, 4096], hardware="a800-nvlink")
             for config in (HF_LLAMA7, ModelArgs.from_hf_config(HF_LLAMA7), LLAMA7)]
    assert plans[0] == plans[1] == plans[2] and len(plans[0]) == 2
    assert plans[0][1] == plan(LLAMA7, 4, 4096, hardware=HARDWARE_PRESETS["a800-nvlink"])
    assert plan(LLAMA7, 4, np.array([512, 4096]), hardware="a800-nvlink") == plans[0]
    assert plan(LLAMA7, 4, np.int64(4096), hardware="a800-nvlink") == plans[0][1]


def test_plan_is_decide_with_the_policy_of_its_arguments():
    costs = LayerCosts.from_datasheet(LLAMA70, HARDWARE_PRESETS["rtx4090-pcie4"], 8)
    for kw, policy in (({}, Policy()), ({"min_gain": 0.1, "max_chunks": 2}, Policy(min_gain=0.1, max_chunks=2))):
        for batch in (1, 3):
            got = plan(LLAMA70, 8, [512, 4096], costs=costs, batch=batch, **kw)
            assert got == [decide(costs, LLAMA70.prefill(batch), n, policy) for n in (512, 4096)]
    assert len(plan(LLAMA70, 8, 4096, costs=costs, max_chunks=2).split) <= 2
    # the datasheet's costs are those of hardware= and tp
    assert plan(LLAMA70, 4, 4096, hardware="rtx4090-pcie4") == decide(
        LayerCosts.from_datasheet(LLAMA70, HARDWARE_PRESETS["rtx4090-pcie4"], 4), LLAMA70.prefill(), 4096)


def test_exported_lazily_from_the_package():
    assert iso_kernels.plan is plan and iso_kernels.Plan is Plan
    assert "plan" in iso_kernels.__all__


@pytest.mark.parametrize("call, error, message", [
    (lambda: plan(LLAMA7, 0, 4096, hardware="a800-nvlink"), ValueError, "tp must be >= 1"),
    (lambda: plan(LLAMA7, "8", 4096, hardware="a800-nvlink"), TypeError, "tp must be an int"),
    (lambda: plan(LLAMA7, 3, 4096, hardware="a800-nvlink"), ValueError,
     r"attention heads \(32\) are not divisible by tp=3"),
    (lambda: plan(dataclasses.replace(LLAMA70, n_heads=24, n_kv_heads=6), 4, 4096, hardware="a800-nvlink"),
     ValueError, r"KV heads \(6\) are neither divisible by tp=4 nor a divisor of it"),
    (lambda: plan(LLAMA7, 2, 0, hardware="a800-nvlink"), ValueError, "prompt_lens must be >= 1"),
    (lambda: plan(LLAMA7, 2, [4096, 0], hardware="a800-nvlink"), ValueError, "prompt_lens must be >= 1"),
    (lambda: plan(LLAMA7, 2, 40.5, hardware="a800-nvlink"), TypeError, "prompt_lens must be an int"),
    (lambda: plan(LLAMA7, 2, True, hardware="a800-nvlink"), TypeError, "prompt_lens must be an int"),
    (lambda: plan(LLAMA7, 2, "4096", hardware="a800-nvlink"), TypeError, "prompt_lens must be an int"),
    (lambda: plan(LLAMA7, 2, 4096), ValueError, "exactly one of costs="),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink",
                  costs=LayerCosts(0, 1, 0, 0, 1, 0, 1)), ValueError, "exactly one of costs="),
    (lambda: plan(LLAMA7, 2, 4096, hardware="v100"), ValueError, "hardware: unknown preset 'v100'"),
    (lambda: plan(LLAMA7, 2, 4096, hardware=5), TypeError, "hardware must be a preset name or a HardwareSpec"),
    (lambda: plan(LLAMA7, 2, 4096, costs={"ar_latency": 0}), TypeError, "costs must be a LayerCosts"),
    (lambda: plan("llama2-7b", 2, 4096, hardware="a800-nvlink"), TypeError, "config must be"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", min_gain=1.0), ValueError, "min_gain"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", min_gain=-0.1), ValueError, "min_gain"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", min_gain="0.1"), ValueError, "min_gain"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", min_gain=None), ValueError, "min_gain"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", max_chunks=0), ValueError, "max_chunks must be >= 1"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", max_chunks=2.0), TypeError,
     "max_chunks must be an int"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", batch=0), ValueError, "batch must be >= 1"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", batch=1.5), TypeError, "batch must be an int"),
    (lambda: plan(LLAMA7, 2, 4096, hardware="a800-nvlink", dtype_bytes=0), ValueError,
     "dtype_bytes must be >= 1"),
    (lambda: plan({"hidden_size": 64}, 2, 4096, hardware="a800-nvlink"), ValueError, "config.json lacks"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("call, error, message", [
    (lambda: decide(LayerCosts(0, 1, 0, 0, 1, 0, 1), SHAPE, 0), ValueError, "seq_len must be >= 1"),
    (lambda: decide(LayerCosts(0, 1, 0, 0, 1, 0, 1), SHAPE, 10, Policy(chunks=20)), ValueError,
     "chunks: a prompt of 10 tokens cannot be cut into 20 chunks"),
    (lambda: Policy(max_chunks=0), ValueError, "max_chunks must be >= 1"),
    (lambda: Policy(granularity=0), ValueError, "granularity must be >= 1"),
    (lambda: Policy(chunks=0), ValueError, "chunks must be >= 1"),
    (lambda: Policy(uneven_min_gain=1.0), ValueError, "uneven_min_gain"),
    (lambda: PrefillShape(0, 64), ValueError, "n_layers must be >= 1"),
    (lambda: PrefillShape(4, 64, batch=0), ValueError, "batch must be >= 1"),
])
def test_decide_names_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- memoised: the cached path against the simulation it stands for ---
def _best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_decide_is_memoised_on_its_inputs():
    costs = LayerCosts.from_datasheet(LLAMA70, HARDWARE_PRESETS["a800-nvlink"], 8)
    first = decide(costs, LLAMA70.prefill(), 3000, Policy())
    hits = decide.cache_info().hits
    assert decide(costs, LLAMA70.prefill(), 3000, Policy()) is first  # equal inputs: the same answer object
    assert decide.cache_info().hits == hits + 1
    assert plan(LLAMA70, 8, 3000, costs=costs) is first


@pytest.mark.slow
def test_plan_from_a_cached_calibration_is_cheap(tmp_path):
    # A calibration stored and read back as the engine does (planning.calibration's cache file).
    fitted = LayerCosts(attn_fixed=3e-5, attn_per_token=2e-7, attn_per_pair=4e-11, mlp_fixed=3e-5,
                        mlp_per_token=5e-7, ar_latency=2e-5, ar_bandwidth=1.5e10)
    key = {"model": "llama2-70b", "tp": 8}
    save_calibration(tmp_path / "calibration.json", fitted, key)
    costs = load_calibration(tmp_path / "calibration.json", key)
    assert costs == fitted
    seq_len, shape = 4096, LLAMA70.prefill()

    def fresh():
        decide.cache_clear()
        return plan(LLAMA70, 8, seq_len, costs=costs)

    chosen = fresh()
    assert not chosen.off
    first = _best_of(fresh)
    again = _best_of(lambda: plan(LLAMA70, 8, seq_len, costs=costs), repeats=20)
    one_simulation = _best_of(lambda: simulate_prefill(costs, shape, chosen.split))
    # What the policy replaces: simulating every two-chunk split on its grid, one event simulation each.
    grid = range(SPLIT_GRANULARITY, seq_len, SPLIT_GRANULARITY)
    naive = _best_of(lambda: [simulate_prefill(costs, shape, ChunkSplit((s, seq_len))) for s in grid], repeats=2)
    print(f"plan(): first {1e3 * first:.2f} ms, again {1e6 * again:.1f} us; one simulate_prefill "
          f"{1e3 * one_simulation:.2f} ms; {len(grid)} two-chunk simulations {1e3 * naive:.1f} ms")
    assert again < one_simulation
    assert first < naive


# --- one decision: plan(), the decision table and the simulate table all answer with decide() ---
# (the split trial's agreement: tests/planning/test_trial.py)
GRID_MODELS = ("llama2-7b", "codellama-34b", "llama2-70b")
GRID_TPS = (2, 4, 8)
GRID_SEQ_LENS = tuple(2**i for i in range(8, 16))  # 256 .. 32768


@pytest.fixture(scope="module")
def grid_costs():
    """(gpu, collective, model, tp) -> (the preset's costs, shape) for every hardware preset and its links."""
    return {(gpu, link.collective, name, tp): (
        LayerCosts.from_datasheet(model_shape(models.config(name)), spec, tp, link.collective),
        model_shape(models.config(name)))
        for gpu, spec in HARDWARE_PRESETS.items() for link in spec.links for name in GRID_MODELS for tp in GRID_TPS}


def test_plan_and_the_decision_table_agree_with_decide(grid_costs):
    rows = decision.decision_table(tuple(HARDWARE_PRESETS), {name: models.config(name) for name in GRID_MODELS},
                                   GRID_TPS, GRID_SEQ_LENS)
    assert len(rows) == len(grid_costs)
    rendered = decision.format_decision_table(rows, GRID_SEQ_LENS, markdown=True).splitlines()[2:]
    rules = set()
    for row, line in zip(rows, rendered, strict=True):
        key = row["gpu"], row["collective"], row["model"], row["tp"]
        costs, shape = grid_costs[key]
        decided = [decide(costs, shape.prefill(), seq_len, Policy()) for seq_len in GRID_SEQ_LENS]
        planned = plan(models.config(row["model"]), row["tp"], list(GRID_SEQ_LENS), hardware=row["gpu"],
                       collective=row["collective"])
        assert planned == decided, key
        assert row["plans"] == planned, key
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:4] == [row["gpu"], row["collective"], row["model"], str(row["tp"])]
        assert cells[5:] == [decision._cell(p) for p in decided]
        rules |= {(p.off_rule, len(p.split)) for p in decided}
    # not vacuous: the grid holds plans of two and three chunks, and plans that are off
    assert {(None, 2), (None, 3)} <= rules and any(rule is not None for rule, _ in rules)


def test_the_simulate_tables_auto_split_is_decides(grid_costs):
    rows = paper.simulate_table(tuple(HARDWARE_PRESETS), GRID_MODELS, GRID_TPS, GRID_SEQ_LENS, chunks=("auto",))
    assert len(rows) == len(HARDWARE_PRESETS) * len(GRID_MODELS) * len(GRID_TPS) * len(GRID_SEQ_LENS)
    policy = Policy(granularity=TRIAL_GRANULARITY)
    counts = set()
    for r in rows:
        costs, shape = grid_costs[r["gpu"], "nccl", r["model"], r["tp"]]  # the simulator's link
        decided = decide(costs, shape.prefill(), r["seq_len"], policy)
        assert r["solver_boundaries"] == list(decided.ends), (r["gpu"], r["model"], r["tp"], r["seq_len"])
        assert r["iso_solver_ms"] == pytest.approx(1e3 * decided.predicted_iso_s)
        counts.add(len(decided.split))
    assert counts >= {1, 2, 3}
