"""Compile checks without a GPU: every Triton kernel, launched through its real launcher on meta tensors,
compiled for sm_80 (A100/A800), sm_89 (RTX 4090) and sm_90 (H100/H200) by ``python -m tools.compile_report``
(a development tool of the checkout, run from its root); every config the launcher keeps must compile, spill at
most 64 bytes per thread, fit the arch's shared memory, and run 16-bit GEMM and attention on tensor cores while
fp32 stays on the exact path.
A launch at a new chunk boundary, packing or sliding-window size must compile nothing new.

``ISO_KERNELS_COMPILE_MATRIX=full`` checks every dtype, head_dim and shape (``.ci/run`` does, under the newest
Triton and under 3.6); the default is the main shapes of a Llama-70B-class bf16 prefill.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from iso_kernels import envs
from tools.compile_report import cases
from triton_ops._config import MAX_LOCAL_BYTES

MATRIX = envs.compile_matrix()
# tools/ is a folder of the checkout, not an installed package: its subprocesses run from the checkout's root.
REPO_ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 89, 90)
# Opt-in shared memory per block, from the CUDA programming guide's table (not from the report's own table).
SHARED_MEMORY_KIB = {80: 163, 89: 99, 90: 227}
MAX_SPILL_STORE_BYTES = 64
MATMUL_KERNELS = ("chunked_attention", "chunked_attention_varlen", "gemm_signal", "moe_experts_gate_up",
                  "moe_experts_down")  # the kernels built on tl.dot
# Cold Triton cache, 2 busy cores: ~3 minutes for the main matrix, ~20 for the full one.
TIMEOUT_S = {"main": 900, "full": 3600}[MATRIX]


# The report runs in the first test's setup, compiling every kernel in a process per arch (minutes on a cold cache).
pytestmark = [pytest.mark.timeout(TIMEOUT_S + 60), pytest.mark.slow]

# Launches at ISO's chunk boundaries (1365, 2730: not multiples of 16), at aligned ones and at one token, and of
# packed batches of 1-3 sequences, the attention ones also under a sliding window of another size each time,
# through the real launchers under the compile-only driver for sm_90: prints
# how many kernels each autotuned kernel had compiled after its first launch and after all of them. fp32 keeps
# its first fitting config, so this compiles a few kernels and times nothing.
BOUNDARIES_SCRIPT = """
import json, os, torch, triton
from tools.compile_report import CompileOnlyDriver, _keep_ptxas_log_in_metadata, default_cache_dir
os.environ.setdefault("TRITON_CACHE_DIR", default_cache_dir())
_keep_ptxas_log_in_metadata()  # what the compile report reads from the cache it shares
triton.runtime.driver.set_active(CompileOnlyDriver(90))
from triton_ops.chunked_attention import _chunked_attention_fwd_kernel, chunked_attention_fwd
from triton_ops.chunked_attention_varlen import _chunked_attention_varlen_fwd_kernel, chunked_attention_varlen_fwd
from triton_ops.gemm_signal import _gemm_signal_kernel, gemm_signal

def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")

KERNELS = _chunked_attention_fwd_kernel, _chunked_attention_varlen_fwd_kernel, _gemm_signal_kernel
for kernel in KERNELS:
    kernel.cache_results = False  # no-op launches time nothing worth keeping

def compiled():
    return {k.fn.__name__: sum(len(cache[0]) for cache in k.fn.device_caches.values()) for k in KERNELS}

torch.backends.cuda.matmul.fp32_precision = "ieee"
cache, weight, pool = meta(1, 4096, 2, 64), meta(1024, 512), meta(1024, 16, 2, 64)
counts = []
for step, (start, end, q_lens) in enumerate([(0, 1365, (1365,)), (1365, 2730, (1365, 1, 17)),
                                             (2730, 4096, (2730, 1366)), (4095, 4096, (1, 1)),
                                             (1536, 4096, (2048, 512))]):
    chunked_attention_fwd(meta(1, end - start, 8, 64), cache[:, :end], cache[:, :end], start, True, 0.125)
    gemm_signal(meta(end - start, 512), weight)
    index = meta(len(q_lens) + 1, dtype=torch.int32), meta(len(q_lens), dtype=torch.int32)
    table = meta(len(q_lens), 2 * sum(q_lens) // 16 + 1, dtype=torch.int32)
    chunked_attention_varlen_fwd(meta(sum(q_lens), 8, 64), pool, pool, *index, table, True, 0.125)
    window = 256 + 37 * step, -1
    chunked_attention_fwd(meta(1, end - start, 8, 64), cache[:, :end], cache[:, :end], start, True, 0.125, *window)
    chunked_attention_varlen_fwd(meta(sum(q_lens), 8, 64), pool, pool, *index, table, True, 0.125, *window)
    if step == 0:
        counts.append(compiled())
counts.append(compiled())
print(json.dumps(counts))
"""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    report = tmp_path_factory.mktemp("compile") / "report.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    # Its own session, so a timeout also ends the per-arch worker processes it spawns.
    command = subprocess.Popen(
        [sys.executable, "-m", "tools.compile_report", "--arch", ",".join(map(str, ARCHS)),
         "--matrix", MATRIX, "--csv", str(report)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = command.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(command.pid, signal.SIGKILL)
        command.communicate()
        pytest.fail(f"the compile report did not finish within {TIMEOUT_S} s")
    assert command.returncode == 0, f"the compile report failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    with open(report) as f:
        found = list(csv.DictReader(f))
    for row in found:
        row["arch"] = int(row["arch"])
        row["kept"] = row["kept"] == "True"
        for key in ("registers", "stack_bytes", "spill_store_bytes", "shared_bytes"):
            row[key] = int(row[key])
    return found


def test_new_chunk_boundaries_compile_nothing():
    """The lengths, positions and packing of a chunk, and the size of a sliding window, are not specialized on:
    after each kernel's first launch, launches at other chunk boundaries, packings and windows reuse its compiled
    kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BOUNDARIES_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    first, last = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(first.values()) and last == first


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


def _warp_mma_only(row):
    """wgmma takes 64 rows per warpgroup: MoE blocks of 16 rows (decode-sized batches) run mma.sync on sm_90."""
    return row["kernel"].startswith("moe_experts") and "BLOCK_M=16" in row["case"]


def test_16bit_gemm_and_attention_run_on_tensor_cores(rows):
    """wgmma (SASS HGMMA) on sm_90, mma.sync (HMMA) on sm_80/89."""
    checked = [r for r in _kept(rows) if r["kernel"] in MATMUL_KERNELS and r["dtype"] in ("bfloat16", "float16")]
    assert {r["arch"] for r in checked} == set(ARCHS)
    wrong = [f"{_label(r)}: {r['tensor_core_op']}" for r in checked
             if r["tensor_core_op"] != ("HGMMA" if r["arch"] == 90 and not _warp_mma_only(r) else "HMMA")]
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
