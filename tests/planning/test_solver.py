"""The split solver (``planning.solver``): the equal-compute split against docs/cost-model.md's closed form,
and ``best_split``'s choice in each regime (even, first chunk longer, unsplit, more chunks), its grid and its
speed. Whether a split is worth taking is the policy's call: tests/planning/test_policy.py."""

import math
import time

import numpy as np
import pytest

from iso_kernels.planning import LayerCosts, PrefillShape, balanced_split, best_split, predict, simulate_prefill
from iso_kernels.split import ChunkSplit

from helpers import datasheet_costs, toy_costs, unit_shape

# What the solver used to demand of a split before returning it (choose_split's min_gain): where a test
# expects a split, it is also predicted to save this much.
OLD_MIN_GAIN = 0.01


# --- the equal-compute split ---
def test_balanced_split_even_without_attention_core():
    costs = LayerCosts(1e-3, 1.0, 0.0, 1e-3, 2.0, 0, 1.0)
    assert balanced_split(costs, 1000, 2) == ChunkSplit((500, 1000))
    assert balanced_split(costs, 999, 3) == ChunkSplit((333, 666, 999))


@pytest.mark.parametrize("seq_len", [1024, 4096, 8192])
def test_balanced_split_matches_doc_closed_form(seq_len):
    costs = datasheet_costs("a800-nvlink", 8)
    r = costs.attn_per_pair * seq_len / (2 * (costs.attn_per_token + costs.mlp_per_token))  # 2hS/g
    x_star = (-1 + math.sqrt(1 + 2 * r * (1 + r))) / (2 * r)
    assert balanced_split(costs, seq_len, 2).ends[0] == pytest.approx(x_star * seq_len, abs=2)
    # docs/cost-model.md's 70B values: x* = 0.502 / 0.509 / 0.518 at 1k / 4k / 8k.
    assert x_star == pytest.approx({1024: 0.502, 4096: 0.509, 8192: 0.518}[seq_len], abs=0.0015)


def test_balanced_split_first_chunk_longer_with_attention():
    split = balanced_split(LayerCosts(0, 1.0, 0.05, 0, 1.0, 0, 1.0), 1024, 3)
    sizes = np.diff((0, *split.ends))
    assert len(split) == 3 and sizes[0] > sizes[1] > sizes[2]


# --- best_split: the fastest simulated prefill ---
@pytest.mark.parametrize("seq_len", [1000, 1024, 4000])
def test_solver_even_split_for_symmetric_costs(seq_len):
    # attn == mlp per token, no attention core, each all-reduce as long as its block: nothing favours a side.
    costs, shape = LayerCosts(0, 1.0, 0.0, 0, 1.0, 0, 1.0), unit_shape(10)
    s = best_split(costs, shape, seq_len, max_chunks=2)
    assert s.ends[1] == seq_len and abs(s.ends[0] - seq_len / 2) <= 16
    assert predict(costs, shape, s).reduction >= OLD_MIN_GAIN


def test_solver_first_chunk_longer_when_attention_dominates():
    # Communication-bound (each all-reduce twice its block). Stall-free needs every block of one chunk to fit
    # under the other chunk's all-reduce; chunk 2's attention covers all keys, so chunk 1 must grow.
    heavy_costs, shape = LayerCosts(0, 1.0, 0.01, 0, 1.0, 0, 0.5), unit_shape(10)
    flat = best_split(LayerCosts(0, 1.0, 0.0, 0, 1.0, 0, 0.5), shape, 1024, max_chunks=2)
    heavy = best_split(heavy_costs, shape, 1024, max_chunks=2)
    assert heavy.ends[0] > 512 + 64
    assert heavy.ends[0] > flat.ends[0]
    assert predict(heavy_costs, shape, heavy).reduction >= OLD_MIN_GAIN


def test_solver_one_chunk_without_communication():
    # Splitting only adds fixed costs (the policy's side of this case: test_policy.py).
    costs = LayerCosts(1e-5, 1e-6, 1e-9, 1e-5, 2e-6, 0.0, math.inf)
    assert best_split(costs, PrefillShape(80, hidden=8192), 4096) == ChunkSplit((4096,))


def test_solver_one_chunk_when_fixed_costs_outweigh_communication():
    # Hiding ~1.3 us of all-reduce per block cannot pay for another 1 ms block overhead (the policy's side of
    # this case: test_policy.py).
    costs, shape = LayerCosts(1e-3, 1e-6, 0.0, 1e-3, 1e-6, 0.0, 1e11), PrefillShape(10, hidden=64)
    assert best_split(costs, shape, 1024) == ChunkSplit((1024,))
    assert predict(costs, shape, ChunkSplit((512, 1024))).reduction < 0


def test_solver_more_chunks_when_attention_blocks_are_small():
    # comm ~ compute, attention block 1/10 of the MLP: with two chunks, chunk 1's AR1 cannot hide under
    # chunk 2's tiny attention block and the compute stream stalls (docs/cost-model.md, two chunks).
    costs, shape = LayerCosts(0, 0.1, 0.0, 0, 1.0, 0, 1 / 0.55), unit_shape(10)
    best = best_split(costs, shape, 1024)
    two = best_split(costs, shape, 1024, max_chunks=2)
    assert len(best) > 2
    assert predict(costs, shape, best).iso_s < 0.9 * predict(costs, shape, two).iso_s
    assert predict(costs, shape, best).reduction >= OLD_MIN_GAIN


def test_solver_two_chunk_grid_is_exhaustive():
    costs, shape = datasheet_costs("rtx4090-pcie4", 8), PrefillShape(4, hidden=8192, dtype_bytes=2)
    chosen = best_split(costs, shape, 512, max_chunks=2, granularity=16)
    brute = min(simulate_prefill(costs, shape, ChunkSplit((s, 512))).total_s for s in range(16, 512, 16))
    assert simulate_prefill(costs, shape, chosen).total_s == pytest.approx(brute, rel=1e-12)
    assert best_split(costs, shape, 512, chunks=2, granularity=16) == chosen


@pytest.mark.parametrize("seq_len,granularity", [(20, 16), (3, 16), (1, 16), (1000, 16), (4097, 64)])
def test_solver_respects_granularity_and_length(seq_len, granularity):
    costs = LayerCosts(0, 0.1, 1e-4, 0, 1.0, 0, 1 / 0.55)
    ends = best_split(costs, unit_shape(4), seq_len, granularity=granularity).ends
    sizes = np.diff((0, *ends))
    assert ends[-1] == seq_len and (sizes >= 1).all() and len(ends) <= min(4, seq_len)
    if seq_len >= len(ends) * granularity:
        assert (sizes >= granularity).all() and all(e % granularity == 0 for e in ends[:-1])


@pytest.mark.slow
def test_solver_speed():
    costs = datasheet_costs("rtx4090-pcie4", 4)
    start = time.perf_counter()
    best_split(costs, PrefillShape(80, hidden=8192, dtype_bytes=2), 8192)
    assert time.perf_counter() - start < 0.5  # ~10 ms here; a guard against an accidental slow path


# --- bad input ---
@pytest.mark.parametrize("call,match", [
    (lambda: balanced_split(toy_costs(), 2, 3), "seq_len"),
    (lambda: best_split(toy_costs(), unit_shape(1), 64, granularity=0), "granularity"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="seq_len"):
        best_split(toy_costs(), unit_shape(1), 4.0)
