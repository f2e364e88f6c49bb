"""The split policy: every threshold side by side, and ``decide``, the one function that says whether and where
to split a prompt. ``plan()`` (the Python entry), the ``plan`` subcommand and its decision table, the
``simulate`` table and the prefill job's split trial all call it; nothing else decides.

    plan(config, tp, prompt_lens, costs=... | hardware=...) -> Plan   (an engine asks before a prefill)
    decide(costs, PrefillShape(...), seq_len, Policy(...)) -> Plan    (the same, from costs and a shape)

``decide`` is memoised on its (hashable) inputs, so an engine that asks again for a length it has seen pays a
dictionary lookup; a first answer costs one solver search (milliseconds: ``tests/planning/test_policy.py``
prints both). A plan is "off" (run the prompt unsplit) for one of the reasons of ``OFF_RULES``.
"""

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from ..hardware import HARDWARE_PRESETS, HardwareSpec
from ..split import ChunkSplit
from .costs import LayerCosts
from .shapes import ModelShape, PrefillShape, check_divisible, check_fraction, check_int, model_shape
from .simulation import predict, simulate_prefill, total_times
from .solver import best_split

if TYPE_CHECKING:  # annotations only: .model imports torch
    from ..model import ModelArgs

# --- the thresholds, each with its reason ---
# Most chunks a split may have: beyond four, each chunk's fixed costs and the shorter GEMMs outweigh what a
# smaller last all-reduce (the part no overlap hides) saves, in every setting of the decision table.
MAX_AUTO_CHUNKS = 4
# Chunk boundaries fall on multiples of this many tokens where the cost model alone decides: 128 is the
# largest BLOCK_M of the GPU GEMM configs (triton_ops/gemm_signal.py), so every chunk but the last fills whole
# row tiles, a cost the model's per-token terms do not see. A prompt shorter than two of them is not split.
SPLIT_GRANULARITY = 128
# Where a split trial times the candidates on the job's own ranks, the measurement sees the tile effects, so
# the grid can be finer: 16 tokens, the smallest block of the attention kernels.
TRIAL_GRANULARITY = 16
# A split must be predicted to save at least this fraction of the serial prefill. A margin for what the model
# does not charge: NCCL kernels take SMs and memory bandwidth from the GEMMs, shorter chunks run less
# efficient GEMMs, and a calibration is off by more than a few percent (docs/cost-model.md, section 6 and
# bench/README.md). Below it, the unsplit prefill is the safer bet.
MIN_GAIN = 0.03
# The calibrated model's error (bench/README.md: up to ~30% on the CPU dev machine) dwarfs the few percent
# between nearby splits, and there its uneven two-chunk splits never beat the even ones. So an uneven split
# must be predicted this much faster than the even split with the same number of chunks to be used.
UNEVEN_SPLIT_MIN_GAIN = 0.03
# The latency-bound regime: when the link's fixed latency is at least this share of the all-reduce of half
# the prompt, halving a message no longer (nearly) halves its time, so more chunks mostly add latency.
LATENCY_BOUND_SHARE = 0.5
# How much faster than the policy's plan, round for round, a timed candidate must be to replace it. On the
# 2-core dev machine the median of 3 paired ratios spreads by about +-4 %: with a 2 % margin on 3 rounds, 2 of
# 11 cells of bench_planner lost 6 and 13 points to the even split with plans picked on luck. The finalists'
# 7 or more rounds halve that spread; a plan within the margin gains at most 2-3 points (bench/README.md).
TRIAL_MARGIN = 0.04

# Plan.off_rule -> when it applies (in the order decide() tests them).
OFF_RULES = {
    "no-comm": "the costs have no communication: tp=1 without a modelled link (nothing to hide)",
    "short": "the prompt is shorter than two chunks of the policy's granularity (2 x SPLIT_GRANULARITY = "
             f"{2 * SPLIT_GRANULARITY} tokens for plan())",
    "comm": "negligible communication: the all-reduces' share of the serial prefill, which bounds any split's "
            "gain, is below min_gain",
    "compute": "communication-bound: compute's share of the serial prefill, the most any overlap can hide, is "
               "below min_gain",
    "latency": "the best split's gain is below min_gain and the all-reduces are latency-bound",
    "gain": "the best split's predicted gain is below min_gain",
}


@dataclass(frozen=True)
class Policy:
    """The knobs of ``decide``. ``chunks``: a chunk count the user fixed (the best split of exactly that many,
    never off); ``granularity``: the token grid of the boundaries."""

    min_gain: float = MIN_GAIN
    max_chunks: int = MAX_AUTO_CHUNKS
    granularity: int = SPLIT_GRANULARITY
    uneven_min_gain: float = UNEVEN_SPLIT_MIN_GAIN
    chunks: int | None = None

    def __post_init__(self):
        check_fraction("min_gain", self.min_gain)
        check_fraction("uneven_min_gain", self.uneven_min_gain)
        check_int("max_chunks", self.max_chunks)
        check_int("granularity", self.granularity)
        if self.chunks is not None:
            check_int("chunks", self.chunks)

    @property
    def min_split_tokens(self) -> int:
        return 2 * self.granularity


@dataclass(frozen=True)
class Plan:
    """How to run one prompt. ``split`` is what to pass to ``schedule.forward``; when ``off`` it is the unsplit
    prompt ``(L,)``, ``predicted_iso_s == predicted_serial_s`` and ``reason`` says why (``off_rule`` names the
    rule of ``OFF_RULES``). ``split_gain``: the predicted gain of the best split that was considered, also
    when it was not good enough (None when the plan was off before any split was evaluated). ``parts``: what
    the predictions are made of, to hold against a measurement (``Parts``)."""

    split: ChunkSplit
    predicted_serial_s: float
    predicted_iso_s: float
    off: bool
    reason: str | None = None
    off_rule: str | None = None
    split_gain: float | None = None
    parts: "Parts | None" = None

    @property
    def ends(self) -> tuple[int, ...]:
        return self.split.ends

    @property
    def gain(self) -> float:
        """Predicted 1 - iso / serial of this plan (0 when off)."""
        return 1 - self.predicted_iso_s / self.predicted_serial_s if self.predicted_serial_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ends": list(self.ends), "chunks": len(self.split), "off": self.off, "reason": self.reason,
                "off_rule": self.off_rule, "gain": self.gain, "split_gain": self.split_gain,
                "predicted_serial_s": self.predicted_serial_s, "predicted_iso_s": self.predicted_iso_s,
                **(dataclasses.asdict(self.parts) if self.parts else {})}


@dataclass(frozen=True)
class Parts:
    """The parts of a plan's predictions: the unsplit prefill without communication (``no_comm_s``), one
    all-reduce of the whole prompt (``all_reduce_s``), ``all_reduces`` of them per prefill (``comm_s``), and the
    bound no schedule of the plan's chunks beats (``bound_s``: the plan's compute plus its last all-reduce, or
    its first block plus all its communication, whichever is longer)."""

    no_comm_s: float
    all_reduce_s: float
    all_reduces: int
    comm_s: float
    bound_s: float


# --- the decision ---
@functools.lru_cache(maxsize=4096)
def decide(costs: LayerCosts, shape: PrefillShape, seq_len: int, policy: Policy = Policy()) -> Plan:
    """Whether and where to split a ``seq_len``-token prompt: the off rules of ``OFF_RULES`` in order, else the
    solver's fastest split of up to ``policy.max_chunks`` chunks on the ``policy.granularity`` grid, replaced by
    the even split with as many chunks unless it is ``uneven_min_gain`` faster or the even split would not save
    ``min_gain``, taken if it saves ``min_gain``. With ``policy.chunks`` fixed, the best split of that many
    chunks, never off."""
    check_int("seq_len", seq_len)
    whole = ChunkSplit((seq_len,))
    serial = simulate_prefill(costs, shape, whole)

    def parts(split):
        return Parts(serial.compute_s, float(costs.all_reduce(shape.message_bytes(seq_len))), 2 * shape.n_layers,
                     serial.comm_s, predict(costs, shape, split).bound_s)

    def off(rule, reason, split_gain=None):
        return Plan(whole, serial.total_s, serial.total_s, True, reason, rule, split_gain, parts(whole))

    fixed = policy.chunks is not None
    if fixed and seq_len < policy.chunks:
        raise ValueError(f"chunks: a prompt of {seq_len} tokens cannot be cut into {policy.chunks} chunks")
    compute, comm, min_gain = serial.compute_s, serial.comm_s, policy.min_gain
    if not fixed:
        if not costs.has_comm:
            return off("no-comm", "no all-reduce to hide: the costs have no communication (tp=1 without a link)")
        if seq_len < policy.min_split_tokens:
            return off("short", f"prompt too short to split: {seq_len} < {policy.min_split_tokens} tokens "
                                f"(two chunks of at least {policy.granularity})")
        if comm <= compute and comm / serial.total_s < min_gain:
            return off("comm", f"negligible communication: the all-reduces are {comm / serial.total_s:.1%} of "
                               f"the serial prefill, so no split can save min_gain={min_gain:.1%}")
        if compute < comm and compute / serial.total_s < min_gain:
            return off("compute", f"communication-bound: compute is {compute / serial.total_s:.1%} of the "
                                  f"serial prefill, too little to hide the all-reduces under "
                                  f"(min_gain={min_gain:.1%})")
    split = best_split(costs, shape, seq_len, max_chunks=max(1, min(policy.max_chunks, seq_len // policy.granularity)),
                       granularity=policy.granularity, chunks=policy.chunks)
    even = ChunkSplit.even(seq_len, len(split))
    uneven_s, even_s = total_times(costs, shape, np.array([split.ends, even.ends]))
    iso_s = float(uneven_s)
    # The even split unless the uneven one is clearly faster, or the even one alone would not be worth taking.
    if uneven_s > (1 - policy.uneven_min_gain) * even_s and (fixed or even_s <= (1 - min_gain) * serial.total_s):
        split, iso_s = even, float(even_s)
    gain = 1 - iso_s / serial.total_s
    if fixed or (len(split) > 1 and gain >= min_gain):
        return Plan(split, serial.total_s, iso_s, False, split_gain=gain, parts=parts(split))
    half_bytes = shape.message_bytes(seq_len // 2)
    half, latency = float(costs.all_reduce(half_bytes)), float(costs.all_reduce_latency(half_bytes))
    if len(split) == 1:
        gain, best = 0.0, "no split is predicted to beat the unsplit prefill"
    else:
        best = f"the best split ({len(split)} chunks) is predicted to save {gain:.1%} < min_gain={min_gain:.1%}"
    if latency >= LATENCY_BOUND_SHARE * half:
        return off("latency", f"latency-bound: an all-reduce of half the prompt takes {1e6 * half:.0f} us, "
                              f"{latency / half:.0%} of it the link's latency, so halving a message does "
                              f"not halve its time; {best}", gain)
    return off("gain", best, gain)


# --- plan(): the Python entry, from a model config and a datasheet or a calibration ---
def resolve_costs(shape: ModelShape, tp: int, costs: LayerCosts | None, hardware: str | HardwareSpec | None,
                  collective: str = "nccl") -> LayerCosts:
    """``costs`` (a calibration), or the costs ``hardware`` (a preset name or a HardwareSpec) gives with its
    ``collective`` link."""
    if (costs is None) == (hardware is None):
        raise ValueError("pass exactly one of costs= (a calibration: LayerCosts) or hardware= (a preset name "
                         "or HardwareSpec)")
    if costs is not None:
        if not isinstance(costs, LayerCosts):
            raise TypeError(f"costs must be a LayerCosts, got {type(costs).__name__}")
        return costs
    if isinstance(hardware, str):
        if hardware not in HARDWARE_PRESETS:
            raise ValueError(f"hardware: unknown preset {hardware!r}; known: {', '.join(sorted(HARDWARE_PRESETS))}")
        hardware = HARDWARE_PRESETS[hardware]
    if not isinstance(hardware, HardwareSpec):
        raise TypeError(f"hardware must be a preset name or a HardwareSpec, got {type(hardware).__name__}")
    return LayerCosts.from_datasheet(shape, hardware, tp, collective)


@overload
def plan(config: "dict[str, Any] | ModelArgs | ModelShape", tp: int, prompt_lens: int | np.integer, *,
         costs: LayerCosts | None = None, hardware: str | HardwareSpec | None = None, collective: str = "nccl",
         batch: int = 1, dtype_bytes: int = 2, min_gain: float = MIN_GAIN,
         max_chunks: int = MAX_AUTO_CHUNKS) -> Plan: ...


@overload
def plan(config: "dict[str, Any] | ModelArgs | ModelShape", tp: int,
         prompt_lens: list[int] | tuple[int, ...] | np.ndarray, *, costs: LayerCosts | None = None,
         hardware: str | HardwareSpec | None = None, collective: str = "nccl", batch: int = 1,
         dtype_bytes: int = 2, min_gain: float = MIN_GAIN, max_chunks: int = MAX_AUTO_CHUNKS) -> list[Plan]: ...


def plan(config: "dict[str, Any] | ModelArgs | ModelShape", tp: int,
         prompt_lens: int | np.integer | list[int] | tuple[int, ...] | np.ndarray, *,
         costs: LayerCosts | None = None, hardware: str | HardwareSpec | None = None, collective: str = "nccl",
         batch: int = 1, dtype_bytes: int = 2, min_gain: float = MIN_GAIN,
         max_chunks: int = MAX_AUTO_CHUNKS) -> Plan | list[Plan]:
    """Whether and how to split the prefill of ``prompt_lens`` tokens (an int: one Plan; a list: one Plan per
    length, each prompt planned alone) of model ``config`` (a ``config.json`` dict, ``ModelArgs`` or
    ``ModelShape``) over ``tp`` ranks, with ``batch`` sequences of that length per prefill.

    The costs are a calibration (``costs``, e.g. ``planning.load_calibration``'s) or a datasheet
    (``hardware``: a ``hardware.HARDWARE_PRESETS`` name or a ``HardwareSpec``, with the all-reduces of its
    ``collective`` link, "nccl" or "multimem": the baseline is the prefill with the same all-reduce), exactly
    one of them. The
    decision is ``decide``'s with ``Policy(min_gain, max_chunks)`` (boundaries on the ``SPLIT_GRANULARITY``
    grid). Costs with communication at ``tp=1`` (an emulated link) are planned like any other.
    """
    shape = model_shape(config, dtype_bytes)
    check_divisible(shape, tp)
    check_int("batch", batch)
    check_fraction("min_gain", min_gain)  # before float(): float("0.1") or float(None) would not name it
    policy = Policy(min_gain=float(min_gain), max_chunks=max_chunks)
    costs = resolve_costs(shape, tp, costs, hardware, collective)
    single = not isinstance(prompt_lens, (list, tuple, np.ndarray))
    lens = [prompt_lens] if single else list(prompt_lens)
    for length in lens:
        check_int("prompt_lens", length)
    plans = [decide(costs, shape.prefill(batch), int(length), policy) for length in lens]
    return plans[0] if single else plans
