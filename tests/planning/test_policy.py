"""The split policy (``planning.policy``): ``decide``, the one function that says whether and where to split a
prompt, and its knobs (``Policy``), on cost models written in the test; then ``plan``, its entry from a model
config."""

import math

import pytest

from iso_kernels.planning import LayerCosts, Policy, PrefillShape, best_split, decide, predict, split_trial
from iso_kernels.planning.policy import MAX_AUTO_CHUNKS, UNEVEN_SPLIT_MIN_GAIN
from iso_kernels.split import ChunkSplit

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
