"""split_trial's race among timed plans and its choice."""

import math
import types

import pytest

from iso_kernels import split_trial
from iso_kernels.costmodel import LayerCosts, PlanCorrection
from iso_kernels.split import ChunkSplit
from iso_kernels.split_trial import FINAL_ROUNDS, FINALISTS, TRIAL_MARGIN, TRIAL_ROUNDS, _pick


def test_a_plan_replaces_the_default_only_where_it_wins_round_for_round():
    even = [1.00, 1.20, 0.90]  # the machine's load drifts from round to round; interleaved plans share it
    clearly = [t * (1 - 2 * TRIAL_MARGIN) for t in even]
    barely = [t * (1 - TRIAL_MARGIN / 2) for t in even]
    assert _pick([even, clearly], default=0) == 1
    assert _pick([even, barely], default=0) == 0
    lucky = [0.80, 1.30, 0.95]  # the fastest median (0.95 < 1.00), but slower in two of the three rounds
    assert _pick([even, lucky], default=0) == 0
    assert _pick([clearly, even], default=1) == 0  # the default need not come first


def test_the_prompt_stays_whole_where_the_model_and_the_measurement_agree_splitting_does_not_pay():
    even = [1.00, 1.20, 0.90]
    whole = [t * (1 - TRIAL_MARGIN / 2) for t in even]  # faster, but not by the margin
    assert _pick([even, whole], default=0) == 0  # the model predicts a split to gain: the even split stays
    assert _pick([even, whole], default=0, whole=1) == 1
    slower = [t * 1.01 for t in even]
    assert _pick([even, slower], default=0, whole=1) == 0  # the measurement disagrees with the model
    assert _pick([even, whole[:2]], default=0, whole=1) == 0  # out of the race: not compared


def test_only_plans_timed_in_every_round_of_the_default_are_chosen():
    even = [1.0] * 7
    dropped = [0.5] * 3  # fast in the first rounds, then out of the race: too few rounds to compare
    finalist = [0.9] * 7
    assert _pick([even, dropped, finalist], default=0) == 2


class _ScriptedRanks:
    """A prefill whose runs take scripted seconds (per split, a list consumed run by run, or a constant)."""

    device = "cpu"

    def __init__(self, seconds):
        self.seconds, self.order = seconds, []

    def timed_run(self, split, mode):
        """As ``Prefill.timed_run``: (logits, seconds, intervals), the seconds scripted instead of timed."""
        self.order.append(split)
        times = self.seconds[split]
        return None, times.pop(0) if isinstance(times, list) else times, None


@pytest.fixture
def scripted():
    return _ScriptedRanks


def test_timed_rounds_rotate_drop_the_warmup_and_extend_to_the_budget(scripted):
    ranks = scripted({"a": 0.1, "b": 0.2})
    plans = [("a", "iso"), ("b", "iso")]
    seconds = split_trial.timed_rounds(ranks, plans, 2)
    assert seconds == [[0.1, 0.1], [0.2, 0.2]] and ranks.order == ["a", "b", "b", "a", "a", "b"]
    # 0.3 s per round: rounds until the timed ones took 1.0 s (4 rounds), at least 2, at most max_repeats
    assert len(split_trial.timed_rounds(ranks, plans, 2, warmup=0, budget_s=1.0, max_repeats=9)[0]) == 4
    assert len(split_trial.timed_rounds(ranks, plans, 2, warmup=0, budget_s=100.0, max_repeats=5)[0]) == 5
    assert len(split_trial.timed_rounds(ranks, plans, 2, warmup=0, budget_s=0.1, max_repeats=5)[0]) == 2


def test_the_race_times_the_fastest_and_the_default_on_and_drops_the_rest(scripted):
    rounds = 1 + TRIAL_ROUNDS  # the first race's warm-up and timed rounds
    slow = {f"slow{i}": 5.0 for i in range(3)}
    # "lucky" leads the first rounds, then runs slower than the default: the final rounds overturn it
    ranks = scripted({"even": 1.0, "good": 0.9, "lucky": [0.5] * rounds + [1.2] * 99, **slow})
    candidates = ["even", "good", "lucky", *slow]
    seconds = split_trial._race(ranks, candidates, default=0)
    lengths = [len(times) for times in seconds]
    assert lengths[3:] == [TRIAL_ROUNDS] * 3  # slower than FINALISTS others: out after the first rounds
    assert FINALISTS == 3 and lengths[0] == lengths[1] == lengths[2] >= TRIAL_ROUNDS + FINAL_ROUNDS
    assert candidates[_pick(seconds, default=0)] == "good"


def _prefill(seq_len):
    return types.SimpleNamespace(seq_len=seq_len, model=types.SimpleNamespace(args=types.SimpleNamespace(n_layer=4)),
                                 predict_kw=lambda: {"batch": 1, "hidden": 64, "dtype_bytes": 4})


def test_off_is_predicted_by_the_corrected_model_where_chunks_cost_more_than_they_hide():
    # 1 ms of compute per block over 256 tokens, 0.5 ms per all-reduce: two chunks hide a quarter of it
    costs = LayerCosts(attn_fixed=0.0, attn_per_token=1e-3 / 256, attn_per_pair=0.0, mlp_fixed=0.0,
                       mlp_per_token=1e-3 / 256, ar_latency=5e-4, ar_bandwidth=math.inf)
    prefill = _prefill(256)
    candidates = [ChunkSplit((256,)), ChunkSplit.even(256, 2), ChunkSplit.even(256, 3)]
    assert not split_trial._predicted_off(prefill, costs, PlanCorrection(), candidates)
    # the trial found every extra chunk's block to cost 1 ms more: no split saves MIN_GAIN
    assert split_trial._predicted_off(prefill, costs, PlanCorrection(block_offset_s=1e-3), candidates)
    assert not split_trial._predicted_off(prefill, None, PlanCorrection(), candidates)  # no model, no opinion
    assert not split_trial._predicted_off(prefill, costs, PlanCorrection(block_offset_s=1e-3), candidates[1:])
