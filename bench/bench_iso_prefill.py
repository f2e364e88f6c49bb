"""Serial vs ISO prefill over prompt lengths and links, measured end to end by ``engine.run``.

Lines per link: ``serial``; ``iso-auto`` (the calibrated solver's split, up to 4 chunks); ``iso-2even`` (the
paper's two chunks split at S/2); ``no-comm`` (the unsplit prefill without any all-reduce: the floor of any
schedule that computes no less than the unsplit one; chunks can compute less, see ``compute_busy``). Each ISO
variant is one ``engine.run`` with mode "both": its reduction (1 - iso / serial) and overlap efficiency
((serial - iso) / (serial - bound), bound = max(compute + tail, comm + head)) compare it with the serial runs
interleaved with it. The ``serial`` line pools the serial runs of both calls. Each variant's CSV rows are
appended as soon as it is measured, the pooled ``serial`` and ``no-comm`` rows once both are, so a run cut
short keeps what it measured. An emulated link moves no data: its time costs the compute no SMs or memory
bandwidth, so its overlap is an upper bound; its printed lines and its rows' config_json ``note`` say so.

Where it runs:
  CPU        2 ranks over gloo, emulated link ratio:R (all-reduce time = R x the no-comm prefill), fp32
  one GPU    --tp 1, the emulated link's time spent on a dedicated comm stream, bf16
  GPUs       NCCL over every visible GPU (a power of two), no emulated link and with link presets added

    python bench/bench_iso_prefill.py [--quick] [--device auto|cpu|cuda] [--csv PATH] [--links L1,L2]
                                      [--seq-lens 256,512] [--model NAME] [--tp N] [--repeats N] [--warmup N]
"""

import argparse
import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import common
from iso_kernels import cli, comm, engine
from iso_kernels.launch import RankError
from iso_kernels.metrics import quantiles
from iso_kernels.report import PrefillReport

# Per device kind: model, prompt lengths, quick lengths, links, quick links. CPU lengths stop at 1024 because
# a 2-rank llama-small prefill of 1024 tokens already takes 1.2-1.8 s per serial run on 2 cores. On GPUs,
# llama-1b: llama-small's blocks (hidden 512) are too small to keep an H100 busy, so launches rather than the
# overlap would dominate. One GPU's quick run (bench/gpu_check.sh) keeps one link, the paper's RTX 4090 PCIe
# link: at 4096 tokens its all-reduce takes about twice a block's compute, so there is much to hide.
DEFAULTS = {
    "cpu": {"model": "llama-small", "seq_lens": [256, 512, 1024], "quick": [512],
            "links": ["ratio:0.5", "ratio:1.0"], "quick_links": ["ratio:0.5", "ratio:1.0"]},
    "cuda": {"model": "llama-1b", "seq_lens": [1024, 2048, 4096], "quick": [4096],
             "links": ["ratio:0.5", "ratio:1.0", "pcie4"], "quick_links": ["pcie4"]},
    "multigpu": {"model": "llama-1b", "seq_lens": [1024, 2048, 4096], "quick": [4096],
                 "links": ["none", "pcie4", "a800-nvlink"], "quick_links": ["none", "pcie4", "a800-nvlink"]},
}
# provider -> (chunks, split) handed to PrefillConfig
VARIANTS = {"iso-auto": (None, None), "iso-2even": (2, 0.5)}
PROVIDERS = ("serial", *VARIANTS, "no-comm")
# Report entries (PrefillReport.to_json's keys) kept in each ISO row's config_json.
# What an emulated link's numbers are: its all-reduce time is spent waiting on a comm stream (one GPU) or
# sleeping (CPU), moving no data, so it takes no SMs or memory bandwidth from the compute it overlaps.
EMULATED_NOTE = "emulated link: no SM or memory contention; an upper bound"
REPORT_KEYS = ("link", "chunks", "bounds", "split", "serial_ms", "compute_only_ms", "compute_ms", "comm_ms",
               "bound_ms", "head_ms", "tail_ms", "agree", "max_abs_diff")


@dataclass
class Measured:
    """One ISO variant's engine report, with what the bench adds: the machine's load average before and
    after, and each schedule's compute-stream busy time."""

    report: PrefillReport
    load_avg: list
    compute_busy_ms: dict

    def config_entries(self):
        entries = {key: value for key, value in self.report.to_json().items() if key in REPORT_KEYS}
        return {**entries, "load_avg": self.load_avg, "compute_busy_ms": self.compute_busy_ms}


def device_defaults(device, gpu_count):
    """(settings from DEFAULTS, tp): 2 ranks on CPU, every GPU (a power of two, at most 8) on CUDA."""
    if device == "cpu":
        return DEFAULTS["cpu"], 2
    if gpu_count < 2:
        return DEFAULTS["cuda"], 1
    return DEFAULTS["multigpu"], min(8, 1 << (gpu_count.bit_length() - 1))


def points(args, settings):
    """(prompt lengths, links) to measure: the command line's, else the device kind's (quick) defaults."""
    seq_lens = ([int(s) for s in args.seq_lens.split(",")] if args.seq_lens
                else settings["quick"] if args.quick else settings["seq_lens"])
    links = args.links.split(",") if args.links else settings["quick_links" if args.quick else "links"]
    return seq_lens, links


def prediction_error(predicted_ms, measured_ms):
    """Signed error of the cost model's prediction in percent of the measurement."""
    return 100.0 * (predicted_ms - measured_ms) / measured_ms


def compute_busy(lanes):
    """{schedule: compute-stream busy ms of its last timed run, the slowest rank's}, from a report's lanes.

    The chunked schedule can compute less than the unsplit one: the CPU attention reference scores every
    (query, key) pair and masks, so chunks skip part of the masked triangle. Then ISO beats the engine's
    bound, which takes its compute time from the unsplit serial runs, and the overlap efficiency exceeds 1.
    """
    busy = {}
    for (schedule, _rank), rows in lanes.items():
        ms = sum(r["end_ms"] - r["start_ms"] for r in rows if r["stream"] == "compute")
        busy[schedule] = max(busy.get(schedule, 0.0), ms)
    return busy


def emulated(link):
    """Whether ``link`` is an emulated one (anything but "none"): its time is spent waiting, not moving data."""
    return comm.parse_link(link) is not None


def _point_rows(seq_len, link, report, setup):
    """(base, shared config) of one (seq_len, link)'s rows, from one of its engine reports."""
    base = {"op": "iso_prefill", "mode": link, "x_name": "seq_len", "x_value": seq_len}
    shared = {**setup, "seq_len": seq_len, "link": report.link, "comm_backend": report.comm_backend,
              "device": report.device, "dtype": report.dtype, "tp": report.tp}
    if emulated(link):
        shared["note"] = EMULATED_NOTE
    return base, shared


def _row(base, shared, provider, metric, unit, values, extra):
    p50, p20, p80 = values
    return {**base, "provider": provider, "metric": metric, "unit": unit, "p50": p50, "p20": p20, "p80": p80,
            "config_json": {**shared, **extra}}


def variant_rows(seq_len, link, provider, m, setup):
    """One ISO variant's rows (ms, reduction, overlap efficiency), written as soon as it is measured."""
    base, shared = _point_rows(seq_len, link, m.report, setup)
    extra = {**m.config_entries(), "predicted_ms": m.report.predicted_iso_ms,
             "paired_serial_ms": m.report.serial_ms}
    rows = [_row(base, shared, provider, "ms", "ms", quantiles(m.report.runs_ms["iso"]), extra)]
    for metric in ("reduction", "overlap_efficiency"):
        rows.append(_row(base, shared, provider, metric, "fraction", (getattr(m.report.overlap, metric), "", ""),
                         extra))
    return rows


def pooled_rows(seq_len, link, measured, setup):
    """The ``serial`` (every variant's serial runs) and ``no-comm`` rows, once every variant is measured."""
    reports = [m.report for m in measured.values()]
    base, shared = _point_rows(seq_len, link, reports[0], setup)
    serial_runs = [t for report in reports for t in report.runs_ms["serial"]]
    no_comm = statistics.mean(report.compute_only_ms for report in reports)
    return [_row(base, shared, "serial", "ms", "ms", quantiles(serial_runs),
                 {"predicted_ms": reports[0].predicted_serial_ms, "runs": len(serial_runs)}),
            _row(base, shared, "no-comm", "ms", "ms", (no_comm, "", ""), {"calls": len(reports)})]


def rows_for_point(seq_len, link, measured, setup):
    """Tidy CSV rows of one (seq_len, link) from {provider: Measured} of each ISO variant: what ``main`` writes
    for the point, the variants' rows as each is measured, then the pooled ones."""
    rows = pooled_rows(seq_len, link, measured, setup)
    for provider, m in measured.items():
        rows += variant_rows(seq_len, link, provider, m, setup)
    return rows


def compute_ratio(measured):
    """Compute-stream time of the chunked ISO run over that of the unsplit serial run, as text."""
    busy = measured.compute_busy_ms
    return f"{busy['iso'] / busy['serial']:.2f}" if busy.get("serial") else "-"


def summary_table(measured_by_point):
    """Markdown table: one line per (seq_len, link) from {(seq_len, link): {provider: Measured}}."""
    header = ("| seq_len | link | serial ms | iso auto ms (chunks) | iso 2 even ms | no-comm ms | R auto "
              "| R 2 even | eff auto | eff 2 even | pred err auto % | pred err 2 even % "
              "| compute iso/serial auto, 2 even |")
    lines = [header, "|---" * header.count(" |") + "|"]
    for (seq_len, link), measured in measured_by_point.items():
        auto, even = measured["iso-auto"], measured["iso-2even"]
        reports = [m.report for m in measured.values()]
        serial = statistics.median(t for r in reports for t in r.runs_ms["serial"])
        no_comm = statistics.mean(r.compute_only_ms for r in reports)
        flag = "" if all(r.agree is not False for r in reports) else " DISAGREE"
        a, e = auto.report, even.report
        lines.append(
            f"| {seq_len} | {link}{flag} | {serial:.1f} | {a.iso_ms:.1f} ({a.chunks}) | "
            f"{e.iso_ms:.1f} | {no_comm:.1f} | {100 * a.overlap.reduction:.1f}% "
            f"| {100 * e.overlap.reduction:.1f}% "
            f"| {a.overlap.overlap_efficiency:.2f} | {e.overlap.overlap_efficiency:.2f} "
            f"| {prediction_error(a.predicted_iso_ms, a.iso_ms):+.1f} "
            f"| {prediction_error(e.predicted_iso_ms, e.iso_ms):+.1f} "
            f"| {compute_ratio(auto)}, {compute_ratio(even)} |")
    return "\n".join(lines)


def measure_point(args, device, tp, seq_len, link, on_measured=None):
    """{provider: Measured} for the ISO variants at one (seq_len, link); ``on_measured(provider, Measured)`` is
    called as each variant finishes (main writes its rows then)."""
    measured = {}
    note = f"; {EMULATED_NOTE}" if emulated(link) else ""
    for provider, (chunks, split) in VARIANTS.items():
        cfg = engine.PrefillConfig(model=args.model, tp=tp, seq_len=seq_len, chunks=chunks, split=split,
                                   link=comm.parse_link(link), device=device, dtype=cli.parse_dtype(args.dtype),
                                   generate=0, warmup=args.warmup, repeats=args.repeats,
                                   comm_backend=args.comm_backend, trace=True)
        load_before = os.getloadavg()[0]
        report = engine.run(cfg)
        measured[provider] = Measured(dataclasses.replace(report, lanes=None),
                                      [round(load_before, 2), round(os.getloadavg()[0], 2)],
                                      compute_busy(report.lanes))
        print(f"  {provider:<10} seq_len={seq_len} link={link}: serial {report.serial_ms:.1f} ms, "
              f"iso {report.iso_ms:.1f} ms ({report.chunks} chunks {report.bounds}), "
              f"efficiency {report.overlap.overlap_efficiency:.2f}, load {measured[provider].load_avg}{note}",
              flush=True)
        if on_measured is not None:
            on_measured(provider, measured[provider])
    return measured


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one prompt length per link; one link on one GPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--csv", type=Path,
                        help="append rows here (default bench/results/iso_prefill_<device>.csv)")
    parser.add_argument("--png", type=Path, help="plot (default: the CSV path with .png)")
    parser.add_argument("--model",
                        help="preset or checkpoint folder (default llama-small on CPU, llama-1b on GPU)")
    parser.add_argument("--tp", type=int, help="ranks (default 2 on CPU, every GPU up to 8 on CUDA)")
    parser.add_argument("--seq-lens", help="comma-separated prompt lengths (overrides --quick's)")
    parser.add_argument("--links", help="comma-separated links: none, a preset, ratio:R")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--comm-backend", default="auto", choices=["auto", "torch", "nccl-ext"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per schedule and call")
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        common.require_gpu(args.tp or 1)
    settings, default_tp = device_defaults(device, torch.cuda.device_count() if device == "cuda" else 0)
    args.model = args.model or settings["model"]
    tp = args.tp or default_tp
    seq_lens, links = points(args, settings)
    if tp == 1 and "none" in links:
        raise SystemExit("--links none needs --tp >= 2: "
                         "one rank without an emulated link has nothing to overlap")
    csv_path = args.csv or common.RESULTS / f"iso_prefill_{device}.csv"
    png = args.png or csv_path.with_suffix(".png")
    setup = {"model": args.model, "repeats": args.repeats, "warmup": args.warmup, "cpu_count": os.cpu_count()}
    print(f"iso prefill bench: device={device} tp={tp} model={args.model} seq_lens={seq_lens} links={links} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)

    results, rows, failed = {}, [], []
    for link in links:
        for seq_len in seq_lens:
            def write(provider, m, seq_len=seq_len, link=link):
                variant = variant_rows(seq_len, link, provider, m, setup)
                common.append_rows(csv_path, variant)  # at once: a run cut short keeps what it measured
                rows.extend(variant)

            try:
                reports = measure_point(args, device, tp, seq_len, link, on_measured=write)
            except RankError as exc:
                failed.append((seq_len, link))
                print(f"  FAILED seq_len={seq_len} link={link}: {str(exc).strip().splitlines()[-1]}",
                      flush=True)
                continue
            results[(seq_len, link)] = reports
            pooled = pooled_rows(seq_len, link, reports, setup)
            common.append_rows(csv_path, pooled)
            rows.extend(pooled)
    if rows:
        first = next(iter(results.values()))["iso-auto"].report
        common.plot_panels([r for r in rows if r["metric"] == "ms"], png, ylabel="prefill ms (median)",
                           title=f"serial vs ISO prefill: {args.model}, tp={tp}, {first.device}, "
                                 f"{first.dtype.removeprefix('torch.')}",
                           styles={"serial": "o-", "iso-auto": "s-", "iso-2even": "^-", "no-comm": "kx--"})
        print(f"csv: {csv_path}\nplot: {png}")
        print(summary_table(results))
    disagree = [point for point, measured in results.items()
                if not all(m.report.agree is not False for m in measured.values())]
    for seq_len, link in disagree:
        print(f"ISO and serial logits disagree at seq_len={seq_len} link={link}")
    return 1 if failed or disagree or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
