"""The split policy: whether and where to cut a prompt into ISO chunks, from a cost model.

    plan(config, tp, prompt_lens, costs=... | hardware=...) -> Plan       (an engine asks before a prefill)
    candidate_plans(costs, n_layers, seq_len, ...) -> [ChunkSplit, ...]   (splits worth timing, best first)
    prefill_split(costs, n_layers, seq_len, chunks)                       (the prefill job's ``--split auto``)
    python -m iso_kernels plan --model llama2-70b --tp 8 --seq-len 4096 --hardware h100-nvlink
    python -m iso_kernels plan --table --markdown                        (bench/README.md's decision table)

Everything here is arithmetic on ``costmodel`` (docs/cost-model.md): no process group, no tensors, no GPU.
``plan`` is memoised on its (hashable) inputs, so an engine that asks again for a length it has seen pays
a dictionary lookup; a first answer costs one solver search (milliseconds: ``tests/test_planner.py`` prints
both). A plan is "off" (run the prompt unsplit) for one of the reasons of ``OFF_RULES``.
"""

import argparse
import dataclasses
import functools
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from .costmodel import (
    LayerCosts,
    ModelShape,
    _check_int,
    _total_times,
    balanced_split,
    choose_split,
    simulate_prefill,
)
from .hardware import HARDWARE_PRESETS, HardwareSpec
from .simulate import PAPER_MODELS, _preset, render_table
from .split import ChunkSplit

if TYPE_CHECKING:  # annotations only: .model imports torch, which model_shape() loads only for the configs that need it
    from .model import ModelArgs

# --- the prefill's split policy (the engine's --split auto) ---
MAX_AUTO_CHUNKS = 4
# The calibrated model's error (bench/README.md: up to ~30% on the CPU dev machine) dwarfs the few percent
# between nearby splits, and there its uneven two-chunk splits never beat the even ones. So an uneven split
# must be predicted this much faster than the even split with the same number of chunks to be used.
UNEVEN_SPLIT_MIN_GAIN = 0.03


def prefill_split(costs: LayerCosts | None, n_layers: int, seq_len: int, chunks: int | None = None, *,
                  batch: int = 1, hidden: int, dtype_bytes: int, max_chunks: int = MAX_AUTO_CHUNKS,
                  granularity: int = 16) -> ChunkSplit:
    """The ISO chunks of a prefill when the user fixed no split: ``chunks`` chunks (None: the solver's choice
    of up to ``max_chunks``), the even split without ``costs`` (a prompt too short to calibrate on) or when an
    uneven split is not predicted at least UNEVEN_SPLIT_MIN_GAIN faster than the even one. Boundaries lie on
    the ``granularity`` grid (``costmodel.choose_split``)."""
    if costs is None:
        return ChunkSplit.even(seq_len, chunks or min(2, seq_len))
    kw = {"batch": batch, "hidden": hidden, "dtype_bytes": dtype_bytes}
    ends = choose_split(costs, n_layers, seq_len, max_chunks=chunks or max_chunks, min_gain=0.0,
                        granularity=granularity, **kw)
    if chunks and len(ends) != chunks:
        ends = balanced_split(costs, seq_len, chunks)
    even = ChunkSplit.even(seq_len, len(ends))
    uneven_s, even_s = _total_times(costs, n_layers, np.array([ends, even.ends]), batch, hidden, dtype_bytes)
    return even if uneven_s > (1 - UNEVEN_SPLIT_MIN_GAIN) * even_s else ChunkSplit(tuple(ends))


# --- plan(): the policy with its off rules ---
# Chunk boundaries fall on multiples of this many tokens: 128 is the largest BLOCK_M of the GPU GEMM configs
# (triton_ops/gemm_signal.py), so every chunk but the last fills whole row tiles. A prompt shorter than two
# of them is not split: a chunk of fewer rows runs as many row tiles at lower occupancy, a cost the model's
# per-token terms do not see.
SPLIT_GRANULARITY = 128
MIN_SPLIT_TOKENS = 2 * SPLIT_GRANULARITY
# A split must be predicted to save at least this fraction of the serial prefill. Like UNEVEN_SPLIT_MIN_GAIN,
# it is a margin for what the model does not charge: NCCL kernels take SMs and memory bandwidth from the
# GEMMs, shorter chunks run less efficient GEMMs, and a calibration is off by more than a few percent
# (docs/cost-model.md, section 6 and bench/README.md). Below it, the unsplit prefill is the safer bet.
MIN_GAIN = 0.03
# The latency-bound regime: when the link's fixed latency is at least this share of the all-reduce of half the
# prompt, halving a message no longer (nearly) halves its time, so more chunks mostly add latency.
LATENCY_BOUND_SHARE = 0.5
# Plan.off_rule -> when it applies (in the order plan() tests them).
OFF_RULES = {
    "no-comm": "the costs have no communication: tp=1 without a modelled link (nothing to hide)",
    "short": f"the prompt is shorter than MIN_SPLIT_TOKENS={MIN_SPLIT_TOKENS}",
    "comm": "negligible communication: the all-reduces' share of the serial prefill, which bounds any split's "
            "gain, is below min_gain",
    "compute": "communication-bound: compute's share of the serial prefill, the most any overlap can hide, is "
               "below min_gain",
    "latency": "the best split's gain is below min_gain and the all-reduces are latency-bound",
    "gain": "the best split's predicted gain is below min_gain",
}


@dataclass(frozen=True)
class Plan:
    """How to run one prompt. ``split`` is what to pass to ``schedule.forward``; when ``off`` it is the unsplit
    prompt ``(L,)``, ``predicted_iso_s == predicted_serial_s`` and ``reason`` says why (``off_rule`` names the
    rule of ``OFF_RULES``). ``split_gain``: the predicted gain of the best split that was considered, also
    when it was not good enough (None when the plan was off before any split was evaluated)."""

    split: ChunkSplit
    predicted_serial_s: float
    predicted_iso_s: float
    off: bool
    reason: str | None = None
    off_rule: str | None = None
    split_gain: float | None = None

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
                "predicted_serial_s": self.predicted_serial_s, "predicted_iso_s": self.predicted_iso_s}


def model_shape(config: "dict[str, Any] | ModelArgs | ModelShape", dtype_bytes: int = 2) -> ModelShape:
    """The cost model's shape of ``config``: a Hugging Face ``config.json`` dict, a ``model.ModelArgs`` or a
    ``ModelShape`` (its ``dtype_bytes`` replaced by ``dtype_bytes``)."""
    _check_int("dtype_bytes", dtype_bytes)
    if isinstance(config, ModelShape):
        return dataclasses.replace(config, dtype_bytes=dtype_bytes)
    from .model import ModelArgs  # torch: only for the inputs that need it

    if isinstance(config, dict):
        config = ModelArgs.from_hf_config(config)
    if not isinstance(config, ModelArgs):
        raise TypeError(f"config must be a config.json dict, a ModelArgs or a ModelShape, got {type(config).__name__}")
    return ModelShape(hidden=config.dim, n_layers=config.n_layer, n_heads=config.n_head,
                      n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                      intermediate=config.intermediate_size, vocab=config.vocab_size, dtype_bytes=dtype_bytes)


def check_tp(shape: ModelShape, tp: int) -> None:
    """``tp.check_divisible``'s rule (whole query and KV heads, and the MLP, per rank; KV heads are never
    replicated), as a ValueError naming ``tp``."""
    _check_int("tp", tp)
    from .tp import check_divisible

    try:
        check_divisible(types.SimpleNamespace(n_head=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                                              intermediate_size=shape.intermediate), tp)
    except ValueError as exc:
        raise ValueError(f"tp: {exc}") from None


def _resolve_costs(shape, tp, costs, hardware):
    if (costs is None) == (hardware is None):
        raise ValueError("pass exactly one of costs= (a calibration: LayerCosts) or hardware= (a preset name "
                         "or HardwareSpec)")
    if costs is not None:
        if not isinstance(costs, LayerCosts):
            raise TypeError(f"costs must be a LayerCosts, got {type(costs).__name__}")
        return costs
    if isinstance(hardware, str):
        hardware = _preset(HARDWARE_PRESETS, hardware, "hardware")
    if not isinstance(hardware, HardwareSpec):
        raise TypeError(f"hardware must be a preset name or a HardwareSpec, got {type(hardware).__name__}")
    return LayerCosts.from_datasheet(shape, hardware, tp)


@overload
def plan(config: "dict[str, Any] | ModelArgs | ModelShape", tp: int, prompt_lens: int | np.integer, *,
         costs: LayerCosts | None = None, hardware: str | HardwareSpec | None = None, batch: int = 1,
         dtype_bytes: int = 2, min_gain: float = MIN_GAIN, max_chunks: int = MAX_AUTO_CHUNKS) -> Plan: ...


@overload
def plan(config: "dict[str, Any] | ModelArgs | ModelShape", tp: int,
         prompt_lens: list[int] | tuple[int, ...] | np.ndarray, *, costs: LayerCosts | None = None,
         hardware: str | HardwareSpec | None = None, batch: int = 1, dtype_bytes: int = 2,
         min_gain: float = MIN_GAIN, max_chunks: int = MAX_AUTO_CHUNKS) -> list[Plan]: ...


def plan(config: "dict[str, Any] | ModelArgs | ModelShape", tp: int,
         prompt_lens: int | np.integer | list[int] | tuple[int, ...] | np.ndarray, *,
         costs: LayerCosts | None = None, hardware: str | HardwareSpec | None = None, batch: int = 1,
         dtype_bytes: int = 2, min_gain: float = MIN_GAIN, max_chunks: int = MAX_AUTO_CHUNKS) -> Plan | list[Plan]:
    """Whether and how to split the prefill of ``prompt_lens`` tokens (an int: one Plan; a list: one Plan per
    length, each prompt planned alone) of model ``config`` (a ``config.json`` dict, ``ModelArgs`` or
    ``ModelShape``) over ``tp`` ranks, with ``batch`` sequences of that length per prefill.

    The costs are a calibration (``costs``, e.g. ``costmodel.load_calibration``'s) or a datasheet
    (``hardware``: a ``hardware.HARDWARE_PRESETS`` name or a ``HardwareSpec``), exactly one of them. The
    split is ``prefill_split``'s (up to ``max_chunks`` chunks on the ``SPLIT_GRANULARITY`` grid, even
    unless an uneven split is clearly faster); the plan is off when a rule of ``OFF_RULES`` applies, e.g. a
    predicted gain under ``min_gain``. Costs with communication at ``tp=1`` (an emulated link) are planned
    like any other.
    """
    shape = model_shape(config, dtype_bytes)
    check_tp(shape, tp)
    _check_int("batch", batch)
    _check_int("max_chunks", max_chunks)
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    costs = _resolve_costs(shape, tp, costs, hardware)
    single = not isinstance(prompt_lens, (list, tuple, np.ndarray))
    lens = [prompt_lens] if single else list(prompt_lens)
    for length in lens:
        _check_int("prompt_lens", length)
    plans = [_plan_one(costs, shape, tp, int(length), batch, float(min_gain), max_chunks) for length in lens]
    return plans[0] if single else plans


@functools.lru_cache(maxsize=4096)
def _plan_one(costs, shape, tp, seq_len, batch, min_gain, max_chunks):
    kw = {"batch": batch, "hidden": shape.hidden, "dtype_bytes": shape.dtype_bytes}
    serial = simulate_prefill(costs, shape.n_layers, seq_len, (seq_len,), **kw)

    def off(rule, reason, split_gain=None):
        return Plan(ChunkSplit((seq_len,)), serial.total_s, serial.total_s, True, reason, rule, split_gain)

    if costs.ar_latency == 0 and costs.ar_bandwidth == math.inf:
        return off("no-comm", f"tp={tp}: no all-reduce to hide" if tp == 1
                   else "the costs have no communication (ar_latency 0, ar_bandwidth inf)")
    if seq_len < MIN_SPLIT_TOKENS:
        return off("short", f"prompt too short to split: {seq_len} < MIN_SPLIT_TOKENS={MIN_SPLIT_TOKENS} tokens "
                            f"(two chunks of at least {SPLIT_GRANULARITY})")
    compute, comm = serial.compute_s, serial.comm_s
    if comm <= compute and comm / serial.total_s < min_gain:
        return off("comm", f"negligible communication: the all-reduces are {comm / serial.total_s:.1%} of the "
                           f"serial prefill, so no split can save min_gain={min_gain:.1%}")
    if compute < comm and compute / serial.total_s < min_gain:
        return off("compute", f"communication-bound: compute is {compute / serial.total_s:.1%} of the serial "
                              f"prefill, too little to hide the all-reduces under (min_gain={min_gain:.1%})")
    split = prefill_split(costs, shape.n_layers, seq_len, max_chunks=min(max_chunks, seq_len // SPLIT_GRANULARITY),
                          granularity=SPLIT_GRANULARITY, **kw)
    iso_s = float(_total_times(costs, shape.n_layers, np.array([split.ends]), batch, shape.hidden,
                               shape.dtype_bytes)[0])
    gain = 1 - iso_s / serial.total_s
    if len(split) > 1 and gain >= min_gain:
        return Plan(split, serial.total_s, iso_s, False, split_gain=gain)
    half = costs.all_reduce(batch * (seq_len // 2) * shape.hidden * shape.dtype_bytes)
    if len(split) == 1:
        gain, best = 0.0, "no split is predicted to beat the unsplit prefill"
    else:
        best = f"the best split ({len(split)} chunks) is predicted to save {gain:.1%} < min_gain={min_gain:.1%}"
    if costs.ar_latency >= LATENCY_BOUND_SHARE * half:
        return off("latency", f"latency-bound: an all-reduce of half the prompt takes {1e6 * half:.0f} us, "
                              f"{costs.ar_latency / half:.0%} of it the link's latency, so halving a message does "
                              f"not halve its time; {best}", gain)
    return off("gain", best, gain)


# --- candidates for an engine to time ---
def candidate_plans(costs: LayerCosts, n_layers: int, seq_len: int, *, batch: int, hidden: int,
                    dtype_bytes: int, keep: int = 4, max_chunks: int = 4, granularity: int = 16) -> list:
    """The cost model's best ``keep`` splits of a ``seq_len``-token prompt, best predicted first, plus the
    unsplit ``(L,)`` and the even two- and three-chunk splits (where ``L`` and ``max_chunks`` allow) wherever
    they rank: for every chunk count up to ``max_chunks``, the solver's best split (``choose_split``), the
    equal-compute split (``balanced_split``) and the even split, without splits within ``granularity``
    tokens of a better one or of those always kept. Deterministic (ties: fewer chunks, then earlier ends);
    an engine times these on the real ranks and keeps the fastest."""
    for name, value in (("n_layers", n_layers), ("seq_len", seq_len), ("keep", keep),
                        ("max_chunks", max_chunks)):
        _check_int(name, value)
    kw = {"batch": batch, "hidden": hidden, "dtype_bytes": dtype_bytes}
    unsplit, candidates = ChunkSplit((seq_len,)), {ChunkSplit((seq_len,))}
    for k in range(2, min(max_chunks, seq_len) + 1):
        solved = choose_split(costs, n_layers, seq_len, max_chunks=k, min_gain=0.0, granularity=granularity,
                              **kw)
        candidates |= {ChunkSplit(tuple(solved)), ChunkSplit(tuple(balanced_split(costs, seq_len, k))),
                       ChunkSplit.even(seq_len, k)}
    timed = sorted((simulate_prefill(costs, n_layers, seq_len, c, **kw).total_s, len(c), c.ends, c)
                   for c in candidates)
    must = [unsplit] + [ChunkSplit.even(seq_len, k) for k in (2, 3) if k <= min(max_chunks, seq_len)]
    ranked = []
    for *_, c in timed:  # a split within ``granularity`` tokens of another would time the same plan again
        if c in must or not any(_near(c, kept, granularity) for kept in ranked + must):
            ranked.append(c)
    return [c for c in ranked if c in ranked[:keep] or c in must]


def _near(a: ChunkSplit, b: ChunkSplit, tokens: int) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a.ends, b.ends, strict=True)) <= tokens


# --- the decision table ---
# Llama-family shapes for the table: hidden, layers, query heads, KV heads, head_dim, SwiGLU width, vocab,
# from each model's Hugging Face config.json: meta-llama/Llama-2-7b-hf (4096, 32, 32 MHA, 11008),
# meta-llama/Llama-2-13b-hf (5120, 40, 40 MHA, 13824), codellama/CodeLlama-34b-hf (8192, 48, 64 heads,
# 8 KV heads, 22016), meta-llama/Llama-2-70b-hf (8192, 80, 64 heads, 8 KV heads, 28672).
TABLE_MODELS = {
    "llama2-7b": ModelShape(4096, 32, 32, 32, 128, 11008, 32000),
    "llama2-13b": ModelShape(5120, 40, 40, 40, 128, 13824, 32000),
    "codellama-34b": ModelShape(8192, 48, 64, 8, 128, 22016, 32000),
    "llama2-70b": PAPER_MODELS["llama2-70b"],
}
# The shapes --model accepts by name.
MODEL_SHAPES = {**PAPER_MODELS, **TABLE_MODELS}
# h100-nvlink stands for H100 and H200 alike: the same Hopper die (989 dense bf16 TFLOP/s) and NVLink 4; the
# H200's 141 GB (against the preset's 80 GiB) changes only the table's "fits" column.
TABLE_GPUS = ("rtx4090-pcie4", "a800-nvlink", "a100-nvlink", "h100-nvlink")
TABLE_TPS = (2, 4, 8)
TABLE_SEQ_LENS = tuple(2**i for i in range(8, 16))  # 256 .. 32768
GIB = 2**30


def decision_table(gpus=TABLE_GPUS, models=TABLE_MODELS, tps=TABLE_TPS, seq_lens=TABLE_SEQ_LENS, *,
                   batch=1, dtype_bytes=2, min_gain=MIN_GAIN, max_chunks=MAX_AUTO_CHUNKS) -> list:
    """One dict per (gpu, model, tp) from the datasheet costs; ``models``: name -> config (anything ``plan``
    takes). ``plans``: a Plan per length, or None with ``impossible`` = why when tp does not divide the model;
    ``fits_memory``: the bf16 weights / tp fit the GPU's memory (KV cache and activations ignored)."""
    rows = []
    for gpu in gpus:
        hardware = _preset(HARDWARE_PRESETS, gpu, "gpus")
        for name, config in models.items():
            shape = model_shape(config, dtype_bytes)
            for tp in tps:
                row = {"gpu": gpu, "model": name, "tp": tp, "impossible": None, "plans": None,
                       "fits_memory": shape.weight_bytes / tp / GIB <= hardware.memory_gib}
                try:
                    row["plans"] = plan(shape, tp, list(seq_lens), hardware=hardware, batch=batch,
                                        dtype_bytes=dtype_bytes, min_gain=min_gain, max_chunks=max_chunks)
                except ValueError as exc:
                    row["impossible"] = str(exc)
                rows.append(row)
    return rows


SHORT_RULES = {"no-comm": "no comm", "short": "short", "comm": "comm", "compute": "compute",
               "latency": "latency {gain}", "gain": "gain {gain}"}


def _cell(p: Plan) -> str:
    """``31.2% (2: .50)``: gain, chunk count and the chunk ends as fractions of the prompt; or ``off (why)``."""
    if not p.off:
        fractions = " ".join(f"{e / p.split.seq_len:.2f}".lstrip("0") for e in p.ends[:-1])
        return f"{p.gain:.1%} ({len(p.split)}: {fractions})"
    gain = f"{p.split_gain:.1%}" if p.split_gain is not None else ""
    return f"off ({SHORT_RULES[p.off_rule].format(gain=gain)})"


def format_decision_table(rows, seq_lens=TABLE_SEQ_LENS, markdown=False) -> str:
    cells = [["GPU", "model", "TP", "fits"] + [f"{s // 1024}k" if s >= 1024 else str(s) for s in seq_lens]]
    for r in rows:
        body = [_cell(p) for p in r["plans"]] if r["plans"] is not None else \
            [f"impossible ({r['impossible']})"] + [""] * (len(seq_lens) - 1)
        cells.append([r["gpu"], r["model"], str(r["tp"]), "yes" if r["fits_memory"] else "NO"] + body)
    return render_table(cells, markdown)


def format_plans(rows, seq_lens) -> str:
    """One line per (gpu, model, tp, length): the split and its predicted times, or why it is off."""
    lines = []
    for r in rows:
        for seq_len, p in zip(seq_lens, r["plans"] or [None] * len(seq_lens), strict=True):
            head = f"{r['model']} tp={r['tp']} seq_len={seq_len} {r['gpu']}:"
            if p is None:
                lines.append(f"{head} impossible: {r['impossible']}")
            elif p.off:
                lines.append(f"{head} off, {p.reason} (serial {1e3 * p.predicted_serial_s:.1f} ms)")
            else:
                lines.append(f"{head} {len(p.split)} chunks, ends {list(p.ends)}; predicted serial "
                             f"{1e3 * p.predicted_serial_s:.1f} ms, iso {1e3 * p.predicted_iso_s:.1f} ms, "
                             f"gain {p.gain:.1%}")
    return "\n".join(lines)


# --- command line: python -m iso_kernels plan ---
def _model_config(name):
    """A shape name (MODEL_SHAPES), an engine preset (checkpoint.PRESETS), a config.json or a checkpoint
    folder holding one."""
    if name in MODEL_SHAPES:
        return MODEL_SHAPES[name]
    from . import checkpoint

    if name in checkpoint.PRESETS:
        return checkpoint.preset_config(name)
    path = Path(name)
    if path.is_dir():
        return checkpoint.read_config(path)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"--model {name}: invalid JSON ({exc})") from None
    raise ValueError(f"--model {name!r} is neither a shape ({', '.join(sorted(MODEL_SHAPES))}), a preset "
                     f"({', '.join(sorted(checkpoint.PRESETS))}), a config.json nor a checkpoint folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=_list(str), help="comma-separated shape names, presets, config.json "
                        f"paths or checkpoint folders (default llama2-70b; with --table {','.join(TABLE_MODELS)})")
    parser.add_argument("--tp", type=_list(int), help="TP degrees (default 8; with --table 2,4,8)")
    parser.add_argument("--seq-len", type=_list(int), help="prompt lengths (default 4096; with --table 256..32768)")
    parser.add_argument("--hardware", type=_list(str), help="hardware presets, " + ", ".join(HARDWARE_PRESETS)
                        + " (default h100-nvlink, which stands for H200 too; with --table all of them)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per prefill (default 1)")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN,
                        help=f"smallest predicted gain worth splitting for (default {MIN_GAIN})")
    parser.add_argument("--max-chunks", type=int, default=MAX_AUTO_CHUNKS,
                        help=f"most chunks (default {MAX_AUTO_CHUNKS})")
    parser.add_argument("--table", action="store_true", help="the decision table: every GPU x model x TP x length")
    parser.add_argument("--markdown", action="store_true", help="with --table: a Markdown table")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")


def _list(kind):
    def parse(text):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values
    return parse


def run(args: argparse.Namespace) -> int:
    table = args.table
    if args.markdown and not table:
        raise ValueError("--markdown needs --table")
    gpus = args.hardware or (list(TABLE_GPUS) if table else ["h100-nvlink"])
    names = args.model or (list(TABLE_MODELS) if table else ["llama2-70b"])
    tps = args.tp or (list(TABLE_TPS) if table else [8])
    seq_lens = args.seq_len or (list(TABLE_SEQ_LENS) if table else [4096])
    for option, values in (("--seq-len", seq_lens), ("--tp", tps), ("--batch", [args.batch]),
                           ("--max-chunks", [args.max_chunks])):
        for value in values:
            _check_int(option, value)
    rows = decision_table(gpus, {name: _model_config(name) for name in names}, tps, seq_lens, batch=args.batch,
                          min_gain=args.min_gain, max_chunks=args.max_chunks)
    impossible = [r["impossible"] for r in rows if r["impossible"]]
    if impossible and not table:  # the table marks such cells; a plan asked for by name is an error
        raise ValueError(impossible[0])
    if args.json:
        print(json.dumps([{**r, "plans": r["plans"] and [dict(p.as_dict(), seq_len=s)
                                                         for s, p in zip(seq_lens, r["plans"], strict=True)]}
                          for r in rows], indent=1))
    elif table:
        print(format_decision_table(rows, seq_lens, markdown=args.markdown))
    else:
        print(format_plans(rows, seq_lens))
    return 0
