"""The report steps of bench/gpu_check.sh.

    python bench/gpu_check_report.py info               # build, versions, GPU
    python bench/gpu_check_report.py summary OUTDIR     # step outcomes ($GPU_CHECK_STEPS) and headline ratios

``summary`` packs OUTDIR's PNGs into plots.tar (the device tool brings back 8 files) and prints and writes
OUTDIR/summary.txt, whose second line is ``gpu: none ...`` when no CUDA device is visible (gpu_check.sh then
exits 2).
"""

import csv
import json
import os
import statistics
import sys
import tarfile
from pathlib import Path

import torch


def gpu_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA device)"


def info():
    import triton

    import iso_kernels

    print(json.dumps(iso_kernels.build_info(), indent=1))
    print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
    print("gpu", gpu_name())


def rows(out, name):
    path = out / name
    return list(csv.DictReader(path.open())) if path.exists() else []


def matching(rows, **match):
    return [r for r in rows if all(r[k] == str(v) for k, v in match.items())]


def p50(rows, **match):
    return statistics.median(float(r["p50"]) for r in matching(rows, **match))


def pack_plots(out):
    plots = sorted(out.glob("*.png"))
    if plots:
        with tarfile.open(out / "plots.tar", "w") as tar:
            for plot in plots:
                tar.add(plot, arcname=plot.name)
        for plot in plots:
            plot.unlink()


def summary(out):
    lines = ["=" * 30 + " gpu_check summary " + "=" * 30, f"gpu: {gpu_name()}"]
    for line in os.environ.get("GPU_CHECK_STEPS", "").strip().splitlines():
        name, status, seconds, limit = line.split("\t")
        lines.append(f"  {name:<24} {status:<26} {seconds:>4} s of {limit:>4} s")

    attention = rows(out, "chunked_attention.csv")
    for mode, seq_len in sorted({(r["mode"], int(r["x_value"])) for r in attention}):
        at = dict(metric="tflops", mode=mode, x_value=seq_len)
        ours, sdpa = p50(attention, provider="triton", **at), p50(attention, provider="sdpa", **at)
        lines.append(f"attention {mode:<7} S={seq_len:<6} triton {ours:6.1f} TFLOP/s   "
                     f"vs sdpa {ours / sdpa:.2f}x")
    gemm = rows(out, "gemm_signal.csv")
    for shape, m in sorted({(r["mode"], int(r["x_value"])) for r in gemm}):
        mm, ours, signal = (p50(gemm, metric="TFLOP/s", mode=shape, x_value=m, provider=p)
                            for p in ("torch.matmul", "gemm", "gemm_signal"))
        lines.append(f"gemm {shape:<15} M={m:<6} gemm_signal {signal:6.1f} TFLOP/s   vs cuBLAS: "
                     f"gemm {ours / mm:.2f}x, gemm_signal {signal / mm:.2f}x")
    iso = rows(out, "iso_prefill.csv")
    for link, seq_len in sorted({(r["mode"], int(r["x_value"])) for r in iso}):
        at = dict(metric="ms", mode=link, x_value=seq_len)
        parts = [f"{provider} {p50(iso, provider=provider, **at):.2f} ms" for provider in ("serial", "no-comm")]
        for provider in ("iso-auto", "iso-2even"):
            chunks = json.loads(matching(iso, provider=provider, **at)[0]["config_json"])["chunks"]
            reduction = p50(iso, provider=provider, metric="reduction", mode=link, x_value=seq_len)
            efficiency = p50(iso, provider=provider, metric="overlap_efficiency", mode=link, x_value=seq_len)
            parts.append(f"{provider} {p50(iso, provider=provider, **at):.2f} ms ({chunks} chunks) "
                         f"R {100 * reduction:.1f}% eff {efficiency:.2f}")
        lines.append(f"iso {link:<10} S={seq_len:<5} " + "; ".join(parts))
    if not (attention or gemm or iso):
        lines.append("no benchmark rows were written")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    if sys.argv[1:] == ["info"]:
        info()
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        pack_plots(Path(sys.argv[2]))
        summary(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
