"""``python -m iso_kernels plan``: single plans, and the decision table (``--table``, bench/README.md's), each
cell ``planning.plan()``'s answer for one GPU x model x TP x length from the datasheet costs."""

import argparse
import json
from pathlib import Path

from .. import models
from ..hardware import HARDWARE_PRESETS
from ..planning import Plan, model_shape, plan
from ..planning.policy import MAX_AUTO_CHUNKS, MIN_GAIN
from ..planning.shapes import check_int
from . import comma_list, render_table

# The table's rows (models.PUBLISHED): the Llama-2 family the ISO paper's era served, and CodeLlama-34B for a
# GQA model between 13B and 70B.
TABLE_MODELS = ("llama2-7b", "llama2-13b", "codellama-34b", "llama2-70b")
# h100-nvlink stands for H100 and H200 alike: the same Hopper die (989 dense bf16 TFLOP/s) and NVLink 4; the
# H200's 141 GB (against the preset's 80 GiB) and faster HBM change only the table's "fits" column and
# the memory-bound terms a little. Each GPU's rows cover every collective implementation its preset models.
TABLE_GPUS = ("rtx4090-pcie4", "a800-nvlink", "a100-nvlink", "h100-nvlink")
TABLE_TPS = (2, 4, 8)
TABLE_SEQ_LENS = tuple(2**i for i in range(8, 16))  # 256 .. 32768
# --table 2026: the models served in 2026, dense and mixtures of experts, on the H100 the presets are fitted to,
# up to 64k tokens (TokenWeave measured them there).
TABLES = {
    "llama": (TABLE_GPUS, TABLE_MODELS, TABLE_TPS, TABLE_SEQ_LENS),
    "2026": (("h100-nvlink",), ("qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x22b"), (4, 8),
             tuple(2**i for i in range(10, 17))),
}
GIB = 2**30


def decision_table(gpus=TABLE_GPUS, configs=None, tps=TABLE_TPS, seq_lens=TABLE_SEQ_LENS, *, collectives=None,
                   batch=1, dtype_bytes=2, min_gain=MIN_GAIN, max_chunks=MAX_AUTO_CHUNKS) -> list:
    """One dict per (gpu, collective, model, tp) from the preset costs; ``configs``: name -> config (anything
    ``plan`` takes; default the TABLE_MODELS); ``collectives``: the links to plan with (default: every link
    each GPU's preset models). ``plans``: a Plan per length, or None with ``impossible`` = why when tp does not
    divide the model; ``fits_memory``: the bf16 weights / tp fit the GPU's memory (KV cache and activations
    ignored)."""
    configs = configs if configs is not None else {name: models.config(name) for name in TABLE_MODELS}
    rows = []
    for gpu in gpus:
        if gpu not in HARDWARE_PRESETS:
            raise ValueError(f"--hardware: unknown preset {gpu!r}; known: {', '.join(sorted(HARDWARE_PRESETS))}")
        hardware = HARDWARE_PRESETS[gpu]
        for collective in collectives or [link.collective for link in hardware.links]:
            hardware.link(collective)  # names the GPU's links where it has no such one
            for name, config in configs.items():
                rows += [_row(hardware, collective, name, model_shape(config, dtype_bytes), tp, seq_lens,
                              batch=batch, dtype_bytes=dtype_bytes, min_gain=min_gain, max_chunks=max_chunks)
                         for tp in tps]
    return rows


def _row(hardware, collective, name, shape, tp, seq_lens, **options):
    row = {"gpu": hardware.name, "collective": collective, "model": name, "tp": tp, "impossible": None,
           "plans": None, "fits_memory": shape.weight_bytes / tp / GIB <= hardware.memory_gib}
    try:
        row["plans"] = plan(shape, tp, list(seq_lens), hardware=hardware, collective=collective, **options)
    except ValueError as exc:
        if "divisible" not in str(exc):
            raise
        row["impossible"] = str(exc)
    return row


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
    cells = [["GPU", "all-reduce", "model", "TP", "fits"]
             + [f"{s // 1024}k" if s >= 1024 else str(s) for s in seq_lens]]
    for r in rows:
        body = [_cell(p) for p in r["plans"]] if r["plans"] is not None else \
            [f"impossible ({r['impossible']})"] + [""] * (len(seq_lens) - 1)
        cells.append([r["gpu"], r["collective"], r["model"], str(r["tp"]), "yes" if r["fits_memory"] else "NO"]
                     + body)
    return render_table(cells, markdown)


def format_plans(rows, seq_lens) -> str:
    """One line per (gpu, model, tp, length): the split and its predicted times, or why it is off."""
    lines = []
    for r in rows:
        for seq_len, p in zip(seq_lens, r["plans"] or [None] * len(seq_lens), strict=True):
            head = f"{r['model']} tp={r['tp']} seq_len={seq_len} {r['gpu']} {r['collective']}:"
            if p is None:
                lines.append(f"{head} impossible: {r['impossible']}")
            elif p.off:
                lines.append(f"{head} off, {p.reason} (serial {1e3 * p.predicted_serial_s:.1f} ms)")
            else:
                lines.append(f"{head} {len(p.split)} chunks, ends {list(p.ends)}; predicted serial "
                             f"{1e3 * p.predicted_serial_s:.1f} ms, iso {1e3 * p.predicted_iso_s:.1f} ms, "
                             f"gain {p.gain:.1%}")
    return "\n".join(lines)


# --- command line ---
def _model_config(name):
    """A registered model (``models``: published shapes and presets), a config.json or a checkpoint folder
    holding one."""
    if name in models.PUBLISHED or name in models.PRESETS:
        return models.config(name)
    path = Path(name)
    if path.is_dir():
        return models.read_config(path)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"--model {name}: invalid JSON ({exc})") from None
    known = ", ".join(sorted({**models.PUBLISHED, **models.PRESETS}))
    raise ValueError(f"--model {name!r} is neither a registered model ({known}), a config.json nor a checkpoint "
                     "folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=comma_list(str), help="comma-separated model names, config.json paths or "
                        f"checkpoint folders (default llama2-70b; with --table {','.join(TABLE_MODELS)})")
    parser.add_argument("--tp", type=comma_list(int), help="TP degrees (default 8; with --table 2,4,8)")
    parser.add_argument("--seq-len", type=comma_list(int),
                        help="prompt lengths (default 4096; with --table 256..32768)")
    parser.add_argument("--hardware", type=comma_list(str), help="hardware presets, " + ", ".join(HARDWARE_PRESETS)
                        + " (default h100-nvlink, which stands for H200 too; with --table all of them)")
    parser.add_argument("--collective", type=comma_list(str),
                        help="all-reduce implementations: nccl (torch.distributed, nccl-ext) and, where the preset "
                             "models it, multimem (default nccl; with --table every one each GPU models)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per prefill (default 1)")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN,
                        help=f"smallest predicted gain worth splitting for (default {MIN_GAIN})")
    parser.add_argument("--max-chunks", type=int, default=MAX_AUTO_CHUNKS,
                        help=f"most chunks (default {MAX_AUTO_CHUNKS})")
    parser.add_argument("--table", nargs="?", const="llama", choices=sorted(TABLES),
                        help="a decision table, every GPU x model x TP x length: llama (the default: four GPUs, "
                             "Llama-2 shapes) or 2026 (H100, Qwen3 dense and MoE, Mixtral)")
    parser.add_argument("--markdown", action="store_true", help="with --table: a Markdown table")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")


def run(args: argparse.Namespace) -> int:
    table = args.table
    if args.markdown and not table:
        raise ValueError("--markdown needs --table")
    table_gpus, table_models, table_tps, table_lens = TABLES[table] if table else (
        ["h100-nvlink"], ["llama2-70b"], [8], [4096])
    gpus, names = args.hardware or list(table_gpus), args.model or list(table_models)
    tps, seq_lens = args.tp or list(table_tps), args.seq_len or list(table_lens)
    for option, values in (("--seq-len", seq_lens), ("--tp", tps), ("--batch", [args.batch]),
                           ("--max-chunks", [args.max_chunks])):
        for value in values:
            check_int(option, value)
    if not 0 <= args.min_gain < 1:
        raise ValueError(f"--min-gain must be in [0, 1), got {args.min_gain}")
    collectives = args.collective or (None if table else ["nccl"])
    rows = decision_table(gpus, {name: _model_config(name) for name in names}, tps, seq_lens,
                          collectives=collectives, batch=args.batch, min_gain=args.min_gain,
                          max_chunks=args.max_chunks)
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
