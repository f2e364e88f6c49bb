"""Compile checks without a GPU: every Triton kernel, launched through its real launcher on meta tensors,
compiled for sm_80 (A100/A800), sm_89 (RTX 4090) and sm_90 (H100/H200) by ``python -m iso_kernels
compile-report``; every config the launcher keeps must compile, spill at most 64 bytes per thread, fit the
arch's shared memory, and run 16-bit GEMM and attention on tensor cores while fp32 stays on the exact path.

``ISO_KERNELS_COMPILE_MATRIX=full`` checks every dtype, head_dim and shape (``.ci/run`` does, under the newest
Triton and under 3.6); the default is the main shapes of a Llama-70B-class bf16 prefill.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

from iso_kernels import envs
from iso_kernels.compile_report import cases
from triton_ops._config import MAX_LOCAL_BYTES

MATRIX = envs.compile_matrix()
ARCHS = (80, 89, 90)
# Opt-in shared memory per block, from the CUDA programming guide's table (not from the report's own table).
SHARED_MEMORY_KIB = {80: 163, 89: 99, 90: 227}
MAX_SPILL_STORE_BYTES = 64
MATMUL_KERNELS = ("chunked_attention", "chunked_attention_varlen", "gemm_signal")  # the kernels built on tl.dot
# Cold Triton cache, 2 busy cores: ~3 minutes for the main matrix, ~20 for the full one.
TIMEOUT_S = {"main": 900, "full": 3600}[MATRIX]


pytestmark = pytest.mark.timeout(TIMEOUT_S + 60)  # the report runs in the first test's setup


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    report = tmp_path_factory.mktemp("compile") / "report.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    # Its own session, so a timeout also ends the per-arch worker processes it spawns.
    command = subprocess.Popen(
        [sys.executable, "-m", "iso_kernels", "compile-report", "--arch", ",".join(map(str, ARCHS)),
         "--matrix", MATRIX, "--csv", str(report)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = command.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(command.pid, signal.SIGKILL)
        command.communicate()
        pytest.fail(f"compile-report did not finish within {TIMEOUT_S} s")
    assert command.returncode == 0, f"compile-report failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    with open(report) as f:
        found = list(csv.DictReader(f))
    for row in found:
        row["arch"] = int(row["arch"])
        row["kept"] = row["kept"] == "True"
        for key in ("registers", "stack_bytes", "spill_store_bytes", "shared_bytes"):
            row[key] = int(row[key])
    return found


def _label(row):
    return f"sm_{row['arch']} {row['kernel']} [{row['case']}] {row['dtype']} {row['config']} " \
           f"w{row['num_warps']} s{row['num_stages']}"


def _kept(rows):
    return [row for row in rows if row["kept"]]


def test_every_case_compiles_for_every_arch(rows):
    expected = {(case.kernel, case.name) for case in cases(MATRIX)}
    for arch in ARCHS:
        kept = {(row["kernel"], row["case"]) for row in _kept(rows) if row["arch"] == arch}
        assert kept == expected, f"sm_{arch}: no kept config for {sorted(expected - kept)}"


def test_kept_configs_do_not_spill(rows):
    spilling = [f"{_label(r)}: {r['spill_store_bytes']} B spill stores, {r['stack_bytes']} B stack"
                for r in _kept(rows) if r["spill_store_bytes"] > MAX_SPILL_STORE_BYTES]
    assert not spilling, "\n".join(spilling)


def test_kept_configs_fit_shared_memory(rows):
    over = [f"{_label(r)}: {r['shared_bytes']} B > {SHARED_MEMORY_KIB[r['arch']]} KiB"
            for r in _kept(rows) if r["shared_bytes"] > SHARED_MEMORY_KIB[r["arch"]] * 1024]
    assert not over, "\n".join(over)


def test_the_launcher_drops_only_what_does_not_fit(rows):
    """A config the launcher rejected must really be over one of its limits: local memory (the stack frame the
    driver reports) or shared memory."""
    wrongly_dropped = [_label(r) for r in rows if not r["kept"]
                       and r["stack_bytes"] <= MAX_LOCAL_BYTES
                       and r["shared_bytes"] <= SHARED_MEMORY_KIB[r["arch"]] * 1024]
    assert not wrongly_dropped, "\n".join(wrongly_dropped)


def test_16bit_gemm_and_attention_run_on_tensor_cores(rows):
    """wgmma (SASS HGMMA) on sm_90, mma.sync (HMMA) on sm_80/89."""
    checked = [r for r in _kept(rows) if r["kernel"] in MATMUL_KERNELS and r["dtype"] in ("bfloat16", "float16")]
    assert {r["arch"] for r in checked} == set(ARCHS)
    wrong = [f"{_label(r)}: {r['tensor_core_op']}" for r in checked
             if r["tensor_core_op"] != ("HGMMA" if r["arch"] == 90 else "HMMA")]
    assert not wrong, "\n".join(wrong)


def test_fp32_stays_on_its_documented_path(rows):
    """fp32 attention and GEMM are exact (ieee dots on the FMA units); GEMM uses TF32 tensor cores exactly
    when torch allows TF32 (the ``tf32`` cases)."""
    fp32 = [r for r in _kept(rows) if r["kernel"] in MATMUL_KERNELS and r["dtype"] == "float32"]
    assert fp32
    for row in fp32:
        mix = json.loads(row["sass"])
        if row["case"].endswith(" tf32"):
            assert row["tensor_core_op"] != "none", _label(row)
        else:
            assert row["tensor_core_op"] == "none" and mix["FFMA"] > 0, _label(row)
