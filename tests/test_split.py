"""ChunkSplit, the one split type and its validator. Where the policy puts the splits:
tests/planning/test_policy.py."""

import pytest

from iso_kernels.split import ChunkSplit


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


def test_from_fractions_scales_a_split_to_another_length():
    assert ChunkSplit.from_fractions(64, [0.59375, 1.0]) == ChunkSplit((38, 64))
    assert ChunkSplit.from_fractions(60, [0.59375, 1.0]) == ChunkSplit((36, 60))
    assert ChunkSplit.from_fractions(3, [0.1, 0.2, 1.0]) == ChunkSplit((1, 3))  # ends that round together merge
