"""ChunkSplit (the one split type and its validator) and the prefill's split policy
(``planner.prefill_split``), on cost models written in the test."""

import pytest

from iso_kernels import planner
from iso_kernels.costmodel import LayerCosts, choose_split, predict
from iso_kernels.planner import prefill_split
from iso_kernels.split import ChunkSplit

UNIT = dict(batch=1, hidden=64, dtype_bytes=2)


@pytest.mark.parametrize("split, expected", [
    (ChunkSplit.even(10), [(0, 5), (5, 10)]),
    (ChunkSplit.even(7, 3), [(0, 3), (3, 5), (5, 7)]),
    (ChunkSplit.at(10, 0.25), [(0, 2), (2, 10)]),
    (ChunkSplit.at(10, 4), [(0, 4), (4, 10)]),
    (ChunkSplit((1, 9, 10)), [(0, 1), (1, 9), (9, 10)]),
])
def test_bounds(split, expected):
    assert split.bounds() == expected
    assert split.bounds(start=3) == [(a + 3, b + 3) for a, b in expected]
    assert split.seq_len == expected[-1][1] and len(split) == len(expected)


@pytest.mark.parametrize("make, error", [
    (lambda: ChunkSplit.even(3, 4), ValueError), (lambda: ChunkSplit.even(3, 0), ValueError),
    (lambda: ChunkSplit.at(10, 0), ValueError), (lambda: ChunkSplit.at(10, 10), ValueError),
    (lambda: ChunkSplit.at(10, 1.5), ValueError), (lambda: ChunkSplit((4, 3, 10)), ValueError),
    (lambda: ChunkSplit((0, 10)), ValueError), (lambda: ChunkSplit(()), ValueError),
    (lambda: ChunkSplit((2.5, 10)), TypeError), (lambda: ChunkSplit((True, 10)), TypeError),
])
def test_rejects(make, error):
    with pytest.raises(error, match="split|chunk"):
        make()


def test_equal_splits_compare_equal_and_hash_alike():
    assert ChunkSplit([3, 10]) == ChunkSplit((3, 10)) == ChunkSplit.at(10, 3)
    assert len({ChunkSplit([3, 10]), ChunkSplit.at(10, 0.3)}) == 1


def test_policy_without_costs_is_the_even_split():
    assert prefill_split(None, 10, 100, **UNIT) == ChunkSplit.even(100, 2)
    assert prefill_split(None, 10, 100, 3, **UNIT) == ChunkSplit.even(100, 3)
    assert prefill_split(None, 10, 1, **UNIT) == ChunkSplit((1,))


def _gain_over_even(costs, split):
    even = ChunkSplit.even(split.seq_len, len(split))
    return 1 - predict(costs, 10, split.seq_len, split, **UNIT).iso_s / predict(costs, 10, split.seq_len, even,
                                                                               **UNIT).iso_s


def test_policy_keeps_the_even_split_unless_the_uneven_one_is_clearly_faster():
    # Linear costs: the solver's best two-chunk split beats the even one by well under UNEVEN_SPLIT_MIN_GAIN.
    flat = LayerCosts(0, 1.0, 0.0, 0, 1.0, 0, 0.5)
    solver = ChunkSplit(tuple(choose_split(flat, 10, 1024, max_chunks=2, min_gain=0, **UNIT)))
    assert solver != ChunkSplit.even(1024) and 0 < _gain_over_even(flat, solver) < planner.UNEVEN_SPLIT_MIN_GAIN
    assert prefill_split(flat, 10, 1024, 2, **UNIT) == ChunkSplit.even(1024)
    # A quadratic attention term and a link about as slow as compute: the uneven split is clearly faster.
    quadratic = LayerCosts(0, 0.1, 1e-3, 0, 0.1, 0, 3e2)
    chosen = prefill_split(quadratic, 10, 1024, 2, **UNIT)
    assert chosen != ChunkSplit.even(1024) and _gain_over_even(quadratic, chosen) > planner.UNEVEN_SPLIT_MIN_GAIN


def test_policy_gives_the_chunks_asked_for():
    costs = LayerCosts(0, 0.1, 1e-3, 0, 0.1, 0, 3e2)
    for chunks in (1, 2, 3, 4):
        assert len(prefill_split(costs, 10, 1024, chunks, **UNIT)) == chunks
    assert 1 <= len(prefill_split(costs, 10, 1024, **UNIT)) <= planner.MAX_AUTO_CHUNKS


def test_from_fractions_scales_a_split_to_another_length():
    assert ChunkSplit.from_fractions(64, [0.59375, 1.0]) == ChunkSplit((38, 64))
    assert ChunkSplit.from_fractions(60, [0.59375, 1.0]) == ChunkSplit((36, 60))
    assert ChunkSplit.from_fractions(3, [0.1, 0.2, 1.0]) == ChunkSplit((1, 3))  # ends that round together merge
