"""The model's plain forward on CPU against Hugging Face's LlamaForCausalLM on the same weights, in one run.

llama-small (``iso_kernels.checkpoint.PRESETS``, random weights, fp32) at TP 1: ``model(tokens)``, every op on
its CPU kernel, and ``LlamaForCausalLM(tokens).logits`` (SDPA attention), alternated rep by rep so that both
see the same machine load, at 1 thread and at torch's default thread count. Reports the median and 20th
percentile ms of each, their ratios ours / HF (<= 1 means at least as fast) and the largest logit difference.
Runs on CPU only, offline.

    python bench/bench_model_cpu.py [--quick] [--tokens 512] [--reps 7] [--csv [PATH]]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds iso_kernels and triton_ops.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

PRESET = "llama-small"
DEFAULT_CSV = common.RESULTS / "model_cpu.csv"


def load_both(folder, tokens):
    import transformers

    from iso_kernels import checkpoint

    ours = checkpoint.load_checkpoint(folder)
    ours.setup_caches(1, tokens)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    return ours, theirs


def time_alternating(fns, reps):
    """(p50, p20, p80) ms of each zero-argument callable, run in turn ``reps`` times after one warm-up call
    each. On a shared machine p20 is the steadier figure: load only ever adds time."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    quintiles = {name: statistics.quantiles(t, n=5, method="inclusive") for name, t in times.items()}
    return {name: (statistics.median(t), quintiles[name][0], quintiles[name][3]) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 thread only, 3 reps")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--csv", nargs="?", const=DEFAULT_CSV, type=Path, help=f"append rows (default {DEFAULT_CSV})")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from iso_kernels import checkpoint

    default_threads = torch.get_num_threads()
    thread_counts = [1] if args.quick else sorted({1, default_threads})
    reps = 3 if args.quick else args.reps
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = checkpoint.save_random_checkpoint(checkpoint.preset_config(PRESET), Path(tmp) / PRESET)
        ours, theirs = load_both(folder, args.tokens)
        tokens = torch.randint(0, ours.args.vocab_size, (1, args.tokens))
        fns = {"iso_kernels": lambda: ours(tokens), "hf": lambda: theirs(tokens).logits}
        diff = (fns["iso_kernels"]().float() - fns["hf"]().float()).abs().max().item()
        rows = []
        print(f"{PRESET}, {args.tokens} tokens, fp32, {torch.__version__}; max |logits diff| {diff:.1e}")
        print(f"{'threads':>7}" + "".join(f"{h:>10}" for h in ("ours p50", "HF p50", "ours/HF", "ours p20",
                                                                 "HF p20", "ours/HF")))
        for threads in thread_counts:
            torch.set_num_threads(threads)
            found = time_alternating(fns, reps)
            for provider, (p50, p20, p80) in found.items():
                rows.append({"op": "model_forward", "provider": provider, "mode": f"{threads} threads",
                             "metric": "time", "unit": "ms", "x_name": "tokens", "x_value": args.tokens,
                             "p50": p50, "p20": p20, "p80": p80,
                             "config_json": json.dumps({"preset": PRESET, "threads": threads, "reps": reps,
                                                        "max_logit_diff": diff})})
            ours_ms, hf_ms = found["iso_kernels"], found["hf"]
            print(f"{threads:>7}{ours_ms[0]:>10.1f}{hf_ms[0]:>10.1f}{ours_ms[0] / hf_ms[0]:>10.2f}"
                  f"{ours_ms[1]:>10.1f}{hf_ms[1]:>10.1f}{ours_ms[1] / hf_ms[1]:>10.2f}")
        torch.set_num_threads(default_threads)
    if args.csv:
        common.append_rows(args.csv, rows)
        print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
