"""``python -m iso_kernels`` / ``iso-kernels``: ``prefill`` (serial vs ISO on a TP group), ``simulate`` and ``plan``
(``iso_kernels.tables``)."""

import argparse
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import torch

from . import comm, engine, models
from .launch import RankError, Stopped, handle_stop_signals, one_line_warnings

DESCRIPTION = """ISO: overlap tensor-parallel all-reduce with computation inside one sequence.

prefill   run serial and ISO prefill on the same prompt over a TP group, check they agree, report timings
simulate  predict serial vs ISO prefill on the paper's hardware (RTX 4090 PCIe, A800 NVLink) from datasheets
plan      whether and where to split a prompt, from the cost model (--table: the decision table)
"""


def _prefill_arguments(parser):
    defaults = engine.PrefillConfig()
    parser.add_argument("--model", default=defaults.model,
                        help=f"preset ({', '.join(models.PRESETS)}; random weights made locally) or a Hugging "
                             "Face checkpoint folder (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=defaults.tp, help="tensor-parallel ranks, launched here")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="prompt length (random tokens)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="equal-length prompts")
    parser.add_argument("--mode", default=defaults.mode, choices=["serial", "iso", "both"])
    parser.add_argument("--split", default="auto",
                        help="auto (the calibrated cost model), a token index, or a fraction for chunk 1")
    parser.add_argument("--chunks", default="auto", help="auto or a number of chunks")
    parser.add_argument("--link", default=None,
                        help="emulated link: a preset (pcie4, a800-nvlink, a100-nvlink, h100-nvlink) or ratio:R "
                             "(all-reduce time = R x compute time); default none")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--tokens", help="JSON file: a list of token ids, or a list of lists (one prompt each; "
                                         "lists of different lengths run as one packed serving batch)")
    parser.add_argument("--prompt-lens", metavar="N,N,...",
                        help="a serving batch of random prompts of these lengths, packed into one stream")
    parser.add_argument("--cached-prefix", type=int, default=0, metavar="N",
                        help="every prompt continues a shared prefix of N random tokens whose K/V are cached "
                             "before the timed prefill (a packed serving batch)")
    parser.add_argument("--block-size", type=int, default=defaults.block_size,
                        help="tokens per KV cache page of a serving batch (16..256, a power of two)")
    parser.add_argument("--generate", type=int, default=defaults.generate, help="greedy tokens after prefill")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs per schedule")
    parser.add_argument("--comm-backend", default=defaults.comm_backend, choices=["auto", "torch", "nccl-ext"])
    parser.add_argument("--row-signal", type=int, default=0, metavar="ROWS",
                        help="GPU: all-reduce each group of >= ROWS rows (<= 8 per block) once it is stored")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure the cost model's constants again instead of using the cached ones")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--save-logits", metavar="FILE", help="torch.save {mode: fp32 logits (batch, seq, vocab)}")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--trace", metavar="FILE", help="Chrome trace JSON of both schedules, every rank")
    parser.add_argument("--plot", metavar="FILE", help="PNG Gantt chart of both schedules")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds before ranks are killed")


# Options that need an optional extra: option -> (extra, the module it provides).
OPTION_EXTRAS = {"plot": ("plot", "matplotlib")}


def _check_extras(args):
    """Fail before any work when a chosen option's extra is not installed."""
    for option, (extra, module) in OPTION_EXTRAS.items():
        if getattr(args, option, None) and importlib.util.find_spec(module) is None:
            raise ValueError(f"--{option} needs {module}: pip install 'iso-kernels[{extra}]'")


# --- the command line's strings as PrefillConfig's types ---
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(text):
    """``auto`` -> None (the device's default), else the named floating dtype."""
    if text == "auto":
        return None
    if text not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} or auto, got {text!r}")
    return DTYPES[text]


def parse_chunks(text):
    """``auto`` -> None (the planner's choice), else a number of chunks."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--chunks must be auto or an integer, got {text!r}") from None


def parse_split(text):
    """``auto`` -> None (the planner's choice), a token index (int) or a fraction of the prompt (float)."""
    if text == "auto":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"--split must be auto, a token index or a fraction, got {text!r}")


def parse_prompt_lens(text):
    """``1024,77,3000`` -> [1024, 77, 3000]; None stays None."""
    if text is None:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-lens must be comma-separated integers, got {text!r}") from None


def load_tokens(path):
    """Token ids from a JSON list (one prompt) or a list of lists: (batch, seq_len) when the lists have one
    length, else a list of 1-D tensors (a serving batch)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--tokens {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"--tokens {path}: invalid JSON ({exc})") from None
    rows = data if isinstance(data, list) and data and isinstance(data[0], list) else [data]
    if not all(isinstance(r, list) and r for r in rows):
        raise ValueError(f"--tokens {path}: need a non-empty list of ids or a list of non-empty lists of ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r):
        raise ValueError(f"--tokens {path}: token ids must be integers")
    if any(len(r) != len(rows[0]) for r in rows):
        return [torch.tensor(r, dtype=torch.long) for r in rows]
    return torch.tensor(rows, dtype=torch.long)


def _config(args):
    tokens = load_tokens(args.tokens) if args.tokens else None
    ragged = isinstance(tokens, list)
    return engine.PrefillConfig(
        model=args.model, tp=args.tp, seq_len=args.seq_len, batch=args.batch, mode=args.mode,
        split=parse_split(args.split), chunks=parse_chunks(args.chunks), link=comm.parse_link(args.link),
        dtype=parse_dtype(args.dtype), device=None if args.device == "auto" else args.device,
        tokens=None if ragged else tokens, prompts=tokens if ragged else None,
        prompt_lens=parse_prompt_lens(args.prompt_lens), cached_prefix=args.cached_prefix,
        block_size=args.block_size, generate=args.generate, warmup=args.warmup,
        repeats=args.repeats, comm_backend=args.comm_backend, row_signal=args.row_signal, seed=args.seed,
        trace=bool(args.trace or args.plot), save_logits=bool(args.save_logits), recalibrate=args.recalibrate,
        timeout_s=args.timeout)


def _prefill(args):
    report = engine.run(_config(args))
    if report is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(report.format())
    if args.save_logits:
        torch.save(report.logits, args.save_logits)
    if report.lanes:
        from . import timeline

        if args.trace:
            timeline.write_chrome_trace(args.trace, report.lanes)
        if args.plot:
            timeline.plot_gantt(args.plot, report.lanes,
                                title=f"serial vs iso prefill, {report.seq_len} tokens, tp={report.tp}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.agree is not False else 1


def _table(module, sub, command, summary):
    """The subcommand ``command`` of ``iso_kernels.tables.<module>``, imported only by the CLI (numpy only)."""
    table = importlib.import_module(f"iso_kernels.tables.{module}")
    table.add_arguments(sub.add_parser(command, help=summary))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="iso-kernels", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _prefill_arguments(sub.add_parser("prefill", help="serial vs ISO prefill on a TP group"))
    tables = {"simulate": _table("paper", sub, "simulate", "predict ISO on the paper's hardware"),
              "plan": _table("decision", sub, "plan", "whether and where to split a prompt")}
    args = parser.parse_args(argv)
    one_line_warnings()
    try:
        with _stop_signals():
            if args.command in tables:
                return tables[args.command].run(args)
            _check_extras(args)
            return _prefill(args)
    except (KeyboardInterrupt, Stopped) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print("interrupted" if signum == signal.SIGINT else f"terminated by {signum.name}", file=sys.stderr)
        return 128 + signum
    except RankError as exc:
        print(f"error: {exc.first_line()}", file=sys.stderr)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


def _under_torchrun():
    return "TORCHELASTIC_RUN_ID" in os.environ


def _raise_stopped(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signum)


def _stop_signals():
    """Stop signals end the job with one line and status 128 + signal. A rank under torchrun keeps the
    default actions instead: torchrun stops its ranks with SIGTERM, and the default action ends a rank at
    once, even one blocked in a collective whose peer is gone (a Python handler would run only after it)."""
    return handle_stop_signals(signal.SIG_DFL if _under_torchrun() else _raise_stopped)


if __name__ == "__main__":
    sys.exit(main())
