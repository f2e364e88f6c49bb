"""``planning.trial``: the race among timed splits, its choice, its cache, the candidates it times
(``solver.ranked_splits``), and its agreement with ``policy.decide`` where the timing is the model's own."""

import json
import math

import pytest

from iso_kernels import envs, models
from iso_kernels.planning import (
    LayerCosts,
    PlanCorrection,
    Policy,
    PrefillShape,
    TrialCandidate,
    decide,
    model_shape,
    predict,
    ranked_splits,
    simulate_prefill,
    solver,
    split_trial,
    timed_rounds,
    trial,
)
from iso_kernels.planning.policy import MIN_GAIN, TRIAL_GRANULARITY, TRIAL_MARGIN, UNEVEN_SPLIT_MIN_GAIN
from iso_kernels.planning.trial import FINAL_ROUNDS, FINALISTS, TRIAL_ROUNDS, _pick
from iso_kernels.split import ChunkSplit

from helpers import preset

LLAMA7 = model_shape(models.config("llama2-7b"))
LLAMA34 = model_shape(models.config("codellama-34b"))
LLAMA70 = model_shape(models.config("llama2-70b"))
TRIAL_POLICY = Policy(granularity=TRIAL_GRANULARITY)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every trial here stores its choice in a fresh folder (``envs.cache_dir``), never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(envs.CACHE_DIR_VAR, str(folder))
    return folder


def datasheet(shape, gpu, tp, **overrides):
    return LayerCosts.from_datasheet(shape, preset(gpu, **overrides), tp)


# --- _pick: the choice among timed rounds ---
def pick(seconds, default, whole=None):
    """``_pick``'s index (its verdict: ``test_the_verdict_says_why``)."""
    return _pick(seconds, default, whole)[0]


def test_a_plan_replaces_the_default_only_where_it_wins_round_for_round():
    even = [1.00, 1.20, 0.90]  # the machine's load drifts from round to round; interleaved plans share it
    clearly = [t * (1 - 2 * TRIAL_MARGIN) for t in even]
    barely = [t * (1 - TRIAL_MARGIN / 2) for t in even]
    assert pick([even, clearly], default=0) == 1
    assert pick([even, barely], default=0) == 0
    lucky = [0.80, 1.30, 0.95]  # the fastest median (0.95 < 1.00), but slower in two of the three rounds
    assert pick([even, lucky], default=0) == 0
    assert pick([clearly, even], default=1) == 0  # the default need not come first


def test_the_prompt_stays_whole_where_the_model_and_the_measurement_agree_splitting_does_not_pay():
    even = [1.00, 1.20, 0.90]
    whole = [t * (1 - TRIAL_MARGIN / 2) for t in even]  # faster, but not by the margin
    assert pick([even, whole], default=0) == 0  # the model predicts a split to gain: the even split stays
    assert pick([even, whole], default=0, whole=1) == 1
    slower = [t * 1.01 for t in even]
    assert pick([even, slower], default=0, whole=1) == 0  # the measurement disagrees with the model
    assert pick([even, whole[:2]], default=0, whole=1) == 0  # out of the race: not compared


def test_only_plans_timed_in_every_round_of_the_default_are_chosen():
    even = [1.0] * 7
    dropped = [0.5] * 3  # fast in the first rounds, then out of the race: too few rounds to compare
    finalist = [0.9] * 7
    assert pick([even, dropped, finalist], default=0) == 2


def test_the_verdict_says_why():
    even = [1.0] * 4
    assert "faster than the policy's plan" in _pick([even, [0.9] * 4], default=0)[1]
    assert _pick([even, [0.99] * 4], default=0)[1].startswith("the policy's plan; no measurable difference")
    assert _pick([even, [0.99] * 4], default=0, whole=1)[1].startswith("unsplit: the corrected model")
    assert _pick([even, [1.1] * 4], default=0)[1] == "the policy's plan; measured the fastest"


# --- timed_rounds and the race, on scripted timings ---
class _ScriptedTiming:
    """A ``time_split`` whose runs take scripted seconds (per key, a list consumed run by run, or a constant);
    it records the order of the runs."""

    def __init__(self, seconds):
        self.seconds, self.order = seconds, []

    def __call__(self, key):
        self.order.append(key)
        times = self.seconds[key]
        return times.pop(0) if isinstance(times, list) else times


def test_timed_rounds_rotate_drop_the_warmup_and_extend_to_the_budget():
    timing, keys = _ScriptedTiming({"a": 0.1, "b": 0.2}), ["a", "b"]

    def run(i):
        return timing(keys[i])

    rounds = []
    seconds = timed_rounds(run, 2, 2, after_round=lambda: rounds.append(len(timing.order)))
    assert seconds == [[0.1, 0.1], [0.2, 0.2]] and timing.order == ["a", "b", "b", "a", "a", "b"]
    assert rounds == [2, 4, 6]  # after every round, the warm-up's too
    # 0.3 s per round: rounds until the timed ones took 1.0 s (4 rounds), at least 2, at most max_repeats
    assert len(timed_rounds(run, 2, 2, warmup=0, budget_s=1.0, max_repeats=9)[0]) == 4
    assert len(timed_rounds(run, 2, 2, warmup=0, budget_s=100.0, max_repeats=5)[0]) == 5
    assert len(timed_rounds(run, 2, 2, warmup=0, budget_s=0.1, max_repeats=5)[0]) == 2


def test_the_race_times_the_fastest_and_the_default_on_and_drops_the_rest():
    rounds = 1 + TRIAL_ROUNDS  # the first race's warm-up and timed rounds
    slow = {f"slow{i}": 5.0 for i in range(3)}
    # "lucky" leads the first rounds, then runs slower than the default: the final rounds overturn it
    timing = _ScriptedTiming({"even": 1.0, "good": 0.9, "lucky": [0.5] * rounds + [1.2] * 99, **slow})
    candidates = ["even", "good", "lucky", *slow]
    seconds = trial._race(lambda i: timing(candidates[i]), len(candidates), 0)
    lengths = [len(times) for times in seconds]
    assert lengths[3:] == [TRIAL_ROUNDS] * 3  # slower than FINALISTS others: out after the first rounds
    assert FINALISTS == 3 and lengths[0] == lengths[1] == lengths[2] >= TRIAL_ROUNDS + FINAL_ROUNDS
    assert candidates[pick(seconds, default=0)] == "good"


# --- the corrected model's "off", which lets the trial keep a prompt whole ---
# 1 ms of compute per block over 256 tokens, 0.5 ms per all-reduce: two chunks hide a quarter of it
TOY_COSTS = LayerCosts(attn_fixed=0.0, attn_per_token=1e-3 / 256, attn_per_pair=0.0, mlp_fixed=0.0,
                       mlp_per_token=1e-3 / 256, ar_latency=5e-4, ar_bandwidth=math.inf)
TOY_SHAPE = PrefillShape(n_layers=4, hidden=64, batch=1, dtype_bytes=4)


def test_off_is_predicted_by_the_corrected_model_where_chunks_cost_more_than_they_hide():
    assert not decide(PlanCorrection().apply(TOY_COSTS), TOY_SHAPE, 256, TRIAL_POLICY).off
    # the trial found every extra chunk's block to cost 1 ms more: no split saves MIN_GAIN
    off = decide(PlanCorrection(block_offset_s=1e-3).apply(TOY_COSTS), TOY_SHAPE, 256, TRIAL_POLICY)
    assert off.off and off.off_rule in ("gain", "latency") and (off.split_gain or 0.0) < MIN_GAIN


def model_timing(costs, shape):
    """A ``time_split`` that measures what ``costs`` predict (memoised: the race asks for each split often)."""
    seen = {}

    def time_split(split):
        if split not in seen:
            seen[split] = simulate_prefill(costs, shape, split).total_s
        return seen[split]

    return time_split


def test_the_trial_keeps_the_prompt_whole_where_the_corrected_model_is_off_and_whole_measured_no_slower():
    """The model predicts the plan to gain; the timings say each extra chunk's blocks cost more. Where the plan
    then measures 0.5-3.5 % slower than the unsplit prompt (within TRIAL_MARGIN: the fastest-candidate rule
    keeps the plan), the corrected model's "off" keeps the prompt whole."""
    planned = decide(TOY_COSTS, TOY_SHAPE, 256, TRIAL_POLICY)
    assert not planned.off and len(planned.split) >= 2
    whole = ChunkSplit((256,))
    offsets = [k * 1e-6 for k in range(1, 2000)]

    def measured(offset):
        return PlanCorrection(block_offset_s=offset).apply(TOY_COSTS)

    def ratio(offset):  # the plan's measured time over the unsplit prompt's
        costs = measured(offset)
        return simulate_prefill(costs, TOY_SHAPE, planned.split).total_s / simulate_prefill(
            costs, TOY_SHAPE, whole).total_s

    offset = next(o for o in offsets if 1.005 < ratio(o) < 1.035)
    assert decide(measured(offset), TOY_SHAPE, 256, TRIAL_POLICY).off
    choice = split_trial(TOY_COSTS, TOY_SHAPE, 256, model_timing(measured(offset), TOY_SHAPE), {"case": "whole"})
    assert choice.source == "trial" and choice.split == whole
    assert choice.correction.block_offset_s == pytest.approx(offset, rel=0.05)
    assert choice.costs == choice.correction.apply(TOY_COSTS)
    # Timed as predicted, the same prompt keeps the plan.
    assert split_trial(TOY_COSTS, TOY_SHAPE, 256, model_timing(TOY_COSTS, TOY_SHAPE),
                       {"case": "as predicted"}).split == planned.split


# --- split_trial end to end ---
def test_a_candidate_replaces_the_plan_only_where_it_wins_by_the_margin():
    costs, shape, seq_len = datasheet(LLAMA70, "a800-nvlink", 8), LLAMA70.prefill(), 4096
    planned = decide(costs, shape, seq_len, TRIAL_POLICY)
    assert not planned.off
    rival = ChunkSplit.even(seq_len, 3)
    assert rival != planned.split
    plan_s = simulate_prefill(costs, shape, planned.split).total_s

    def timing(factor):
        predicted = model_timing(costs, shape)
        return lambda split: plan_s * factor if split == rival else predicted(split)

    clearly = split_trial(costs, shape, seq_len, timing(1 - 2 * TRIAL_MARGIN), {"case": "clearly"})
    assert clearly.split == rival and clearly.source == "trial"
    barely = split_trial(costs, shape, seq_len, timing(1 - TRIAL_MARGIN / 2), {"case": "barely"})
    assert barely.split == planned.split


def test_the_trial_reports_each_candidate_and_its_cost():
    costs, shape, seq_len = datasheet(LLAMA70, "rtx4090-pcie4", 8), LLAMA70.prefill(), 2048
    spent = []
    predicted = model_timing(costs, shape)

    def time_split(split):
        spent.append(predicted(split))
        return spent[-1]

    choice = split_trial(costs, shape, seq_len, time_split, {"case": "report"})
    assert choice.source == "trial" and choice.calibrated_costs == costs
    candidates = [ChunkSplit(c.ends) for c in choice.trial]
    assert candidates == ranked_splits(costs, shape, seq_len, keep=trial.TRIAL_CANDIDATES,
                                       granularity=TRIAL_GRANULARITY,
                                       must=(decide(costs, shape, seq_len, TRIAL_POLICY).split,))
    for c in choice.trial:
        assert isinstance(c, TrialCandidate)
        split = ChunkSplit(c.ends)
        assert c.predicted_iso_ms == pytest.approx(predict(costs, shape, split).iso_s * 1e3)
        assert c.measured_iso_ms == pytest.approx(predicted(split) * 1e3)
        assert c.rounds >= TRIAL_ROUNDS
    assert choice.trial_s == pytest.approx(sum(spent)) and len(spent) > len(candidates) * (1 + TRIAL_ROUNDS)
    # Timed as predicted: the correction changes (almost) nothing.
    assert choice.correction.compute_scale == pytest.approx(1.0, abs=0.02)


def test_a_choice_is_cached_per_length_bucket_and_timed_again_on_refresh(cache_dir):
    costs, shape = datasheet(LLAMA70, "a800-nvlink", 8), LLAMA70.prefill()
    calls = []
    predicted = model_timing(costs, shape)

    def time_split(split):
        calls.append(split)
        return predicted(split)

    key = {"model": "llama2-70b", "tp": 8}
    first = split_trial(costs, shape, 4096, time_split, key)
    assert first.source == "trial" and calls
    stored = json.loads((cache_dir / "split_trials.json").read_text())
    assert stored, "the trial's choice was not stored"
    calls.clear()
    again = split_trial(costs, shape, 4096, time_split, key)
    assert again.source == "cached" and not calls
    assert again.split == first.split and again.correction == first.correction
    # A length of the same power-of-two bucket reuses the choice, its ends scaled.
    near = split_trial(costs, shape, 4000, time_split, key)
    assert near.source == "cached" and not calls and near.split == ChunkSplit.from_fractions(
        4000, [end / 4096 for end in first.split.ends])
    assert split_trial(costs, shape, 4096, time_split, {**key, "tp": 4}).source == "trial"  # another key
    calls.clear()
    assert split_trial(costs, shape, 4096, time_split, key, refresh=True).source == "trial" and calls
    # share() gives every rank rank 0's answer: here, none cached
    assert split_trial(costs, shape, 4096, time_split, key, share=lambda value: None).source == "trial"


def test_only_the_writer_reads_and_stores(cache_dir):
    costs, shape = datasheet(LLAMA70, "a800-nvlink", 8), LLAMA70.prefill()
    time_split = model_timing(costs, shape)
    assert split_trial(costs, shape, 4096, time_split, {"k": 1}, writer=False).source == "trial"
    assert not (cache_dir / "split_trials.json").exists()
    assert split_trial(costs, shape, 4096, time_split, {"k": 1}).source == "trial"
    shared = []
    # a rank other than the writer loads nothing and takes what share() agrees on (here: rank 0's entry)
    assert split_trial(costs, shape, 4096, time_split, {"k": 1}, writer=False,
                       share=lambda value: shared.append(value) or value).source == "trial"
    assert shared == [None]


def _never_timed(split):
    raise AssertionError(f"{split} should not have been timed")


def test_prompts_the_policy_will_not_split_are_not_timed():
    costs, shape = datasheet(LLAMA7, "h100-nvlink", 1), LLAMA7.prefill()  # tp=1: no communication
    choice = split_trial(costs, shape, 4096, _never_timed, {})
    assert choice.source == "planned" and choice.split == ChunkSplit((4096,))
    short = 2 * TRIAL_GRANULARITY - 1
    choice = split_trial(datasheet(LLAMA70, "a800-nvlink", 8), LLAMA70.prefill(), short, _never_timed, {})
    assert choice.source == "planned" and choice.split == ChunkSplit((short,))


def test_without_costs_the_even_splits_race():
    shape = LLAMA7.prefill()
    timing = _ScriptedTiming({ChunkSplit((40,)): 1.0, ChunkSplit.even(40, 2): 0.5})
    choice = split_trial(None, shape, 40, timing, {"case": "no costs"})
    assert choice.source == "trial" and choice.split == ChunkSplit.even(40, 2) and choice.costs is None
    assert set(timing.order) == {ChunkSplit((40,)), ChunkSplit.even(40, 2)}
    assert all(math.isnan(c.predicted_iso_ms) for c in choice.trial)
    assert choice.correction == PlanCorrection()  # no model to correct
    # up to even_only_chunks chunks
    timing = _ScriptedTiming({ChunkSplit.even(40, k): 1.0 / k for k in (1, 2, 3)})
    assert split_trial(None, shape, 40, timing, {"case": "3"}, even_only_chunks=3).split == ChunkSplit.even(40, 3)
    # the user fixed the chunk count: the even split of that many is the only candidate
    given = split_trial(None, shape, 40, _never_timed, {}, chunks=2)
    assert given.source == "given" and given.split == ChunkSplit.even(40, 2)


def test_a_fixed_chunk_count_times_only_splits_of_that_many():
    costs, shape, seq_len = datasheet(LLAMA70, "a800-nvlink", 8), LLAMA70.prefill(), 4096
    timing = model_timing(costs, shape)
    for chunks in (2, 3):
        choice = split_trial(costs, shape, seq_len, timing, {"case": "fixed"}, chunks=chunks)
        assert choice.source == "trial" and len(choice.split) == chunks
        assert {len(c.ends) for c in choice.trial} == {chunks} and len(choice.trial) <= trial.TRIAL_CANDIDATES
        assert choice.split == decide(costs, shape, seq_len, Policy(granularity=TRIAL_GRANULARITY, chunks=chunks)).split
        assert choice.correction == PlanCorrection()  # no unsplit prompt among them to fit to


# --- the trial agrees with decide() where the measurement is the model's own prediction ---
# (gpu, model, tp, seq_len, link overrides), each with what decide() says at the trial's granularity.
AGREEMENT = [
    ("a800-nvlink", LLAMA70, 8, 4096, {}),  # two chunks
    ("a800-nvlink", LLAMA34, 8, 2048, {"link_gbps": 50.0}),  # three uneven chunks
    ("rtx4090-pcie4", LLAMA34, 4, 2048, {}),  # three even chunks
    ("rtx4090-pcie4", LLAMA70, 2, 8192, {"link_gbps": 3.0}),  # a slow link: three chunks
    ("a100-nvlink", LLAMA70, 2, 512, {}),  # off, "gain": no split beats the unsplit prompt
    ("h100-nvlink", LLAMA7, 2, 512, {}),  # off, "gain": its best split saves 2.7 % < MIN_GAIN
    ("a800-nvlink", LLAMA70, 8, 4096, {"link_gbps": 1e5, "link_latency_us": 10.0}),  # off, "comm"
    ("h100-nvlink", LLAMA7, 2, 256, {}),  # off, "latency"
    ("a800-nvlink", LLAMA70, 8, 4096, {"link_gbps": 0.01}),  # off, "compute"
]
EXPECTED_RULES = {None, "gain", "comm", "latency", "compute"}


@pytest.mark.parametrize("gpu, shape, tp, seq_len, overrides", AGREEMENT)
def test_the_trial_timed_by_the_model_chooses_what_decide_chooses(gpu, shape, tp, seq_len, overrides):
    costs, prefill = datasheet(shape, gpu, tp, **overrides), shape.prefill()
    planned = decide(costs, prefill, seq_len, TRIAL_POLICY)
    choice = split_trial(costs, prefill, seq_len, model_timing(costs, prefill), {"gpu": gpu, "tp": tp, **overrides})
    assert choice.source == "trial"
    assert choice.split == planned.split, (
        f"decide: {planned.ends} ({planned.off_rule}), trial: {choice.split.ends}; measured ms "
        f"{[(c.ends, round(c.measured_iso_ms, 3)) for c in choice.trial]}")


def test_the_trial_timed_by_the_model_agrees_with_decide_where_only_an_uneven_split_clears_the_margin():
    # Not a datasheet setting (those agree: above); found by a random search over LayerCosts, where decide once
    # swapped the uneven split for the even one (1.9 % slower, under UNEVEN_SPLIT_MIN_GAIN) and then found the
    # even one under MIN_GAIN, while the trial took the uneven one (4.8 % gain).
    costs = LayerCosts(attn_fixed=1.6e-4, attn_per_token=9.88e-6, attn_per_pair=0.0, mlp_fixed=2.43e-6,
                       mlp_per_token=3.74e-8, ar_latency=1.28e-4, ar_bandwidth=6.1e9)
    shape, seq_len = PrefillShape(40, 1024), 2048
    even_s = simulate_prefill(costs, shape, ChunkSplit.even(seq_len, 3)).total_s
    planned = decide(costs, shape, seq_len, TRIAL_POLICY)
    serial_s = planned.predicted_serial_s
    assert 1 - even_s / serial_s < MIN_GAIN  # the even split alone is not worth taking
    assert not planned.off and len(planned.split) == 3 and planned.split != ChunkSplit.even(seq_len, 3)
    assert planned.gain > TRIAL_MARGIN and 1 - planned.predicted_iso_s / even_s < UNEVEN_SPLIT_MIN_GAIN
    choice = split_trial(costs, shape, seq_len, model_timing(costs, shape), {"case": "uneven kept"})
    assert choice.split == planned.split, f"trial: {choice.split.ends}: {choice.verdict}"


def test_the_agreement_cases_cover_every_kind_of_decision():
    rules = {decide(datasheet(shape, gpu, tp, **overrides), shape.prefill(), seq_len, TRIAL_POLICY).off_rule
             for gpu, shape, tp, seq_len, overrides in AGREEMENT}
    assert rules == EXPECTED_RULES
    chunk_counts = {len(decide(datasheet(shape, gpu, tp, **overrides), shape.prefill(), seq_len,
                               TRIAL_POLICY).split) for gpu, shape, tp, seq_len, overrides in AGREEMENT}
    assert chunk_counts == {1, 2, 3}


# --- the candidates the trial times (solver.ranked_splits) ---
SEQ_LENS = [1, 2, 17, 255, 256, 1000, 4096]


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("gpu, tp", [("rtx4090-pcie4", 8), ("a800-nvlink", 2)])
def test_candidates_rank_by_prediction_and_keep_unsplit_and_even(gpu, tp, seq_len):
    costs, shape = datasheet(LLAMA70, gpu, tp), LLAMA70.prefill()
    found = ranked_splits(costs, shape, seq_len, keep=3)
    assert found == ranked_splits(costs, shape, seq_len, keep=3)  # deterministic
    assert all(isinstance(c, ChunkSplit) and c.seq_len == seq_len for c in found)
    assert len(set(found)) == len(found) <= 3 + 3
    assert ChunkSplit((seq_len,)) in found
    assert all(seq_len < k or ChunkSplit.even(seq_len, k) in found for k in (2, 3))  # always, wherever they rank
    assert not any(solver._near(a, b, 16) for i, a in enumerate(found) for b in found[:i])  # none timed twice
    times = [simulate_prefill(costs, shape, c).total_s for c in found]
    assert times == sorted(times)
    assert all(len(c) <= 4 for c in found)


def test_candidates_keep_what_they_must():
    costs, shape = datasheet(LLAMA70, "a800-nvlink", 8), LLAMA70.prefill()
    odd = ChunkSplit((1000, 4096))
    assert odd not in ranked_splits(costs, shape, 4096, keep=1)
    assert odd in ranked_splits(costs, shape, 4096, keep=1, must=(odd,))


def test_candidates_reject_bad_counts():
    costs = LayerCosts(0, 1, 0, 0, 1, 0, 1)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ranked_splits(costs, PrefillShape(2, 1, 1, 1), 64, keep=0)
