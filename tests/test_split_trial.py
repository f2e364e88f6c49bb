"""split_trial's race among timed plans and its choice."""

import types

import pytest

from iso_kernels import split_trial
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

    def run(self, split, mode, timeline):
        self.order.append(split)
        times = self.seconds[split]
        return times.pop(0) if isinstance(times, list) else times


@pytest.fixture
def scripted(monkeypatch):
    """traced_run reports the scripted prefill's time for each run instead of timing it."""
    monkeypatch.setattr(split_trial, "traced_run", lambda run, device: (None, run(None), None))
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
