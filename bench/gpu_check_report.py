"""The report steps of bench/gpu_check.sh.

    python bench/gpu_check_report.py info               # GPU state and clocks (nvidia-smi), build, versions
    python bench/gpu_check_report.py summary OUTDIR     # step outcomes ($GPU_CHECK_STEPS), headline ratios, clocks

``info`` logs nvidia-smi's view first (name, driver, SM and memory clocks current and max, power, temperature,
persistence, MIG and ECC modes, then ``-q -d CLOCK,PERFORMANCE`` with the throttle reasons), before importing
torch, so that a broken install still leaves the GPU's state in the log. ``summary`` packs OUTDIR's PNGs into
plots.tar (the device tool brings back 8 files), prints and writes OUTDIR/summary.txt, whose second line is
``gpu: none ...`` when no CUDA device is visible (gpu_check.sh then exits 2), and ends with the clocks again.
Without nvidia-smi (a CPU machine) each says so in one line.
"""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

GPU_FIELDS = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,"
              "power.limit,temperature.gpu,persistence_mode,mig.mode.current,ecc.mode.current,memory.used,"
              "memory.total,utilization.gpu")
CLOCK_FIELDS = "pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,temperature.gpu,utilization.gpu"
NVIDIA_SMI_TIMEOUT_S = 4


def nvidia_smi(*args):
    """nvidia-smi's output for ``args``, or one line saying why there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi: not on PATH (no NVIDIA driver here): no GPU state or clocks to log"
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"nvidia-smi {' '.join(args)}: no answer within {NVIDIA_SMI_TIMEOUT_S} s"
    except OSError as exc:
        return f"nvidia-smi: {exc}"
    text = (done.stdout + done.stderr).strip()
    return text if done.returncode == 0 else f"nvidia-smi {' '.join(args)}: exit {done.returncode}: {text}"


def gpu_state():
    """The GPU's state as nvidia-smi reports it (several commands, or one line without nvidia-smi)."""
    first = nvidia_smi("--query-gpu=" + GPU_FIELDS, "--format=csv")
    if first.startswith("nvidia-smi: not on PATH"):
        return first
    return "\n".join([first, nvidia_smi("-q", "-d", "CLOCK,PERFORMANCE")])


def clocks():
    """The clocks, power and temperature now: one CSV header and one row per GPU (or why there are none)."""
    return nvidia_smi("--query-gpu=" + CLOCK_FIELDS, "--format=csv")


def gpu_name():
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA device)"


def info():
    print(gpu_state(), flush=True)
    import torch
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
    """The median p50 of the matching rows; None when there are none (a step cut short)."""
    values = [float(r["p50"]) for r in matching(rows, **match)]
    return statistics.median(values) if values else None


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


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
        at = {"metric": "tflops", "mode": mode, "x_value": seq_len}
        ours, sdpa = p50(attention, provider="triton", **at), p50(attention, provider="sdpa", **at)
        lines.append(f"attention {mode:<7} S={seq_len:<6} triton {_fmt(ours, '6.1f'):>6} TFLOP/s   "
                     f"vs sdpa {_ratio(ours, sdpa)}x")
    gemm = rows(out, "gemm_signal.csv")
    for shape, m in sorted({(r["mode"], int(r["x_value"])) for r in gemm}):
        mm, ours, signal = (p50(gemm, metric="TFLOP/s", mode=shape, x_value=m, provider=p)
                            for p in ("torch.matmul", "gemm", "gemm_signal"))
        lines.append(f"gemm {shape:<15} M={m:<6} gemm_signal {_fmt(signal, '6.1f'):>6} TFLOP/s   vs cuBLAS: "
                     f"gemm {_ratio(ours, mm)}x, gemm_signal {_ratio(signal, mm)}x")
    iso = rows(out, "iso_prefill.csv")
    for link, seq_len in sorted({(r["mode"], int(r["x_value"])) for r in iso}):
        at = {"metric": "ms", "mode": link, "x_value": seq_len}
        # bench_iso_prefill writes each variant's rows when it is measured and serial/no-comm after both: a
        # run cut short leaves some of them.
        parts = [f"{provider} {_fmt(p50(iso, provider=provider, **at))} ms" for provider in ("serial", "no-comm")
                 if matching(iso, provider=provider, **at)]
        for provider in ("iso-auto", "iso-2even"):
            measured = matching(iso, provider=provider, **at)
            if not measured:
                parts.append(f"{provider} not measured")
                continue
            chunks = json.loads(measured[0]["config_json"])["chunks"]
            reduction = p50(iso, provider=provider, metric="reduction", mode=link, x_value=seq_len)
            efficiency = p50(iso, provider=provider, metric="overlap_efficiency", mode=link, x_value=seq_len)
            parts.append(f"{provider} {_fmt(p50(iso, provider=provider, **at))} ms ({chunks} chunks) "
                         f"R {_fmt(None if reduction is None else 100 * reduction, '.1f')}% "
                         f"eff {_fmt(efficiency)}")
        notes = {json.loads(r["config_json"]).get("note") for r in matching(iso, mode=link, x_value=seq_len)}
        parts += sorted(note for note in notes if note)
        lines.append(f"iso {link:<10} S={seq_len:<5} " + "; ".join(parts))
    if not (attention or gemm or iso):
        lines.append("no benchmark rows were written")
    lines += ["clocks at the end (nvidia-smi):", *clocks().splitlines()]
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    if shutil.which("nvidia-smi"):  # the throttle reasons now, to the log only; the summary stays the last lines
        print(nvidia_smi("-q", "-d", "PERFORMANCE"))
    print(text, end="")


if __name__ == "__main__":
    if sys.argv[1:] == ["info"]:
        info()
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        pack_plots(Path(sys.argv[2]))
        summary(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
