"""The model's plain forward on CPU against Hugging Face's LlamaForCausalLM on the same weights, in one run.

llama-small (``iso_kernels.models.PRESETS``, random weights, fp32) at TP 1: ``model(tokens)``, every op on
its CPU kernel, and ``LlamaForCausalLM(tokens).logits`` (SDPA attention), alternated rep by rep so that both
see the same machine load, at 1 thread and at torch's default thread count. Reports the median wall and
process CPU ms of each, their ratios ours / HF (<= 1 means at least as fast) and the largest logit difference.
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


# Wall time, and CPU time of the whole process: on a shared machine waiting for a core adds wall time but
# not CPU time, so at 1 thread the CPU time is the steadier measure of the work each forward does.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_alternating(fns, reps):
    """{clock: {name: (p50, p20, p80) ms}} of each zero-argument callable, run in turn ``reps`` times after
    one warm-up call each."""
    times = {clock: {name: [] for name in fns} for clock in CLOCKS}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            starts = {clock: read() for clock, read in CLOCKS.items()}
            fn()
            for clock, read in CLOCKS.items():
                times[clock][name].append((read() - starts[clock]) * 1e3)
    found = {}
    for clock, per_name in times.items():
        found[clock] = {}
        for name, t in per_name.items():
            quintiles = statistics.quantiles(t, n=5, method="inclusive")
            found[clock][name] = (statistics.median(t), quintiles[0], quintiles[3])
    return found


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
        print(f"{'threads':>7}" + "".join(f"{h:>11}" for h in ("ours wall", "HF wall", "ours/HF", "ours CPU",
                                                                 "HF CPU", "ours/HF")) + "  (p50 ms)")
        for threads in thread_counts:
            torch.set_num_threads(threads)
            found = time_alternating(fns, reps)
            line = f"{threads:>7}"
            for clock, per_name in found.items():
                for provider, (p50, p20, p80) in per_name.items():
                    rows.append({"op": "model_forward", "provider": provider, "mode": f"{threads} threads",
                                 "metric": f"{clock} time", "unit": "ms", "x_name": "tokens",
                                 "x_value": args.tokens, "p50": p50, "p20": p20, "p80": p80,
                                 "config_json": json.dumps({"preset": PRESET, "threads": threads, "reps": reps,
                                                            "max_logit_diff": diff})})
                ours_ms, hf_ms = per_name["iso_kernels"][0], per_name["hf"][0]
                line += f"{ours_ms:>11.1f}{hf_ms:>11.1f}{ours_ms / hf_ms:>11.2f}"
            print(line)
        torch.set_num_threads(default_threads)
    if args.csv:
        common.append_rows(args.csv, rows)
        print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
