"""The split trial behind ``--split auto``: the planner proposes, a measurement disposes.

On the CPU dev machine the calibrated model's error (up to ~30 %, bench/README.md) exceeds the gaps between
its best splits, so its few best candidates (always with the unsplit prompt and the even two and three chunks)
are timed on the job's own ranks as a race: one warm-up round and TRIAL_ROUNDS timed rounds of every
candidate, then more rounds of the few fastest and the paper's two even chunks, interleaved so that drifting
load hits each alike. The fastest runs where it beats the two even chunks clearly (TRIAL_MARGIN); else the
unsplit prompt where the model, corrected by the trial's times (``costmodel.PlanCorrection``), predicts no split
to save ``planner.MIN_GAIN`` and the unsplit prompt measured no slower than the two even chunks; else they do.
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
from .launch import broadcast, max_over_ranks
from .report import TrialCandidate
from .split import ChunkSplit

TRIAL_CANDIDATES = 4
TRIAL_ROUNDS = 3
# Where the choice is made: the FINALISTS fastest after TRIAL_ROUNDS (with the two even chunks) run on for at
# least FINAL_ROUNDS rounds, and on to FINAL_BUDGET_S of their own time (a short prefill gets more rounds for
# the same cost; at most MAX_FINAL_ROUNDS). In bench_planner, 3 rounds of 5-6 candidates kept the two even
# chunks in 3 cells of 16 where three chunks measured 4.5-6 points faster.
FINALISTS = 3
FINAL_ROUNDS = 4
FINAL_BUDGET_S = 4.0
MAX_FINAL_ROUNDS = 16
# How much faster than the paper's two even chunks, round for round, a plan must be to replace them. On the
# 2-core dev machine the median of 3 paired ratios spreads by about +-4 %: with a 2 % margin on 3 rounds, 2 of
# 11 cells of bench_planner lost 6 and 13 points to the even split with plans picked on luck. The finalists'
# 7 or more rounds halve that spread; a plan within the margin gains at most 2-3 points (bench/README.md).
TRIAL_MARGIN = 0.04


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
    default = candidates.index(_default_split(prefill))
    seconds = _race(prefill, candidates, default)
    trial = _trial_candidates(prefill, candidates, seconds, costs)
    correction = _fitted_correction(prefill, costs, trial)
    whole = candidates.index(ChunkSplit((seq_len,))) if _predicted_off(prefill, costs, correction,
                                                                       candidates) else None
    best = candidates[_pick(seconds, default, whole)]
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


def _predicted_off(prefill, costs, correction, candidates):
    """Whether the model the trial corrected predicts that no candidate split saves ``planner.MIN_GAIN`` of the
    unsplit prompt's time (``planner.plan``'s "gain" rule); False without costs or without the unsplit prompt
    among the candidates."""
    seq_len = prefill.seq_len
    if costs is None or ChunkSplit((seq_len,)) not in candidates:
        return False
    corrected, n_layer, kw = correction.apply(costs), prefill.model.args.n_layer, prefill.predict_kw()
    iso_s = {split: costmodel.predict(corrected, n_layer, seq_len, split, **kw).iso_s for split in candidates}
    whole_s = iso_s.pop(ChunkSplit((seq_len,)))
    return min(iso_s.values()) > (1 - planner.MIN_GAIN) * whole_s


def _trial_file():
    return KeyedJsonFile(envs.cache_dir() / "split_trials.json", "split trial", "timing the candidates again")


def _race(prefill, candidates, default):
    """Seconds per timed round of each candidate (index ``default``: the plan kept unless beaten): TRIAL_ROUNDS
    of all, then the finalists' further rounds; a finalist's list is the longer."""
    plans = [(split, "iso") for split in candidates]
    seconds = timed_rounds(prefill, plans, TRIAL_ROUNDS)
    by_median = sorted(range(len(plans)), key=lambda i: statistics.median(seconds[i]))
    finalists = list(dict.fromkeys([default] + by_median[:FINALISTS]))
    final = timed_rounds(prefill, [plans[i] for i in finalists], FINAL_ROUNDS, warmup=0,
                         budget_s=FINAL_BUDGET_S, max_repeats=MAX_FINAL_ROUNDS)
    for i, times in zip(finalists, final, strict=True):
        seconds[i] += times
    return seconds


def timed_rounds(prefill, plans, repeats, *, warmup=1, budget_s=0.0, max_repeats=None):
    """Seconds of each (split, schedule) plan per timed round: ``warmup`` untimed rounds, then ``repeats``
    rounds in which every plan runs once, the order rotated each round so no plan always follows the same one,
    and more rounds (up to ``max_repeats``) while the timed rounds took less than ``budget_s`` in all. The
    slowest rank's times, so every rank sees the same numbers and stops after the same round."""
    seconds = [[] for _ in plans]
    round_ = 0
    while round_ < warmup + repeats or (round_ < warmup + (max_repeats or repeats)
                                        and sum(map(sum, seconds)) < budget_s):
        for i in [(round_ + j) % len(plans) for j in range(len(plans))]:
            split, mode = plans[i]
            _, elapsed, _ = prefill.timed_run(split, mode)
            if round_ >= warmup:
                seconds[i].append(elapsed)
        round_ += 1
    return seconds


def _default_split(prefill):
    """The plan a trial keeps unless another beats it clearly: the paper's two even chunks, or the even split
    into ``--chunks`` chunks."""
    return ChunkSplit.even(prefill.seq_len, prefill.cfg.chunks or 2)


def _pick(seconds, default, whole=None):
    """The index of the plan with the fastest median among those timed in every round plan ``default`` was
    (the race's finalists), where it beats ``default`` by TRIAL_MARGIN in the median of their per-round time
    ratios (rounds are interleaved, so a ratio cancels the load they shared). Else ``whole`` (the unsplit
    prompt's index, given where the model predicts no split to gain) where it is a finalist and no slower than
    ``default`` round for round, else ``default``. A few noisy rounds would otherwise trade a sure plan for a
    lucky one; where the model and the measurement agree that splitting does not pay, the prompt stays whole.
    """
    rounds = len(seconds[default])
    finalists = [i for i in range(len(seconds)) if len(seconds[i]) == rounds]

    def ratio(i):
        return statistics.median(t / d for t, d in zip(seconds[i], seconds[default], strict=True))

    fastest = min(finalists, key=lambda i: (statistics.median(seconds[i]), i))
    if ratio(fastest) < 1 - TRIAL_MARGIN:
        return fastest
    return whole if whole in finalists and ratio(whole) <= 1 else default


def _trial_candidates(prefill, splits, seconds, costs):
    n_layer, kw = prefill.model.args.n_layer, prefill.predict_kw()
    return [TrialCandidate(split.ends, costmodel.predict(costs, n_layer, prefill.seq_len, split, **kw).iso_s * 1e3
                           if costs else math.nan, statistics.median(times) * 1e3, len(times))
            for split, times in zip(splits, seconds, strict=True)]
