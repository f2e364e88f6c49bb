"""Fit the H100 preset's measured constants to published 8xH100 measurements, and print them with their errors.

    python -m tools.fit_presets              # the fits, with their largest errors
    python -m tools.fit_presets --compare    # the H100 preset beside every measurement (bench/README.md)

Data: ``tests/data/tokenweave/`` (TokenWeave's artifact, README there). Fitted on exactly these, nothing else:

- compute: ``figure_11a.csv``, Llama-3.3-70B at TP 8, column ``no_ar`` (the prefill with its all-reduces removed,
  1k..64k tokens). The cost model's unsplit prefill without communication is, per layer and rank,
  ``layer_fixed + n * (GEMM FLOPs / (tp * peak * gemm_eff) + elementwise bytes / HBM) + causal pairs * pair FLOPs
  / (tp * peak * attention_eff)``: linear in (layer_fixed, 1 / gemm_eff, 1 / attention_eff), so a least-squares
  fit in relative error finds them. Peak (989 TFLOP/s) and HBM (3.35 TB/s) are the datasheet's.
- experts: ``figure_11a.csv``, Mixtral-8x22B at TP 8, column ``no_ar``, with the dense terms above held: the
  experts' GEMMs take ``tokens x k x expert FLOPs / (tp * peak * expert_eff)`` plus, per expert a chunk reaches,
  ``expert_half_rows`` rows more (the efficiency of a GEMM of m rows: expert_eff x m / (m + half_rows)), linear
  in (1 / expert_eff, half_rows / expert_eff). The weight-streaming floor does not bind from 1k tokens up.
- collectives: ``figure_6.csv``, each column (NCCL and multimem all-reduce, reduce-scatter, all-gather over 8
  GPUs, 64..32768 tokens of hidden 8192 in bf16). A collective takes the fastest of its regimes, each
  ``latency + traffic / bus bandwidth`` (traffic = message bytes x 2(t-1)/t for an all-reduce, (t-1)/t for
  the halves): NCCL switches protocol and algorithm between 2 and 4 MiB, so its fit has two regimes (one per
  side of the best cut, by relative error); multimem's one.

``iso_kernels.hardware`` holds the results, rounded; ``tests/planning/test_published.py`` checks that it still
matches this fit and the data.
"""

import argparse
import csv
import dataclasses
from pathlib import Path

import numpy as np

from iso_kernels import models
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.planning import model_shape

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "tokenweave"
H100_PEAK_TFLOPS = 989.0  # dense bf16, NVIDIA H100 SXM datasheet
H100_HBM_GBPS = 3350.0  # HBM3, NVIDIA H100 SXM datasheet
GPUS = 8
HIDDEN = 8192
# figure_6.csv column -> (the collective, its traffic per byte of message on 8 GPUs)
COLLECTIVE_COLUMNS = {
    "pytorch_dist_ar_us": ("nccl", "all_reduce"), "pytorch_dist_rs_us": ("nccl", "reduce_scatter"),
    "pytorch_dist_ag_us": ("nccl", "all_gather"), "multimem_ar_us": ("multimem", "all_reduce"),
    "multimem_rs_us": ("multimem", "reduce_scatter"), "multimem_ag_us": ("multimem", "all_gather"),
}
TRAFFIC = {"all_reduce": 2 * (GPUS - 1) / GPUS, "reduce_scatter": (GPUS - 1) / GPUS,
           "all_gather": (GPUS - 1) / GPUS}
REGIMES = {"nccl": 2, "multimem": 1}


def read_rows(name):
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def _relative_lstsq(features, times):
    """Coefficients minimising the squared relative error of ``features @ coef`` against ``times``."""
    features, times = np.asarray(features, dtype=np.float64), np.asarray(times, dtype=np.float64)
    return np.linalg.lstsq(features / times[:, None], np.ones(len(times)), rcond=None)[0]


# --- compute ---
def no_comm_features(shape, tp, n, hbm_gbps=H100_HBM_GBPS, peak_tflops=H100_PEAK_TFLOPS):
    """(known seconds, [per-layer seconds per unit of layer_fixed_s, 1/gemm_eff, 1/attention_eff]) of the
    unsplit prefill of ``n`` tokens without communication, in the cost model's form."""
    flops = tp * peak_tflops * 1e12
    gemm = (shape.attention_gemm_flops + shape.mlp_gemm_flops) * n / flops
    pairs = shape.pair_flops * n * (n + 1) / 2 / flops
    elementwise = sum(shape.elementwise_bytes(tp)) * n / (hbm_gbps * 1e9)
    return shape.n_layers * elementwise, [shape.n_layers, shape.n_layers * gemm, shape.n_layers * pairs]


def fit_experts(model="Mixtral-8x22B-Instruct-v0.1", registry_name="mixtral-8x22b", tp=8):
    """{"expert_efficiency", "expert_half_rows"} fitted on figure_11a's no_ar column, the dense terms held."""
    from iso_kernels.planning import plan

    shape = model_shape(models.config(registry_name))
    rows = [r for r in read_rows("figure_11a.csv") if r["model"] == model]
    free_experts = dataclasses.replace(HARDWARE_PRESETS["h100-nvlink"], expert_efficiency=1e12, expert_half_rows=0.0)
    flops = tp * H100_PEAK_TFLOPS * 1e12
    per_row = shape.expert_gemm_flops / shape.experts_per_token
    known, features = [], []
    for row in rows:
        n = int(row["prompt_len"])
        known.append(plan(shape, tp, n, hardware=free_experts).parts.no_comm_s)
        hit = 1 - (1 - shape.experts_per_token / shape.n_experts) ** n
        features.append([shape.n_layers * n * shape.expert_gemm_flops / flops,
                         shape.n_layers * shape.n_experts * per_row * hit / flops])
    times = np.array([float(r["no_ar"]) / 1e3 for r in rows]) - np.array(known)
    inverse, half_rows_over = _relative_lstsq(features, times)
    return {"expert_efficiency": 1 / inverse, "expert_half_rows": half_rows_over / inverse}


def fit_compute(model="Llama-3.3-70B-Instruct", registry_name="llama3-70b", tp=8):
    """{"layer_fixed_us", "gemm_efficiency", "attention_efficiency"} fitted on figure_11a's no_ar column."""
    shape = model_shape(models.config(registry_name))
    rows = [r for r in read_rows("figure_11a.csv") if r["model"] == model]
    known, features = zip(*(no_comm_features(shape, tp, int(r["prompt_len"])) for r in rows), strict=True)
    times = np.array([float(r["no_ar"]) / 1e3 for r in rows]) - np.array(known)
    fixed, inverse_gemm, inverse_attention = _relative_lstsq(features, times)
    return {"layer_fixed_us": 1e6 * fixed, "gemm_efficiency": 1 / inverse_gemm,
            "attention_efficiency": 1 / inverse_attention}


# --- collectives ---
def _affine(traffic, times):
    latency, seconds_per_byte = _relative_lstsq(np.stack([np.ones_like(traffic), traffic], axis=1), times)
    return latency, 1 / seconds_per_byte


def collective_time(regimes, traffic_bytes):
    """The fastest regime's time: min over (latency_s, bus bytes/s) of latency + traffic / bandwidth."""
    return np.min([latency + np.asarray(traffic_bytes) / bandwidth for latency, bandwidth in regimes], axis=0)


def fit_collective(column):
    """((latency_us, bus_gbps), ...) of one figure_6 column, and the largest relative error of the fit."""
    implementation, kind = COLLECTIVE_COLUMNS[column]
    rows = read_rows("figure_6.csv")
    traffic = np.array([int(r["BL"]) * HIDDEN * 2 * TRAFFIC[kind] for r in rows], dtype=np.float64)
    times = np.array([float(r[column]) * 1e-6 for r in rows])

    def worst(regimes):
        return float(np.max(np.abs(collective_time(regimes, traffic) / times - 1)))

    if REGIMES[implementation] == 1:
        candidates = [[_affine(traffic, times)]]
    else:  # every cut leaving at least two sizes per side
        candidates = [[_affine(traffic[:cut], times[:cut]), _affine(traffic[cut:], times[cut:])]
                      for cut in range(2, len(times) - 1)]
    regimes = min(candidates, key=worst)
    return tuple((1e6 * latency, bandwidth / 1e9) for latency, bandwidth in regimes), worst(regimes)


def compare():
    """Markdown tables: the H100 preset's predictions (``plan()``'s parts) beside every prefill of
    figure_11a/11b and every collective of figure_6."""
    from iso_kernels.planning import plan

    h100 = HARDWARE_PRESETS["h100-nvlink"]
    names = {"Llama-3.3-70B-Instruct": "llama3-70b", "Qwen2.5-72B-Instruct": "qwen2.5-72b",
             "Mixtral-8x22B-Instruct-v0.1": "mixtral-8x22b"}
    lines = ["| model | TP | tokens | no-comm measured ms | predicted | error | serial (multimem) measured ms "
             "| predicted | error | fitted on |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, tp in (("figure_11a.csv", 8), ("figure_11b.csv", 4)):
        for row in read_rows(name):
            if row["model"] not in names:
                continue
            p = plan(models.config(names[row["model"]]), tp, int(row["prompt_len"]), hardware=h100,
                     collective="multimem")
            no_comm, serial = float(row["no_ar"]), float(row["baseline_multimem"])
            fitted = "yes" if name == "figure_11a.csv" and names[row["model"]] != "qwen2.5-72b" else "no"
            lines.append(f"| {row['model']} | {tp} | {row['prompt_len']} | {no_comm:.1f} | "
                         f"{1e3 * p.parts.no_comm_s:.1f} | {1e3 * p.parts.no_comm_s / no_comm - 1:+.1%} | "
                         f"{serial:.1f} | {1e3 * p.predicted_serial_s:.1f} | "
                         f"{1e3 * p.predicted_serial_s / serial - 1:+.1%} | {fitted} |")
    lines += ["", "| tokens | " + " | ".join(f"{c} measured / predicted us" for c in COLLECTIVE_COLUMNS) + " |",
              "|---|" + "---|" * len(COLLECTIVE_COLUMNS)]
    for row in read_rows("figure_6.csv"):
        nbytes, cells = int(row["BL"]) * HIDDEN * 2, []
        for column, (collective, kind) in COLLECTIVE_COLUMNS.items():
            predicted = 1e6 * h100.link(collective).seconds(kind, nbytes, GPUS)
            cells.append(f"{float(row[column]):.1f} / {predicted:.1f} ({predicted / float(row[column]) - 1:+.1%})")
        lines.append(f"| {row['BL']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.fit_presets", description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true", help="print the preset beside the data (Markdown)")
    if parser.parse_args(argv).compare:
        print(compare())
        return
    print("H100 compute, fitted on figure_11a.csv Llama-3.3-70B-Instruct TP 8 no_ar:")
    for name, value in fit_compute().items():
        print(f"  {name} = {value:.4g}")
    print("H100 experts, fitted on figure_11a.csv Mixtral-8x22B-Instruct-v0.1 TP 8 no_ar:")
    for name, value in fit_experts().items():
        print(f"  {name} = {value:.4g}")
    print("8xH100 collectives, fitted on figure_6.csv: regimes (latency us, bus GB/s), largest relative error")
    for column in COLLECTIVE_COLUMNS:
        regimes, error = fit_collective(column)
        print(f"  {column:<20} {', '.join(f'({a:.1f}, {b:.1f})' for a, b in regimes)}  {error:.1%}")


if __name__ == "__main__":
    main()
