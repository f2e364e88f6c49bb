"""Cost model of a tensor-parallel prefill, serial or ISO-chunked, and the solver that picks the split.

How the schedule, this model and the solver fit together, and what is measured or assumed:
``docs/cost-model.md``. Per layer each chunk runs an attention block (norm, QKV, RoPE, attention, ``o_proj``)
and an MLP block (norm, gate/up, SiLU*mul, ``down_proj``); each block's output is all-reduced on a
communication stream. A chunk's MLP waits for its own attention all-reduce (AR1), its next
attention block for its own MLP all-reduce (AR2). Times are seconds throughout.

Per-op times (``LayerCosts``), for a chunk of ``n`` tokens per sequence after a prefix of ``p`` tokens, with
``batch`` sequences (the batch multiplies tokens, not fixed costs)::

    attention_block(n, p) = attn_fixed + batch * (attn_per_token * n + attn_per_pair * n * (p + (n + 1) / 2)
                                                  + attn_per_key * n * (p + n))
    mlp_block(n)          = mlp_fixed  + batch * mlp_per_token * n
    all_reduce(nbytes)    = ar_latency + nbytes / ar_bandwidth

``n * (p + (n + 1) / 2)`` counts the visible (query, key) pairs of causal attention for queries p..p+n-1;
``n * (p + n)`` counts all pairs, which an implementation that scores the masked future too (the CPU
reference) also pays for. A kernel that skips masked blocks has ``attn_per_key = 0`` (the datasheet model).
RMSNorm, RoPE, SiLU and residual adds are not modelled apart: they are linear in tokens, so they are folded
into the per-token terms (a fit absorbs them; the datasheet model ignores them).
"""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import envs
from .cache import KeyedJsonFile
from .hardware import HardwareSpec, ring_factor
from .split import ChunkSplit

# Pattern-search steps for >2 chunks stop after this many moves; each move strictly lowers the time.
MAX_SEARCH_MOVES = 200


# --- model shapes ---
@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes, as the cost model needs them (``simulate.PAPER_MODELS``)."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def attention_gemm_flops(self) -> float:
        """Per token per layer: QKV projection plus ``o_proj``."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return 2.0 * self.hidden * (q + 2 * kv) + 2.0 * q * self.hidden

    @property
    def mlp_gemm_flops(self) -> float:
        """Per token per layer: gate, up and down projections."""
        return 6.0 * self.hidden * self.intermediate

    @property
    def pair_flops(self) -> float:
        """Per visible (query, key) pair per layer: QK^T and PV over all heads."""
        return 4.0 * self.n_heads * self.head_dim

    @property
    def weight_bytes(self) -> int:
        """Decoder layers, untied embedding and LM head, norms."""
        q, kv, h = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate + 2 * h
        return (self.n_layers * per_layer + 2 * self.vocab * h + h) * self.dtype_bytes


# --- per-op time model ---
@dataclass(frozen=True)
class LayerCosts:
    attn_fixed: float
    attn_per_token: float
    attn_per_pair: float
    mlp_fixed: float
    mlp_per_token: float
    ar_latency: float
    ar_bandwidth: float  # bytes/s of message size, ring factor already folded in; inf = no communication
    attn_per_key: float = 0.0  # per (query, key) pair scored whether visible or masked

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"LayerCosts.{field.name} must be >= 0, got {value}")
        if self.ar_bandwidth == 0:
            raise ValueError("LayerCosts.ar_bandwidth must be > 0")

    def attention_block(self, n, p, batch=1):
        pairs = n * (p + (n + 1) / 2)
        scored = n * (p + n)
        return self.attn_fixed + batch * (self.attn_per_token * n + self.attn_per_pair * pairs
                                          + self.attn_per_key * scored)

    def mlp_block(self, n, batch=1):
        return self.mlp_fixed + batch * self.mlp_per_token * n

    def all_reduce(self, nbytes):
        return self.ar_latency + nbytes / self.ar_bandwidth

    def scaled(self, *, compute=1.0, comm=1.0):
        """Compute terms times ``compute``, all-reduce terms times ``comm``. Blocks timed in isolation miss
        what a whole forward adds (norms, embedding, LM head, cache effects, a peer arriving late at the
        collective), so the engine rescales them to its measured prefill."""
        if not (compute > 0 and comm > 0):
            raise ValueError(f"compute and comm factors must be positive, got {compute}, {comm}")
        terms = {f: getattr(self, f) * compute for f in (
            "attn_fixed", "attn_per_token", "attn_per_pair", "attn_per_key", "mlp_fixed", "mlp_per_token")}
        return dataclasses.replace(self, **terms, ar_latency=self.ar_latency * comm,
                                   ar_bandwidth=self.ar_bandwidth / comm)

    @classmethod
    def from_datasheet(cls, shape: ModelShape, hardware: HardwareSpec, tp: int) -> "LayerCosts":
        """Peak FLOP/s x efficiency for compute, bus bandwidth and latency for the all-reduce; TP shards
        every FLOP."""
        _check_int("tp", tp)
        flops = tp * hardware.efficiency * hardware.peak_tflops * 1e12
        overhead = hardware.block_overhead_us * 1e-6
        ring = ring_factor(tp)
        return cls(attn_fixed=overhead, attn_per_token=shape.attention_gemm_flops / flops,
                   attn_per_pair=shape.pair_flops / flops, mlp_fixed=overhead,
                   mlp_per_token=shape.mlp_gemm_flops / flops,
                   ar_latency=hardware.link_latency_us * 1e-6 if tp > 1 else 0.0,
                   ar_bandwidth=hardware.link_gbps * 1e9 / ring if tp > 1 else math.inf)


# --- calibration ---
@dataclass(frozen=True)
class FitResult:
    costs: LayerCosts
    residual: dict  # op -> RMS relative error of the fitted times against the measurements


def _fit_nonnegative(features, times, arg):
    """Least squares in relative error (each sample weighted 1/time), dropping negative coefficients."""
    times = np.asarray(times, dtype=np.float64)
    if not np.all(np.isfinite(times) & (times > 0)):
        raise ValueError(f"{arg} must return positive finite seconds, got {times.tolist()}")
    x = np.asarray(features, dtype=np.float64) / times[:, None]
    target = np.ones(len(times))
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise ValueError(f"the sizes given for {arg} cannot separate the fixed and per-size terms")
    coef, active = np.zeros(x.shape[1]), list(range(x.shape[1]))
    while active:
        coef[:] = 0
        coef[active] = np.linalg.lstsq(x[:, active], target, rcond=None)[0]
        if coef.min() >= 0:
            break
        active.remove(int(np.argmin(coef)))
    return [float(c) for c in coef], float(np.sqrt(np.mean((x @ coef - 1) ** 2)))


def fit_layer_costs(measure_attention: Callable[[int, int], float], measure_mlp: Callable[[int], float],
                    measure_all_reduce: Callable[[int], float], *, token_sizes: Sequence[int],
                    prefix_sizes: Sequence[int], byte_sizes: Sequence[int], batch: int = 1) -> FitResult:
    """Fit ``LayerCosts`` to timings of the real blocks on this machine.

    ``measure_attention(n, p)``, ``measure_mlp(n)`` time one block on ``batch`` sequences of ``n`` tokens
    (queries after ``p`` cached tokens); ``measure_all_reduce(nbytes)`` one all-reduce. Each returns seconds.
    """
    _check_int("batch", batch)
    attn_samples = [(n, p) for n in token_sizes for p in prefix_sizes]
    attn_times = [measure_attention(n, p) for n, p in attn_samples]
    features = [[1, batch * n, batch * n * (p + (n + 1) / 2), batch * n * (p + n)] for n, p in attn_samples]
    try:
        attn, a_res = _fit_nonnegative(features, attn_times, "measure_attention")
    except ValueError:  # too few distinct sizes to tell scored from visible pairs: visible pairs only
        attn, a_res = _fit_nonnegative([f[:3] for f in features], attn_times, "measure_attention")
        attn = [*attn, 0.0]
    mlp, m_res = _fit_nonnegative([[1, batch * n] for n in token_sizes],
                                  [measure_mlp(n) for n in token_sizes], "measure_mlp")
    comm, c_res = _fit_nonnegative([[1, b] for b in byte_sizes],
                                   [measure_all_reduce(b) for b in byte_sizes], "measure_all_reduce")
    costs = LayerCosts(attn_fixed=attn[0], attn_per_token=attn[1], attn_per_pair=attn[2], mlp_fixed=mlp[0],
                       mlp_per_token=mlp[1], ar_latency=comm[0],
                       ar_bandwidth=1 / comm[1] if comm[1] > 0 else math.inf, attn_per_key=attn[3])
    return FitResult(costs, {"attention": a_res, "mlp": m_res, "all_reduce": c_res})


def default_cache_path() -> Path:
    return envs.cache_dir() / "calibration.json"


def _calibration_file(path: os.PathLike | None) -> KeyedJsonFile:
    return KeyedJsonFile(path if path is not None else default_cache_path(), "calibration", "calibrating again",
                         parse=lambda value: LayerCosts(**value))


def save_calibration(path: os.PathLike | None, costs: LayerCosts, key: dict) -> Path | None:
    """Store ``costs`` under ``key`` (replacing an entry with the same key); ``path=None`` = default cache.
    Returns the path, or None (with a warning) when it cannot be written: the costs are then just not cached.
    """
    return _calibration_file(path).save(key, dataclasses.asdict(costs))


def load_calibration(path: os.PathLike | None, key: dict) -> LayerCosts | None:
    """The costs stored under exactly ``key``, else None (with a warning if the file is unreadable)."""
    return _calibration_file(path).load(key)


# --- schedule simulation ---
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


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _checked_ends(split, seq_len):
    """The chunk ends of ``split`` (a ChunkSplit or its ends) of a ``seq_len``-token prompt, validated."""
    _check_int("seq_len", seq_len)
    split = split if isinstance(split, ChunkSplit) else ChunkSplit(tuple(split))
    if split.seq_len != seq_len:
        raise ValueError(f"split {list(split.ends)} must end with seq_len={seq_len}")
    return list(split.ends)


def _durations(costs, ends, batch, hidden, dtype_bytes):
    """Per-chunk (attention, MLP, all-reduce) times; ``ends`` is (chunks,) or (candidates, chunks)."""
    ends = np.asarray(ends, dtype=np.float64)
    starts = np.concatenate([np.zeros_like(ends[..., :1]), ends[..., :-1]], axis=-1)
    n = ends - starts
    attn = costs.attention_block(n, starts, batch)
    return ([attn[..., c] for c in range(n.shape[-1])],
            [costs.mlp_block(n[..., c], batch) for c in range(n.shape[-1])],
            [costs.all_reduce(batch * n[..., c] * hidden * dtype_bytes) for c in range(n.shape[-1])])


def _layer(state, attn, mlp, ar, emit=None, layer=0):
    """Advance ``state = [compute_free, comm_free, ready_0, ...]`` by one layer of the two-stream schedule.

    Compute runs attn(c0..ck), then mlp(c0..ck); each block's all-reduce queues FIFO on the comm stream as
    soon as the block ends; ``ready[c]`` = when chunk c's latest all-reduce ends, which gates its next block.
    Only max and + appear, so the step is max-plus linear in ``state`` (``_total_times`` relies on it).
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


def simulate_prefill(costs: LayerCosts, n_layers: int, seq_len: int, split: ChunkSplit | Sequence[int],
                     batch: int = 1, *, hidden: int, dtype_bytes: int, record: bool = False) -> PrefillSim:
    """Event simulation of the whole prefill in the chunks of ``split`` (or its ends, e.g. ``[s, seq_len]``).

    One chunk is the serial schedule. The prefill ends with the last chunk's final all-reduce.
    """
    for name, value in (("n_layers", n_layers), ("batch", batch), ("hidden", hidden),
                        ("dtype_bytes", dtype_bytes)):
        _check_int(name, value)
    ends = _checked_ends(split, seq_len)
    attn, mlp, ar = _durations(costs, ends, batch, hidden, dtype_bytes)
    intervals = [] if record else None
    state = [0.0] * (2 + len(ends))
    for layer in range(n_layers):
        state = _layer(state, attn, mlp, ar, intervals.append if record else None, layer)
    return PrefillSim(total_s=float(max(state)), compute_s=float(n_layers * (sum(attn) + sum(mlp))),
                      comm_s=float(n_layers * 2 * sum(ar)), intervals=intervals)


def _maxplus_matmul(a, b):
    return np.max(a[..., :, :, None] + b[..., None, :, :], axis=-2)


def _total_times(costs, n_layers, ends, batch, hidden, dtype_bytes):
    """Prefill time for every row of ``ends`` (candidates, chunks) at once, exactly equal to
    ``simulate_prefill``: the layer map's max-plus matrix (``_layer`` applied to unit vectors) is raised to
    the ``n_layers`` power by repeated squaring, so the cost is logarithmic in the layer count."""
    attn, mlp, ar = _durations(costs, ends, batch, hidden, dtype_bytes)
    size, shape = 2 + len(attn), np.shape(attn[0])
    columns = []
    for j in range(size):
        unit = [0.0 if i == j else -np.inf for i in range(size)]
        columns.append(np.stack([np.broadcast_to(v, shape) for v in _layer(unit, attn, mlp, ar)], axis=-1))
    step, power = np.stack(columns, axis=-1), None  # step[..., i, j]: column j = image of unit vector j
    while n_layers:
        if n_layers & 1:
            power = step if power is None else _maxplus_matmul(power, step)
        n_layers >>= 1
        if n_layers:
            step = _maxplus_matmul(step, step)
    return power.max(axis=(-2, -1))  # from the zero state: the latest entry of the final state


@dataclass(frozen=True)
class Prediction:
    ends: list  # of the split predicted
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


def predict(costs: LayerCosts, n_layers: int, seq_len: int, split: ChunkSplit | Sequence[int] | None = None,
            batch: int = 1, *, hidden: int, dtype_bytes: int) -> Prediction:
    """Serial vs ISO time for ``split`` (a ChunkSplit or its ends; default: ``choose_split``'s).

    ``bound_s`` = max(compute + tail, head + comm), where head = the first chunk's first attention block
    (no all-reduce exists before it ends) and tail = the last chunk's final all-reduce (it depends on the
    last compute block). No schedule of this chunking with these dependencies can finish sooner.
    """
    kw = {"batch": batch, "hidden": hidden, "dtype_bytes": dtype_bytes}
    ends = choose_split(costs, n_layers, seq_len, **kw) if split is None else _checked_ends(split, seq_len)
    serial = simulate_prefill(costs, n_layers, seq_len, [seq_len], **kw)
    iso = simulate_prefill(costs, n_layers, seq_len, ends, **kw)
    attn, _, ar = _durations(costs, ends, batch, hidden, dtype_bytes)
    bound = max(iso.compute_s + float(ar[-1]), float(attn[0]) + iso.comm_s)
    return Prediction(ends, serial.total_s, iso.total_s, iso.compute_s, iso.comm_s, bound)


# --- correcting the model with measured plans ---
# Offsets tried per refinement pass, and passes (each narrows the range around the best offset 20-fold).
OFFSET_GRID = 41
OFFSET_PASSES = 3
# A corrected model keeps at least this share of its calibrated compute (the measured unsplit prefill could
# otherwise be explained by communication alone).
MIN_COMPUTE_SCALE = 0.05


@dataclass(frozen=True)
class PlanCorrection:
    """What timed plans say the calibration missed: ``block_offset_s`` added to every attention and MLP block's
    fixed cost, then compute terms times ``compute_scale``."""

    block_offset_s: float = 0.0
    compute_scale: float = 1.0

    def apply(self, costs: LayerCosts) -> LayerCosts:
        """``costs`` corrected; a negative offset stops at a free block (a cached correction may meet costs
        calibrated again, with smaller fixed terms than those it was fitted to)."""
        shifted = dataclasses.replace(costs, attn_fixed=max(0.0, costs.attn_fixed + self.block_offset_s),
                                      mlp_fixed=max(0.0, costs.mlp_fixed + self.block_offset_s))
        return shifted.scaled(compute=self.compute_scale)


def fit_plan_correction(costs: LayerCosts, n_layers: int, seq_len: int, measured: dict, batch: int = 1, *,
                        hidden: int, dtype_bytes: int) -> PlanCorrection:
    """The correction that best explains ``measured`` ({chunk ends: ISO seconds} of several splits of one
    prompt, the unsplit one among them), in relative error.

    The per-block offset (may be negative) stands for what a block timed alone does not pay but a chunked
    prefill pays per chunk (smaller GEMMs running less efficiently, a real collective's fixed cost under an
    emulated link, kernel and Python overheads), or saves per chunk (on CPU, chunks skip part of attention's
    masked triangle); for each offset tried, the compute scale makes the unsplit prompt's prediction equal
    its measurement, so the offset is fitted to the differences between plans.
    """
    if (seq_len,) not in measured or len(measured) < 2:
        raise ValueError("measured needs the unsplit prompt and at least one split")
    kw = {"batch": batch, "hidden": hidden, "dtype_bytes": dtype_bytes}
    splits = list(measured)
    times = np.array([measured[ends] for ends in splits])

    def correction(offset):
        unsplit = simulate_prefill(PlanCorrection(offset).apply(costs), n_layers, seq_len, [seq_len], **kw)
        scale = (measured[(seq_len,)] - unsplit.comm_s) / unsplit.compute_s
        return PlanCorrection(offset, max(scale, MIN_COMPUTE_SCALE))

    def error(offset):
        corrected = correction(offset).apply(costs)
        predicted = np.array([simulate_prefill(corrected, n_layers, seq_len, ends, **kw).total_s for ends in splits])
        return float(np.sum(((predicted - times) / times) ** 2))

    serial = simulate_prefill(costs, n_layers, seq_len, [seq_len], **kw).total_s
    low, high = -min(costs.attn_fixed, costs.mlp_fixed), serial / (2 * n_layers)  # a block can't cost < 0
    best = 0.0
    for _ in range(OFFSET_PASSES):
        best = float(min(np.linspace(low, high, OFFSET_GRID), key=error))
        width = (high - low) / 20
        low, high = max(low, best - width), best + width
    return correction(best)


# --- split solver ---
def balanced_split(costs: LayerCosts, seq_len: int, n_chunks: int) -> list:
    """Chunk ends that equalise chunk compute. Tokens [0, x) cost W(x) = a*x^2 + b*x beyond fixed terms
    (a = attn_per_pair / 2, b = per-token terms + a); boundary i solves W(x) = i/k * W(S). Later chunks
    attend over more keys, so earlier chunks come out longer (docs/cost-model.md derives the two-chunk case)."""
    _check_int("n_chunks", n_chunks)
    _check_int("seq_len", seq_len)
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
    return ends + [seq_len]


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


def choose_split(costs: LayerCosts, n_layers: int, seq_len: int, batch: int = 1, *, hidden: int,
                 dtype_bytes: int, max_chunks: int = 4, granularity: int = 16,
                 min_gain: float = 0.01) -> list:
    """Chunk ends minimising the simulated prefill time, e.g. ``[seq_len]`` (don't split) or ``[s, seq_len]``.

    Two chunks: every boundary on the ``granularity`` grid. More chunks: pattern search from the
    equal-compute split. Chunks hold >= ``granularity`` tokens (>= 1 when the sequence is too short for
    that). Returns one chunk when the best split saves less than ``min_gain`` (relative) over serial.
    """
    for name, value in (("n_layers", n_layers), ("seq_len", seq_len), ("batch", batch),
                        ("hidden", hidden), ("dtype_bytes", dtype_bytes), ("max_chunks", max_chunks),
                        ("granularity", granularity)):
        _check_int(name, value)
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")

    def evaluate(ends):
        return _total_times(costs, n_layers, ends, batch, hidden, dtype_bytes)

    serial = float(evaluate(np.array([[seq_len]]))[0])
    best, best_time = [seq_len], serial
    for k in range(2, min(max_chunks, seq_len) + 1):
        step = granularity if seq_len >= k * granularity else 1
        if k == 2:
            grid = np.arange(step, seq_len - step + 1, step)
            times = evaluate(np.stack([grid, np.full_like(grid, seq_len)], axis=1))
            ends, time = [int(grid[np.argmin(times)]), seq_len], float(times.min())
        else:
            start = [seq_len]
            for i, x in reversed(list(enumerate(balanced_split(costs, seq_len, k)[:-1]))):
                snapped = max(round(x / step) * step, (i + 1) * step)  # on the grid, room for earlier chunks
                start.insert(0, min(snapped, (start[0] - step) // step * step))
            ends, time = _pattern_search(evaluate, start, step, seq_len)
        if time < best_time * (1 - 1e-12):
            best, best_time = ends, time
    if len(best) > 1 and (serial - best_time) / serial < min_gain:
        return [seq_len]
    return [int(e) for e in best]

