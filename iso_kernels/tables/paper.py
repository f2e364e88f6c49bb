"""``python -m iso_kernels simulate``: serial vs ISO prefill of one request in the paper's settings, from the
datasheet cost model (no GPU).

    python -m iso_kernels simulate --markdown
    python -m iso_kernels simulate --gpu rtx4090-pcie4 --tp 8 --seq-len 4096 --bandwidth 10 --chunks 2,3,auto

Every number comes from ``planning``'s event simulation with ``LayerCosts.from_datasheet``; "auto" is the
policy's decision (``planning.decide``). The assumptions behind the presets are listed in
``hardware.HARDWARE_PRESETS``, docs/cost-model.md and bench/README.md.
"""

import argparse
import dataclasses
import json

from .. import models
from ..hardware import HARDWARE_PRESETS
from ..planning import LayerCosts, Policy, decide, model_shape, predict
from ..planning.shapes import check_int
from ..split import ChunkSplit
from . import render_table

# The models the table offers (models.PUBLISHED): the paper's 30B and 70B classes, and Llama 3's sizes.
PAPER_MODELS = ("llama2-70b", "llama-30b", "llama3-8b", "llama3-70b")

# The abstract of arXiv 2409.11155: prefill time cut by ~35% on RTX 4090 and ~15% on A800, for 30B and 70B
# models; which TP degree, model and length gave each number is not stated.
PAPER_REDUCTION = {"rtx4090-pcie4": 0.35, "a800-nvlink": 0.15}
DEFAULT_GPUS = "rtx4090-pcie4,a800-nvlink"
DEFAULT_MODELS = "llama-30b,llama2-70b"
DEFAULT_TPS = "2,4,8"
DEFAULT_SEQ_LENS = "1024,2048,4096,8192"
GIB = 2**30


def simulate_table(gpus, model_names, tps, seq_lens, *, efficiency=None, bandwidth_gbps=None, chunks=(2, "auto"),
                   batch=1, max_chunks=4, granularity=16) -> list:
    """One dict per (gpu, model, tp, seq_len). ``chunks``: ints (even splits into that many chunks) and/or
    ``"auto"`` (the policy's decision on the ``granularity`` grid). Reductions are fractions of the serial
    time; ``bound_reduction`` =
    1 - max(C, M) / (C + M) with the serial compute C and communication M, which no chunking can beat
    (chunking only adds fixed costs and latencies)."""
    check_int("batch", batch)
    policy = Policy(max_chunks=max_chunks, granularity=granularity)
    for name, value in (("efficiency", efficiency), ("bandwidth_gbps", bandwidth_gbps)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    rows = []
    for gpu in gpus:
        if gpu not in HARDWARE_PRESETS:
            raise ValueError(f"gpus: unknown preset {gpu!r}; known: {', '.join(sorted(HARDWARE_PRESETS))}")
        hardware = HARDWARE_PRESETS[gpu]
        if efficiency is not None:
            hardware = dataclasses.replace(hardware, gemm_efficiency=efficiency, attention_efficiency=efficiency)
        if bandwidth_gbps is not None:
            hardware = hardware.with_link(bus_gbps=bandwidth_gbps)
        for model in model_names:
            shape = model_shape(models.config(model))
            for tp in tps:
                costs = LayerCosts.from_datasheet(shape, hardware, tp)
                weights = shape.weight_bytes / tp / GIB
                for seq_len in seq_lens:
                    serial = predict(costs, shape.prefill(batch), ChunkSplit((seq_len,)))
                    c, m = serial.compute_s, serial.comm_s
                    row = {"gpu": gpu, "model": model, "tp": tp, "seq_len": seq_len, "batch": batch,
                           "efficiency": hardware.gemm_efficiency,
                           "bus_gbps": max(hardware.link("nccl").all_reduce.regimes)[1],
                           "weights_gib_per_gpu": round(weights, 1),
                           "fits_memory": weights <= hardware.memory_gib,
                           "compute_ms": 1e3 * c, "comm_ms": 1e3 * m, "serial_ms": 1e3 * serial.serial_s}
                    for spec in chunks:
                        if spec == "auto":
                            split = decide(costs, shape.prefill(batch), seq_len, policy).split
                            name = "solver"
                            row["solver_boundaries"] = list(split.ends)
                        else:
                            split, name = ChunkSplit.even(seq_len, spec), f"{spec}even"
                        p = predict(costs, shape.prefill(batch), split)
                        row[f"iso_{name}_ms"] = 1e3 * p.iso_s
                        row[f"reduction_{name}"] = p.reduction
                    row["bound_reduction"] = 1 - max(c, m) / (c + m) if c + m > 0 else 0.0
                    row["paper_reduction"] = PAPER_REDUCTION.get(gpu)
                    rows.append(row)
    return rows


def _columns(chunks):
    """(header, formatter) pairs, in the order the table prints them."""
    def ms(key):
        return lambda r: f"{r[key]:.0f}"

    def pct(key):
        return lambda r: "–" if r[key] is None else f"{100 * r[key]:.1f}%"

    names = [("solver", "solver") if s == "auto" else (f"{s}even", f"{s} even") for s in chunks]
    cols = [("GPU", lambda r: r["gpu"]), ("model", lambda r: r["model"]), ("TP", lambda r: str(r["tp"])),
            ("S", lambda r: str(r["seq_len"])), ("compute ms", ms("compute_ms")), ("comm ms", ms("comm_ms")),
            ("serial ms", ms("serial_ms"))]
    for key, label in names:
        cols.append((f"ISO {label} ms", ms(f"iso_{key}_ms")))
        if key == "solver":
            cols.append(("chunks", lambda r: str(len(r["solver_boundaries"]))))
    cols += [(f"R {label}", pct(f"reduction_{key}")) for key, label in names]
    cols += [("R bound", pct("bound_reduction")), ("paper", lambda r: "–" if r["paper_reduction"] is None
                                                    else f"~{100 * r['paper_reduction']:.0f}%"),
             ("fits", lambda r: "yes" if r["fits_memory"] else "NO")]
    return cols


def format_table(rows, chunks=(2, "auto"), markdown=False) -> str:
    cols = _columns(chunks)
    return render_table([[header for header, _ in cols]] + [[fmt(r) for _, fmt in cols] for r in rows], markdown)


# --- command line ---
def _names(table, what):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        for name in names:
            if name not in table:
                known = ", ".join(sorted(table))
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; known: {known}")
        return names
    return parse


def _ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _chunk_specs(text):
    return [item.strip() if item.strip() == "auto" else _ints(item)[0] for item in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", type=_names(HARDWARE_PRESETS, "gpu"), default=DEFAULT_GPUS,
                        help=f"hardware presets, comma-separated (default {DEFAULT_GPUS})")
    parser.add_argument("--model", type=_names(models.PUBLISHED, "model"), default=DEFAULT_MODELS,
                        help=f"model presets, comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--tp", type=_ints, default=DEFAULT_TPS, help=f"TP degrees (default {DEFAULT_TPS})")
    parser.add_argument("--seq-len", type=_ints, default=DEFAULT_SEQ_LENS,
                        help=f"prompt lengths (default {DEFAULT_SEQ_LENS})")
    parser.add_argument("--batch", type=int, default=1, help="sequences per prefill (default 1)")
    parser.add_argument("--efficiency", type=float,
                        help="override the fraction of peak FLOP/s the GEMMs and attention reach")
    parser.add_argument("--bandwidth", type=float, help="override the all-reduce bus bandwidth, GB/s")
    parser.add_argument("--chunks", type=_chunk_specs, default="2,auto",
                        help="splits to show: N = even split into N chunks (2 = the paper), "
                             "auto = the policy's split (default 2,auto)")
    parser.add_argument("--max-chunks", type=int, default=4, help="solver's largest chunk count (default 4)")
    parser.add_argument("--granularity", type=int, default=16, help="solver's boundary step in tokens")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
    rows = simulate_table(args.gpu, args.model, args.tp, args.seq_len, efficiency=args.efficiency,
                          bandwidth_gbps=args.bandwidth, chunks=args.chunks, batch=args.batch,
                          max_chunks=args.max_chunks, granularity=args.granularity)
    print(format_table(rows, args.chunks, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
