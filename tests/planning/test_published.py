"""The H100 preset against the world: TokenWeave's published 8xH100 measurements (tests/data/tokenweave, with
their source), through ``plan()``'s reported parts, as ``plan --json`` prints them.

Fitted on (``tools/fit_presets.py``): figure_11a's Llama-3.3-70B and Mixtral-8x22B TP 8 ``no_ar`` columns and
figure_6. Not fitted on, and checked all the same: Qwen2.5-72B at TP 8, the dense models at TP 4 (figure_11b),
and the whole prefill with its all-reduces (the ``baseline_multimem`` column, vLLM's all-reduces on multimem).
For mixtures of experts, whether the planner splits is held to the sign of TokenWeave's measured gain.
"""

import csv
from pathlib import Path

import pytest

from iso_kernels import models
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.planning import plan
from tools import fit_presets

DATA = Path(__file__).resolve().parents[1] / "data" / "tokenweave"
H100 = HARDWARE_PRESETS["h100-nvlink"]
REGISTRY = {"Llama-3.3-70B-Instruct": "llama3-70b", "Qwen2.5-72B-Instruct": "qwen2.5-72b",
            "Mixtral-8x22B-Instruct-v0.1": "mixtral-8x22b"}
# The bars: compute within 10 % at every length, collectives within 15 % at every size.
COMPUTE_TOLERANCE, COLLECTIVE_TOLERANCE = 0.10, 0.15


def prefill_rows():
    """(registry name, tp, tokens, row) of every prefill measurement of figure_11a/11b."""
    for name, tp in (("figure_11a.csv", 8), ("figure_11b.csv", 4)):
        with open(DATA / name, newline="") as f:
            for row in csv.DictReader(f):
                if row["model"] in REGISTRY:
                    yield REGISTRY[row["model"]], tp, int(row["prompt_len"]), row


PREFILLS = list(prefill_rows())


def planned(model, tp, tokens, collective):
    return plan(models.config(model), tp, tokens, hardware=H100, collective=collective)


@pytest.mark.parametrize("model, tp, tokens, row", PREFILLS,
                         ids=[f"{m}-tp{tp}-{n}" for m, tp, n, _ in PREFILLS])
def test_the_prefill_without_communication_is_the_measured_one(model, tp, tokens, row):
    predicted_ms = 1e3 * planned(model, tp, tokens, "nccl").parts.no_comm_s
    assert predicted_ms == pytest.approx(float(row["no_ar"]), rel=COMPUTE_TOLERANCE)


@pytest.mark.parametrize("model, tp, tokens, row", PREFILLS,
                         ids=[f"{m}-tp{tp}-{n}" for m, tp, n, _ in PREFILLS])
def test_the_serial_prefill_on_multimem_is_vllms_measured_baseline(model, tp, tokens, row):
    # Never fitted: compute and 160 all-reduces added up, against the whole measured prefill.
    predicted_ms = 1e3 * planned(model, tp, tokens, "multimem").predicted_serial_s
    assert predicted_ms == pytest.approx(float(row["baseline_multimem"]), rel=COMPUTE_TOLERANCE)


def test_the_fitted_settings_land_well_inside_the_bar():
    for model, within in (("llama3-70b", 0.01), ("mixtral-8x22b", 0.02)):
        fitted = [(n, row) for m, tp, n, row in PREFILLS if m == model and tp == 8]
        assert [n for n, _ in fitted] == [1024 * 2**i for i in range(7)]  # 1k .. 64k, as the issue names them
        for tokens, row in fitted:
            assert 1e3 * planned(model, 8, tokens, "nccl").parts.no_comm_s == pytest.approx(
                float(row["no_ar"]), rel=within), (model, tokens)


COLLECTIVE_COLUMNS = [(column, *target) for column, target in fit_presets.COLLECTIVE_COLUMNS.items()]


def collective_rows():
    with open(DATA / "figure_6.csv", newline="") as f:
        return [(int(row["BL"]), row) for row in csv.DictReader(f)]


@pytest.mark.parametrize("column, collective, kind", COLLECTIVE_COLUMNS)
def test_every_collective_is_the_measured_one_at_every_size(column, collective, kind):
    link = H100.link(collective)
    for tokens, row in collective_rows():
        predicted_us = 1e6 * link.seconds(kind, tokens * 8192 * 2, 8)
        assert predicted_us == pytest.approx(float(row[column]), rel=COLLECTIVE_TOLERANCE), (column, tokens)


@pytest.mark.parametrize("collective, column", [("nccl", "pytorch_dist_ar_us"), ("multimem", "multimem_ar_us")])
def test_plan_reports_the_measured_all_reduce(collective, column):
    # plan's all_reduce_s: one all-reduce of the whole prompt's hidden states, as the table's baseline runs it.
    for tokens, row in collective_rows():
        parts = planned("llama3-70b", 8, tokens, collective).parts
        assert 1e6 * parts.all_reduce_s == pytest.approx(float(row[column]), rel=COLLECTIVE_TOLERANCE)
        assert parts.all_reduces == 160 and parts.comm_s == pytest.approx(160 * parts.all_reduce_s)


def test_the_planner_splits_a_mixture_of_experts_where_tokenweave_measured_a_gain():
    # TokenWeave's overlap against vLLM's multimem baseline at TP 8; a different technique, so only the sign
    # is held: a split where it gained, the prompt whole where it lost. Qwen3-235B-A22B at 1k (measured +2 %,
    # the planner off, its split predicted under MIN_GAIN) is the one setting that differs.
    measured = {("mixtral-8x22b", int(row["prompt_len"])): float(row["baseline_multimem"]) / float(
        row["overlap_fused"]) for model, tp, _, row in PREFILLS if model == "mixtral-8x22b" and tp == 8}
    with open(DATA / "figure_qwen3moe_summary.csv", newline="") as f:
        qwen = {(int(r["prompt_len"]), r["impl"]): float(r["avg_latency(ms)"]) for r in csv.DictReader(f)}
    measured |= {("qwen3-235b-a22b", n): qwen[n, "baseline_multimem"] / qwen[n, "overlap_fused"]
                 for n, impl in qwen if impl == "overlap_fused" and n > 1024}
    assert len(measured) == 13
    for (model, tokens), ratio in measured.items():
        assert planned(model, 8, tokens, "multimem").off == (ratio < 1), (model, tokens, ratio)


def test_the_preset_is_what_the_fit_finds():
    fitted = {**fit_presets.fit_compute(), **fit_presets.fit_experts()}
    assert H100.expert_efficiency == pytest.approx(fitted["expert_efficiency"], abs=5e-4)
    assert H100.expert_half_rows == pytest.approx(fitted["expert_half_rows"], abs=0.5)
    assert H100.gemm_efficiency == pytest.approx(fitted["gemm_efficiency"], abs=5e-4)
    assert H100.attention_efficiency == pytest.approx(fitted["attention_efficiency"], abs=5e-4)
    assert H100.layer_fixed_us == pytest.approx(fitted["layer_fixed_us"], abs=0.5)
    for column, collective, kind in COLLECTIVE_COLUMNS:
        regimes, _ = fit_presets.fit_collective(column)
        preset = getattr(H100.link(collective), kind).regimes
        assert [value for regime in preset for value in regime] == pytest.approx(
            [value for regime in regimes for value in regime], abs=0.051), column
