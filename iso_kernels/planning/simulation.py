"""The event simulation of a chunked prefill on two streams, from per-op costs (``docs/cost-model.md``).

A chunk's MLP waits for its own attention all-reduce (AR1), its next attention block for its own MLP
all-reduce (AR2); each block's all-reduce queues FIFO on the communication stream as soon as the block ends.
``simulate_prefill`` walks the events (and can record them); ``total_times`` computes the same end time for
many splits at once, in time logarithmic in the layer count; ``predict`` sets a split beside the serial
prefill and the bound no schedule of that chunking beats.
"""

from dataclasses import dataclass

import numpy as np

from ..split import ChunkSplit
from .costs import LayerCosts
from .shapes import PrefillShape


@dataclass(frozen=True)
class Interval:
    stream: str  # "compute" or "comm"
    chunk: int
    layer: int
    kind: str  # "attn", "mlp", "ar1" (after attn), "ar2" (after mlp)
    start: float
    end: float


@dataclass(frozen=True)
class PrefillSim:
    total_s: float
    compute_s: float
    comm_s: float
    intervals: list | None = None


def _durations(costs, ends, shape):
    """Per-chunk (attention, MLP, all-reduce) times; ``ends`` is (chunks,) or (candidates, chunks)."""
    ends = np.asarray(ends, dtype=np.float64)
    starts = np.concatenate([np.zeros_like(ends[..., :1]), ends[..., :-1]], axis=-1)
    n = ends - starts
    attn = costs.attention_block(n, starts, shape.batch)
    return ([attn[..., c] for c in range(n.shape[-1])],
            [costs.mlp_block(n[..., c], shape.batch) for c in range(n.shape[-1])],
            [costs.all_reduce(shape.message_bytes(n[..., c])) for c in range(n.shape[-1])])


def _layer(state, attn, mlp, ar, emit=None, layer=0):
    """Advance ``state = [compute_free, comm_free, ready_0, ...]`` by one layer of the two-stream schedule.

    Compute runs attn(c0..ck), then mlp(c0..ck); each block's all-reduce queues FIFO on the comm stream as
    soon as the block ends; ``ready[c]`` = when chunk c's latest all-reduce ends, which gates its next block.
    Only max and + appear, so the step is max-plus linear in ``state`` (``total_times`` relies on it).
    """
    compute_free, comm_free, ready = state[0], state[1], list(state[2:])
    for kind, blocks, ar_kind in (("attn", attn, "ar1"), ("mlp", mlp, "ar2")):
        for c, block in enumerate(blocks):
            start = np.maximum(compute_free, ready[c])
            compute_free = start + block
            ar_start = np.maximum(comm_free, compute_free)
            comm_free = ready[c] = ar_start + ar[c]
            if emit is not None:
                emit(Interval("compute", c, layer, kind, float(start), float(compute_free)))
                emit(Interval("comm", c, layer, ar_kind, float(ar_start), float(comm_free)))
    return [compute_free, comm_free, *ready]


def simulate_prefill(costs: LayerCosts, shape: PrefillShape, split: ChunkSplit, *,
                     record: bool = False) -> PrefillSim:
    """Event simulation of the whole prefill in the chunks of ``split``; one chunk is the serial schedule.
    The prefill ends with the last chunk's final all-reduce."""
    if not isinstance(split, ChunkSplit):
        raise TypeError(f"split must be a ChunkSplit, got {type(split).__name__}")
    attn, mlp, ar = _durations(costs, split.ends, shape)
    intervals = [] if record else None
    state = [0.0] * (2 + len(split))
    for layer in range(shape.n_layers):
        state = _layer(state, attn, mlp, ar, intervals.append if record else None, layer)
    return PrefillSim(total_s=float(max(state)), compute_s=float(shape.n_layers * (sum(attn) + sum(mlp))),
                      comm_s=float(shape.n_layers * 2 * sum(ar)), intervals=intervals)


def _maxplus_matmul(a, b):
    return np.max(a[..., :, :, None] + b[..., None, :, :], axis=-2)


def total_times(costs: LayerCosts, shape: PrefillShape, ends) -> np.ndarray:
    """Prefill time for every row of ``ends`` (candidates, chunks) at once, exactly equal to
    ``simulate_prefill``: the layer map's max-plus matrix (``_layer`` applied to unit vectors) is raised to
    the ``n_layers`` power by repeated squaring, so the cost is logarithmic in the layer count."""
    attn, mlp, ar = _durations(costs, ends, shape)
    size, rows = 2 + len(attn), np.shape(attn[0])
    columns = []
    for j in range(size):
        unit = [0.0 if i == j else -np.inf for i in range(size)]
        columns.append(np.stack([np.broadcast_to(v, rows) for v in _layer(unit, attn, mlp, ar)], axis=-1))
    step, power, n_layers = np.stack(columns, axis=-1), None, shape.n_layers  # column j: image of unit vector j
    while n_layers:
        if n_layers & 1:
            power = step if power is None else _maxplus_matmul(power, step)
        n_layers >>= 1
        if n_layers:
            step = _maxplus_matmul(step, step)
    return power.max(axis=(-2, -1))  # from the zero state: the latest entry of the final state


@dataclass(frozen=True)
class Prediction:
    split: ChunkSplit
    serial_s: float
    iso_s: float
    compute_s: float  # of the chunked schedule (fixed costs counted once per chunk)
    comm_s: float
    bound_s: float  # lower bound for this chunking, see ``predict``

    @property
    def reduction(self) -> float:
        return 1 - self.iso_s / self.serial_s

    @property
    def bound_reduction(self) -> float:
        return 1 - self.bound_s / self.serial_s


def predict(costs: LayerCosts, shape: PrefillShape, split: ChunkSplit) -> Prediction:
    """Serial vs ISO time for ``split``.

    ``bound_s`` = max(compute + tail, head + comm), where head = the first chunk's first attention block
    (no all-reduce exists before it ends) and tail = the last chunk's final all-reduce (it depends on the
    last compute block). No schedule of this chunking with these dependencies can finish sooner.
    """
    serial = simulate_prefill(costs, shape, ChunkSplit((split.seq_len,)))
    iso = simulate_prefill(costs, shape, split)
    attn, _, ar = _durations(costs, split.ends, shape)
    bound = max(iso.compute_s + float(ar[-1]), float(attn[0]) + iso.comm_s)
    return Prediction(split, serial.total_s, iso.total_s, iso.compute_s, iso.comm_s, bound)
