"""Shared benchmark plumbing: GPU gate, do_bench wrapper, metric formulas, tidy CSV rows, plots."""

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")
CSV_COLUMNS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
               "config_json", "gpu_name", "torch", "triton", "cuda", "nccl", "commit", "timestamp"]


def bench_arguments(doc, *, quick_help, default_csv):
    """The options every op benchmark takes: ``--quick`` and ``--csv [FILE]`` (append rows; FILE defaults to
    ``default_csv``). Callers add their own options, then ``parse_args``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--csv", nargs="?", const=default_csv, type=Path, help=f"append rows (default {default_csv})")
    return parser


def require_gpu(n=1):
    """Exit 0 with a clear line when the machine lacks the GPUs a benchmark needs."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < n:
        print("benchmarks need a CUDA device" if n == 1 else f"this benchmark needs >= {n} CUDA devices")
        sys.exit(0)


def bench(fn, *, warmup=25, rep=100):
    """(p50, p20, p80) milliseconds from triton.testing.do_bench."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def bench_cpu(fn, *, reps=7):
    """(p50, p20, p80) wall milliseconds of ``fn`` over ``reps`` calls after one warm-up call: the CPU
    counterpart of ``bench`` (do_bench times with CUDA events)."""
    import statistics
    import time

    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[1], deciles[7]


def attention_tflops(batch, heads, q_len, kv_len, head_dim, ms, causal=True, q_start=None):
    """4*B*H*Nq*Nk*D, counting only visible (query, key) pairs when causal."""
    if causal:
        q_start = kv_len - q_len if q_start is None else q_start
        visible = sum(min(kv_len, q_start + i + 1) for i in range(q_len))
    else:
        visible = q_len * kv_len
    return 4 * batch * heads * visible * head_dim / (ms * 1e-3) / 1e12


def gemm_tflops(m, n, k, ms):
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def bus_bandwidth_gbps(nbytes, world_size, ms):
    return 2 * (world_size - 1) / world_size * nbytes / (ms * 1e-3) / 1e9


def environment():
    """GPU name and versions stamped on every CSV row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "",
        "nccl": nccl, "commit": commit,
    }


def append_rows(path, rows):
    """Append tidy rows (dicts with CSV_COLUMNS keys; env and timestamp filled in) to a CSV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        for row in rows:
            full = {**env, "timestamp": stamp, **row}
            if isinstance(full.get("config_json"), dict):
                full["config_json"] = json.dumps(full["config_json"], sort_keys=True)
            writer.writerow({key: full.get(key, "") for key in CSV_COLUMNS})


def plot_panels(rows, png_path, *, ylabel, title, styles=None):
    """One panel per ``mode``, one line per ``provider`` of p50 against x_value (log2 x axis), from in-memory
    tidy rows of a single metric. ``styles``: optional provider -> matplotlib format string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(4.5 * max(len(modes), 1), 3.8), squeeze=False,
                             sharey=True)
    # One panel even when no row names a mode (plt.subplots needs >= 1), so axes[0] may outnumber modes.
    for ax, mode in zip(axes[0], modes, strict=False):
        for provider in providers:
            points = sorted((float(r["x_value"]), float(r["p50"])) for r in rows
                            if r["mode"] == mode and r["provider"] == provider)
            if points:
                ax.plot(*zip(*points, strict=True), (styles or {}).get(provider, "o-"), label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(mode)
        ax.set_xlabel(rows[0]["x_name"])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(Path(png_path).parent, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def memory_gbps(nbytes, ms):
    """Achieved bandwidth of a memory-bound op: bytes read plus written over the time."""
    return nbytes / (ms * 1e-3) / 1e9


def bench_rates(op, mode, x_name, x_value, providers, config, *, rate, unit):
    """Time each provider (name -> zero-argument callable) of one shape. Returns the tidy rows (time, and
    ``rate(ms)`` in ``unit``: a throughput) and the p50 rate per provider."""
    rows, rates = [], {}
    for provider, fn in providers.items():
        fn()  # compiles (and autotunes) outside the timing
        p50, p20, p80 = bench(fn)
        rates[provider] = rate(p50)
        base = {"op": op, "provider": provider, "mode": mode, "x_name": x_name, "x_value": x_value,
                "config_json": config}
        rows.append({**base, "metric": "time", "unit": "ms", "p50": p50, "p20": p20, "p80": p80})
        # the faster quantile of time is the higher one of throughput
        rows.append({**base, "metric": unit, "unit": unit, "p50": rates[provider], "p20": rate(p80),
                     "p80": rate(p20)})
    return rows, rates


def bench_memory_bound(op, mode, x_name, x_value, providers, nbytes, config):
    """``bench_rates`` in GB/s from ``nbytes``: the tidy rows and the p50 GB/s per provider."""
    return bench_rates(op, mode, x_name, x_value, providers, config, rate=lambda ms: memory_gbps(nbytes, ms),
                       unit="GB/s")


def save_rows(csv_path, rows, *, metric, ylabel, title):
    """Append ``rows`` to ``csv_path`` and plot their ``metric`` beside it (same name, .png)."""
    append_rows(csv_path, rows)
    png = Path(csv_path).with_suffix(".png")
    plot_panels([r for r in rows if r["metric"] == metric], png, ylabel=ylabel, title=title)
    print(f"rows appended to {csv_path}; plot {png}")
