"""Where to cut a prompt for the fastest simulated prefill: ``best_split`` (the fastest split of up to
``max_chunks`` chunks on a token grid), ``balanced_split`` (equal compute per chunk) and ``ranked_splits``
(the few worth timing). Whether a split is worth taking is the policy's call (``policy.decide``)."""

import math

import numpy as np

from ..split import ChunkSplit
from .costs import LayerCosts
from .shapes import PrefillShape, check_int
from .simulation import simulate_prefill, total_times

# Pattern-search steps for >2 chunks stop after this many moves; each move strictly lowers the time.
MAX_SEARCH_MOVES = 200


def balanced_split(costs: LayerCosts, seq_len: int, n_chunks: int) -> ChunkSplit:
    """Chunk ends that equalise chunk compute. Tokens [0, x) cost W(x) = a*x^2 + b*x beyond fixed terms
    (a = attn_per_pair / 2, b = per-token terms + a); boundary i solves W(x) = i/k * W(S). Later chunks
    attend over more keys, so earlier chunks come out longer (docs/cost-model.md derives the two-chunk case)."""
    check_int("n_chunks", n_chunks)
    check_int("seq_len", seq_len)
    if seq_len < n_chunks:
        raise ValueError(f"seq_len={seq_len} is shorter than n_chunks={n_chunks}")
    a = costs.attn_per_pair / 2
    b = costs.attn_per_token + costs.mlp_per_token + a
    ends = []
    for i in range(1, n_chunks):
        if a == 0 and b == 0:
            x = seq_len * i / n_chunks
        else:
            target = i / n_chunks * (a * seq_len**2 + b * seq_len)
            x = 2 * target / (b + math.sqrt(b * b + 4 * a * target))  # cancellation-free quadratic root
        lowest = ends[-1] + 1 if ends else 1
        ends.append(min(max(round(x), lowest), seq_len - (n_chunks - i)))
    return ChunkSplit((*ends, seq_len))


def _pattern_search(evaluate, start, step, seq_len):
    """Move one boundary at a time by +-step*2^j, taking the best strictly improving move, until none is."""
    current = list(start)
    best = float(evaluate(np.array([current]))[0])
    offsets = [step * 2**j for j in range(int(math.log2(max(seq_len // step, 1))) + 1)]
    for _ in range(MAX_SEARCH_MOVES):
        moves = []
        for i in range(len(current) - 1):
            low = (current[i - 1] if i else 0) + step
            high = current[i + 1] - step
            moves += [current[:i] + [current[i] + d] + current[i + 1:] for o in offsets for d in (-o, o)
                      if low <= current[i] + d <= high]
        if not moves:
            break
        times = evaluate(np.array(moves))
        k = int(np.argmin(times))
        if not times[k] < best * (1 - 1e-12):
            break
        current, best = moves[k], float(times[k])
    return current, best


def _best_of(costs, shape, seq_len, k, step):
    """The fastest ``k``-chunk split with boundaries on the ``step`` grid, and its time."""
    def evaluate(ends):
        return total_times(costs, shape, ends)

    if k == 1:
        return [seq_len], float(evaluate(np.array([[seq_len]]))[0])
    if k == 2:  # every boundary on the grid
        grid = np.arange(step, seq_len - step + 1, step)
        times = evaluate(np.stack([grid, np.full_like(grid, seq_len)], axis=1))
        return [int(grid[np.argmin(times)]), seq_len], float(times.min())
    start = [seq_len]  # more chunks: pattern search from the equal-compute split
    for i, x in reversed(list(enumerate(balanced_split(costs, seq_len, k).ends[:-1]))):
        snapped = max(round(x / step) * step, (i + 1) * step)  # on the grid, room for earlier chunks
        start.insert(0, min(snapped, (start[0] - step) // step * step))
    return _pattern_search(evaluate, start, step, seq_len)


def best_split(costs: LayerCosts, shape: PrefillShape, seq_len: int, *, max_chunks: int = 4,
               granularity: int = 16, chunks: int | None = None) -> ChunkSplit:
    """The split minimising the simulated prefill time among 1..``max_chunks`` chunks (exactly ``chunks`` when
    given), e.g. ``(seq_len,)`` (don't split) or ``(s, seq_len)``. Two chunks: every boundary on the
    ``granularity`` grid; more: pattern search from the equal-compute split. Chunks hold >= ``granularity``
    tokens (>= 1 when the prompt is too short for that)."""
    for name, value in (("seq_len", seq_len), ("max_chunks", max_chunks), ("granularity", granularity)):
        check_int(name, value)
    counts = [chunks] if chunks is not None else range(1, min(max_chunks, seq_len) + 1)
    best, best_time = None, math.inf
    for k in counts:
        ends, time = _best_of(costs, shape, seq_len, k, granularity if seq_len >= k * granularity else 1)
        if time < best_time * (1 - 1e-12):
            best, best_time = ends, time
    return ChunkSplit(tuple(int(e) for e in best))


def ranked_splits(costs: LayerCosts, shape: PrefillShape, seq_len: int, *, keep: int = 4, max_chunks: int = 4,
                  granularity: int = 16, must: tuple[ChunkSplit, ...] = ()) -> list[ChunkSplit]:
    """The cost model's best ``keep`` splits of a ``seq_len``-token prompt, best predicted first, plus the
    unsplit ``(L,)``, the even two- and three-chunk splits (where ``L`` and ``max_chunks`` allow) and ``must``
    wherever they rank: for every chunk count up to ``max_chunks``, the solver's best split, the equal-compute
    split and the even split, without splits within ``granularity`` tokens of a better one or of those always
    kept. Deterministic (ties: fewer chunks, then earlier ends)."""
    for name, value in (("seq_len", seq_len), ("keep", keep), ("max_chunks", max_chunks)):
        check_int(name, value)
    for split in must:
        if split.seq_len != seq_len:
            raise ValueError(f"must: {split} does not end at seq_len={seq_len}")
    unsplit, found = ChunkSplit((seq_len,)), {ChunkSplit((seq_len,)), *must}
    for k in range(2, min(max_chunks, seq_len) + 1):
        found |= {best_split(costs, shape, seq_len, chunks=k, granularity=granularity),
                  balanced_split(costs, seq_len, k), ChunkSplit.even(seq_len, k)}
    ranked_all = sorted((simulate_prefill(costs, shape, c).total_s, len(c), c.ends, c) for c in found)
    kept = [unsplit, *must] + [ChunkSplit.even(seq_len, k) for k in (2, 3) if k <= min(max_chunks, seq_len)]
    ranked = []
    for *_, c in ranked_all:  # a split within ``granularity`` tokens of another would time the same plan again
        if c in kept or not any(_near(c, other, granularity) for other in ranked + kept):
            ranked.append(c)
    return [c for c in ranked if c in ranked[:keep] or c in kept]


def _near(a: ChunkSplit, b: ChunkSplit, tokens: int) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a.ends, b.ends, strict=True)) <= tokens
