"""The cost model fitted to measurements: ``fit_layer_costs`` (block timings -> ``LayerCosts``), its cache
file, and ``PlanCorrection`` (what the timed runs of whole prefills say the block fit missed).

The timings come from the caller's callables (the prefill job times its own blocks on its ranks:
``iso_kernels.measure``), so nothing here runs a model.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import envs
from ..cache import KeyedJsonFile
from ..split import ChunkSplit
from .costs import LayerCosts
from .shapes import PrefillShape, check_int
from .simulation import simulate_prefill


# --- the block fit ---
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
    check_int("batch", batch)
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


def fit_plan_correction(costs: LayerCosts, shape: PrefillShape, measured: dict) -> PlanCorrection:
    """The correction that best explains ``measured`` ({chunk ends: ISO seconds} of several splits of one
    prompt, the unsplit one among them), in relative error.

    The per-block offset (may be negative) stands for what a block timed alone does not pay but a chunked
    prefill pays per chunk (smaller GEMMs running less efficiently, a real collective's fixed cost under an
    emulated link, kernel and Python overheads), or saves per chunk (on CPU, chunks skip part of attention's
    masked triangle); for each offset tried, the compute scale makes the unsplit prompt's prediction equal
    its measurement, so the offset is fitted to the differences between plans.
    """
    seq_len = max(ends[-1] for ends in measured)
    whole = ChunkSplit((seq_len,))
    if any(ends[-1] != seq_len for ends in measured):
        raise ValueError(f"measured: every split must end at the prompt's length {seq_len}, got {sorted(measured)}")
    if whole.ends not in measured or len(measured) < 2:
        raise ValueError("measured needs the unsplit prompt and at least one split")
    splits = [ChunkSplit(ends) for ends in measured]
    times = np.array([measured[split.ends] for split in splits])

    def correction(offset):
        unsplit = simulate_prefill(PlanCorrection(offset).apply(costs), shape, whole)
        scale = (measured[(seq_len,)] - unsplit.comm_s) / unsplit.compute_s
        return PlanCorrection(offset, max(scale, MIN_COMPUTE_SCALE))

    def error(offset):
        corrected = correction(offset).apply(costs)
        predicted = np.array([simulate_prefill(corrected, shape, split).total_s for split in splits])
        return float(np.sum(((predicted - times) / times) ** 2))

    serial = simulate_prefill(costs, shape, whole).total_s
    low, high = -min(costs.attn_fixed, costs.mlp_fixed), serial / (2 * shape.n_layers)  # a block can't cost < 0
    best = 0.0
    for _ in range(OFFSET_PASSES):
        best = float(min(np.linspace(low, high, OFFSET_GRID), key=error))
        width = (high - low) / 20
        low, high = max(low, best - width), best + width
    return correction(best)
