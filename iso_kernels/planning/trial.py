"""The split trial behind the prefill job's ``--split auto``: the policy proposes, a measurement disposes.

On the CPU dev machine the calibrated model's error (up to ~30 %, bench/README.md) exceeds the gaps between
its best splits, so the policy's plan (``policy.decide``) and its nearest alternatives (the solver's best per
chunk count, the unsplit prompt, the even two and three chunks) are timed on the job's own ranks as a race:
one warm-up round and TRIAL_ROUNDS timed rounds of every candidate, then more rounds of the few fastest and the
policy's plan, interleaved so that drifting load hits each alike. The fastest replaces the plan where it beats
it clearly (``policy.TRIAL_MARGIN``); else the unsplit prompt where the model, corrected by the trial's times
(``calibration.PlanCorrection``), decides against splitting and the unsplit prompt measured no slower than the
plan; else the plan runs. The choice and correction are cached under the caller's key.

Nothing here touches a process group: the caller's ``time_split`` returns the slowest rank's seconds (the
same on every rank), ``share`` agrees a value across ranks (rank 0's) and only the ``writer`` stores.
"""

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import envs
from ..cache import KeyedJsonFile
from ..split import ChunkSplit
from .calibration import PlanCorrection, fit_plan_correction
from .costs import LayerCosts
from .policy import MAX_AUTO_CHUNKS, TRIAL_GRANULARITY, TRIAL_MARGIN, Policy, decide
from .shapes import PrefillShape
from .simulation import predict
from .solver import ranked_splits

TRIAL_CANDIDATES = 4
TRIAL_ROUNDS = 3
# Where the choice is made: the FINALISTS fastest after TRIAL_ROUNDS (with the policy's plan) run on for at
# least FINAL_ROUNDS rounds, and on to FINAL_BUDGET_S of their own time (a short prefill gets more rounds for
# the same cost; at most MAX_FINAL_ROUNDS). In bench_planner, 3 rounds of 5-6 candidates kept the two even
# chunks in 3 cells of 16 where three chunks measured 4.5-6 points faster.
FINALISTS = 3
FINAL_ROUNDS = 4
FINAL_BUDGET_S = 4.0
MAX_FINAL_ROUNDS = 16


@dataclass(frozen=True)
class TrialCandidate:
    """One split the trial timed: its chunk ends, the calibrated model's prediction (before the trial
    corrected it) and the measured median over its timed rounds (more for the race's finalists)."""

    ends: tuple
    predicted_iso_ms: float
    measured_iso_ms: float
    rounds: int


@dataclass
class SplitChoice:
    """The ISO chunks and how they were chosen: ``source`` is "given" (by the user), "planned" (the policy's,
    untimed: one candidate, or a prompt the policy will not split for want of communication or tokens),
    "trial" (timed now), "cached" (an earlier trial's) or "off" (no communication to hide).
    ``calibrated_costs``: the cost model fitted to this job's blocks (None for a prompt too short to calibrate
    on); ``correction``: what the trial's times add to it."""

    split: ChunkSplit
    source: str
    calibrated_costs: LayerCosts | None
    trial: list = dataclasses.field(default_factory=list)  # TrialCandidate per timed split
    trial_s: float = 0.0  # the trial's cost
    correction: PlanCorrection = dataclasses.field(default_factory=PlanCorrection)
    verdict: str = ""  # why the trial chose ``split``, in words
    default: ChunkSplit | None = None  # the split kept unless a timed candidate beat it (the policy's plan)

    @property
    def costs(self):
        """The cost model corrected by the trial."""
        return self.correction.apply(self.calibrated_costs) if self.calibrated_costs else None


def timed_rounds(run: Callable[[int], float], count: int, repeats: int, *, warmup: int = 1, budget_s: float = 0.0,
                 max_repeats: int | None = None, after_round: Callable[[], None] | None = None) -> list[list[float]]:
    """Seconds of each of ``count`` runs per timed round (``run(i)`` runs the i-th once and returns its seconds):
    ``warmup`` untimed rounds, then ``repeats`` rounds in which every run happens once, the order rotated each
    round so no run always follows the same one, and more rounds (up to ``max_repeats``) while the timed rounds
    took less than ``budget_s`` in all. With ``run`` returning the slowest rank's seconds, every rank sees the
    same numbers and stops after the same round."""
    seconds = [[] for _ in range(count)]
    round_ = 0
    while round_ < warmup + repeats or (round_ < warmup + (max_repeats or repeats)
                                        and sum(map(sum, seconds)) < budget_s):
        for i in [(round_ + j) % count for j in range(count)]:
            elapsed = run(i)
            if round_ >= warmup:
                seconds[i].append(elapsed)
        round_ += 1
        if after_round is not None:
            after_round()
    return seconds


def split_trial(costs: LayerCosts | None, shape: PrefillShape, seq_len: int, time_split: Callable[[ChunkSplit], float],
                cache_key: dict[str, Any], *, chunks: int | None = None, even_only_chunks: int = 2,
                refresh: bool = False, share: Callable[[Any], Any] = lambda value: value,
                writer: bool = True) -> SplitChoice:
    """The fastest candidate split of a ``seq_len``-token prompt, timed by ``time_split`` (or an earlier
    trial's, cached under ``cache_key`` and the prompt's length bucket unless ``refresh``). ``chunks``: the
    user's fixed chunk count. Without ``costs`` (a prompt too short to calibrate on, a serving batch) the
    candidates are the even splits of 1..``even_only_chunks`` chunks."""
    policy = Policy(granularity=TRIAL_GRANULARITY, chunks=chunks)
    planned = decide(costs, shape, seq_len, policy) if costs is not None else None
    if planned is not None and planned.off_rule in ("no-comm", "short"):
        return SplitChoice(planned.split, "planned", costs)
    candidates, default = _candidates(costs, shape, seq_len, planned, chunks, even_only_chunks)
    if len(candidates) == 1:
        return SplitChoice(candidates[0], "given" if chunks else "planned", costs)
    key = dict(cache_key, seq_len=_length_bucket(seq_len), chunks=chunks)
    store = KeyedJsonFile(envs.cache_dir() / "split_trials.json", "split trial", "timing the candidates again")
    cached = share(store.load(key) if writer and not refresh else None)
    if cached is not None:
        return SplitChoice(ChunkSplit.from_fractions(seq_len, cached["fractions"]), "cached", costs,
                           correction=PlanCorrection(**cached["correction"]))
    spent = []

    def run(i):
        spent.append(time_split(candidates[i]))
        return spent[-1]

    seconds = _race(run, len(candidates), candidates.index(default))
    trial = [TrialCandidate(split.ends, predict(costs, shape, split).iso_s * 1e3 if costs else math.nan,
                            statistics.median(times) * 1e3, len(times))
             for split, times in zip(candidates, seconds, strict=True)]
    correction = PlanCorrection()
    whole = ChunkSplit((seq_len,))
    if costs is not None and whole in candidates:
        correction = fit_plan_correction(costs, shape, {c.ends: c.measured_iso_ms / 1e3 for c in trial})
    corrected_off = costs is not None and decide(correction.apply(costs), shape, seq_len, policy).off
    best, verdict = _pick(seconds, candidates.index(default),
                          candidates.index(whole) if corrected_off and whole in candidates else None)
    if writer:
        store.save(key, {"fractions": [end / seq_len for end in candidates[best].ends],
                         "correction": dataclasses.asdict(correction)})
    return SplitChoice(candidates[best], "trial", costs, trial, sum(spent), correction, verdict, default)


def _candidates(costs, shape, seq_len, planned, chunks, even_only_chunks):
    """(the splits worth timing, the one kept unless beaten): the policy's plan and the solver's best
    alternatives, or without costs the even splits; only ``chunks`` chunks where that is fixed."""
    if planned is not None:
        ranked = ranked_splits(costs, shape, seq_len, keep=TRIAL_CANDIDATES if chunks is None else 3 * chunks,
                               max_chunks=chunks or MAX_AUTO_CHUNKS, granularity=TRIAL_GRANULARITY,
                               must=(planned.split,))
        default = planned.split
    else:
        ranked = [ChunkSplit.even(seq_len, k) for k in range(1, min(even_only_chunks, seq_len) + 1)]
        default = ChunkSplit.even(seq_len, chunks or min(2, seq_len))
    if chunks is not None:
        ranked = [default] + [c for c in ranked if len(c) == chunks and c != default]
    return ranked[:TRIAL_CANDIDATES] if chunks is not None else ranked, default


def _length_bucket(seq_len):
    """Prompts of one power-of-two bucket share a cached split trial (its ends kept as fractions)."""
    return 1 << max(0, seq_len - 1).bit_length()


def _race(run, count, default):
    """Seconds per timed round of each candidate (index ``default``: the plan kept unless beaten): TRIAL_ROUNDS
    of all, then the finalists' further rounds; a finalist's list is the longer."""
    seconds = timed_rounds(run, count, TRIAL_ROUNDS)
    by_median = sorted(range(count), key=lambda i: statistics.median(seconds[i]))
    finalists = list(dict.fromkeys([default] + by_median[:FINALISTS]))
    final = timed_rounds(lambda j: run(finalists[j]), len(finalists), FINAL_ROUNDS, warmup=0,
                         budget_s=FINAL_BUDGET_S, max_repeats=MAX_FINAL_ROUNDS)
    for i, times in zip(finalists, final, strict=True):
        seconds[i] += times
    return seconds


def _pick(seconds, default, whole=None):
    """(index, verdict in words) of the candidate with the fastest median among those timed in every round the
    ``default`` was (the race's finalists), where it beats ``default`` by TRIAL_MARGIN in the median of their
    per-round time ratios (rounds are interleaved, so a ratio cancels the load they shared). Else ``whole`` (the
    unsplit prompt's index, given where the corrected model decides against splitting) where it is a finalist
    and no slower than ``default`` round for round, else ``default``. A few noisy rounds would otherwise trade a
    sure plan for a lucky one; where the model and the measurement agree that splitting does not pay, the
    prompt stays whole.
    """
    rounds = len(seconds[default])
    finalists = [i for i in range(len(seconds)) if len(seconds[i]) == rounds]

    def ratio(i):
        return statistics.median(t / d for t, d in zip(seconds[i], seconds[default], strict=True))

    fastest = min(finalists, key=lambda i: (statistics.median(seconds[i]), i))
    faster = 1 - ratio(fastest)
    if faster > TRIAL_MARGIN:
        return fastest, f"{faster:.1%} faster than the policy's plan round for round (margin {TRIAL_MARGIN:.0%})"
    within = "measured the fastest" if fastest == default else (
        f"no measurable difference: the fastest finalist is {faster:.1%} faster, within the {TRIAL_MARGIN:.0%} margin")
    if whole in finalists and ratio(whole) <= 1 and whole != default:
        return whole, f"unsplit: the corrected model decides against splitting; {within}"
    return default, f"the policy's plan; {within}"
