"""The split trial behind ``--split auto``: the planner proposes, a measurement disposes.

On the CPU dev machine the calibrated model's error (up to ~30 %, bench/README.md) exceeds the gaps between
its best splits, so its few best candidates (always with the unsplit prompt and the paper's two even chunks)
are timed on the job's own ranks, one warm-up round and TRIAL_REPEATS timed rounds, interleaved so that
drifting load hits each alike; the fastest runs where it beats the two even chunks clearly (TRIAL_MARGIN),
else they do. The trial's times also fit a ``costmodel.PlanCorrection``.
Choice and correction are cached per model, TP size, batch, length bucket, machine, dtype and link;
``--recalibrate`` times them again.
"""

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch.distributed as dist

from . import calibration, costmodel, envs, planner
from .cache import KeyedJsonFile
from .metrics import broadcast, max_over_ranks, traced_run
from .report import TrialCandidate
from .split import ChunkSplit

TRIAL_CANDIDATES = 4
TRIAL_REPEATS = 3
# How much faster than the paper's two even chunks, round for round, a plan must be to replace them. On the
# 2-core dev machine the median of 3 paired ratios spreads by about +-4 %; with a 2 % margin, 2 of 11 cells of
# bench_planner lost 6 and 13 points to the even split with plans picked on luck (bench/README.md).
TRIAL_MARGIN = 0.05


@dataclass
class SplitChoice:
    """The ISO chunks and how they were chosen: ``source`` is "given" (by the user), "trial" (timed now),
    "cached" (an earlier trial's) or "off" (no communication to hide). ``calibrated_costs``: the cost model
    fitted to this job's blocks (None for a prompt too short to calibrate on); ``correction``: what the
    trial's times add to it."""

    split: ChunkSplit
    source: str
    calibrated_costs: costmodel.LayerCosts | None
    trial: list = dataclasses.field(default_factory=list)  # TrialCandidate per timed split
    trial_s: float = 0.0  # the trial's cost
    correction: costmodel.PlanCorrection = dataclasses.field(default_factory=costmodel.PlanCorrection)

    @property
    def costs(self):
        """The cost model corrected by the trial."""
        return self.correction.apply(self.calibrated_costs) if self.calibrated_costs else None


def _candidates(prefill, costs):
    """The splits worth timing: the planner's best (by the cost model), or without costs even splits; only
    ``--chunks`` chunks where that is fixed."""
    seq_len, chunks = prefill.seq_len, prefill.cfg.chunks
    if costs is not None:
        ranked = planner.candidate_plans(costs, prefill.model.args.n_layer, seq_len,
                                         keep=TRIAL_CANDIDATES if chunks is None else 3 * chunks,
                                         max_chunks=chunks or planner.MAX_AUTO_CHUNKS, **prefill.predict_kw())
    else:  # even splits only: of 1 or 2 chunks for a prompt too short to calibrate on, up to 4 for a batch
        most = planner.MAX_AUTO_CHUNKS if prefill.packed is not None else 2
        ranked = [ChunkSplit.even(seq_len, k) for k in range(1, min(most, seq_len) + 1)]
    if chunks is None:
        return ranked
    fixed = ChunkSplit.even(seq_len, chunks)
    return ([fixed] + [c for c in ranked if len(c) == chunks and c != fixed])[:TRIAL_CANDIDATES]


def _length_bucket(seq_len):
    """Prompts of one power-of-two bucket share a cached split trial (its ends kept as fractions)."""
    return 1 << max(0, seq_len - 1).bit_length()


def fastest_split(prefill, costs) -> "SplitChoice":
    """The fastest candidate on these ranks, from the cache where it holds one."""
    candidates, seq_len = _candidates(prefill, costs), prefill.seq_len
    if prefill.communicator is None and prefill.cfg.chunks is None:
        return SplitChoice(ChunkSplit((seq_len,)), "off", costs)  # no all-reduce to hide: chunks only cost
    if len(candidates) == 1:
        return SplitChoice(candidates[0], "given", costs)
    key = dict(calibration.cache_key(prefill, kind="split-trial"), seq_len=_length_bucket(seq_len),
               chunks=prefill.cfg.chunks)
    store = _trial_file()
    cached = store.load(key) if dist.get_rank() == 0 and not prefill.cfg.recalibrate else None
    cached = broadcast(cached)
    if cached is not None:
        split = ChunkSplit.from_fractions(seq_len, cached["fractions"])
        return SplitChoice(split, "cached", costs, correction=costmodel.PlanCorrection(**cached["correction"]))
    start = time.perf_counter()
    seconds = timed_rounds(prefill, [(split, "iso") for split in candidates], TRIAL_REPEATS)
    best = candidates[_pick(seconds, default=candidates.index(_default_split(prefill)))]
    trial = _trial_candidates(prefill, candidates, seconds, costs)
    correction = _fitted_correction(prefill, costs, trial)
    if dist.get_rank() == 0:
        store.save(key, {"fractions": [end / seq_len for end in best.ends],
                         "correction": dataclasses.asdict(correction)})
    return SplitChoice(best, "trial", costs, trial, max_over_ranks(time.perf_counter() - start), correction)


def _fitted_correction(prefill, costs, trial):
    """What the trial's times say the calibration missed (none without costs, or without the unsplit prompt
    among the candidates to compare with)."""
    measured = {c.ends: c.measured_iso_ms / 1e3 for c in trial}
    if costs is None or (prefill.seq_len,) not in measured:
        return costmodel.PlanCorrection()
    return costmodel.fit_plan_correction(costs, prefill.model.args.n_layer, prefill.seq_len, measured,
                                         **prefill.predict_kw())


def _trial_file():
    return KeyedJsonFile(envs.cache_dir() / "split_trials.json", "split trial", "timing the candidates again")


def timed_rounds(prefill, plans, repeats):
    """Seconds of each (split, schedule) plan per timed round: one warm-up round, then ``repeats`` rounds in
    which every plan runs once, the order rotated each round so no plan always follows the same one. The
    slowest rank's times, so every rank sees the same numbers."""
    seconds = [[] for _ in plans]
    for round_ in range(1 + repeats):
        for i in [(round_ + j) % len(plans) for j in range(len(plans))]:
            split, mode = plans[i]
            _, elapsed, _ = traced_run(lambda t, s=split, m=mode: prefill.run(s, m, t), prefill.device)
            if round_ > 0:
                seconds[i].append(elapsed)
    return seconds


def _default_split(prefill):
    """The plan a trial keeps unless another beats it clearly: the paper's two even chunks, or the even split
    into ``--chunks`` chunks."""
    return ChunkSplit.even(prefill.seq_len, prefill.cfg.chunks or 2)


def _pick(seconds, default):
    """The index of the plan with the fastest median, where it beats plan ``default`` by TRIAL_MARGIN in the
    median of their per-round time ratios (rounds are interleaved, so a ratio cancels the load they shared);
    else ``default``. A few noisy rounds would otherwise trade a sure plan for a lucky one."""
    fastest = min(range(len(seconds)), key=lambda i: (statistics.median(seconds[i]), i))
    ratio = statistics.median(t / d for t, d in zip(seconds[fastest], seconds[default]))
    return fastest if ratio < 1 - TRIAL_MARGIN else default


def _trial_candidates(prefill, splits, seconds, costs):
    n_layer, kw = prefill.model.args.n_layer, prefill.predict_kw()
    return [TrialCandidate(split.ends, costmodel.predict(costs, n_layer, prefill.seq_len, split, **kw).iso_s * 1e3
                           if costs else math.nan, statistics.median(times) * 1e3)
            for split, times in zip(splits, seconds)]
