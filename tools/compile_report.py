"""Compile every Triton kernel for GPUs that are not here, through its real launcher, and report what ptxas made.

``python -m tools.compile_report [--arch 80,89,90 | native] [--matrix main | full] [--csv FILE]
[--all-candidates]``, from the root of a checkout (``python tools/compile_report.py ...`` works too). A
development tool, not part of the package: nothing ``iso_kernels`` or ``triton_ops`` imports pulls it in, and
neither the wheel nor the sdist carries it.

Each case calls a kernel's launcher (``triton_ops``) on meta tensors at a shape users run, so the launch goes
through the same argument binding, specialization, constexprs and config pruning as on a GPU; only the
driver is replaced. ``CompileOnlyDriver`` reports the target architecture and its shared-memory limit, reads
a compiled module's registers and local memory from the cubin as the CUDA driver would when loading it, and
launches nothing. So the launcher's own pruning (``triton_ops._config.keep_fitting``) runs against that
architecture, and so do the per-architecture candidate lists (``_config.arch_candidates``), which leave out
what an architecture never keeps; ``--all-candidates`` compiles those too, to show that the lists still hold.
For each compiled config the report gives ptxas' register and spill report, shared memory and
its limit, warps, stages, whether the launcher kept it, and the SASS instruction mix (tensor-core ops, FMAs,
local loads/stores). ``--arch native`` compiles for this machine's GPU (its compute capability, shared memory and
SM count) with the same driver: the cases' meta tensors cannot be launched for real.

One process per architecture: Triton caches compiled kernels per device ordinal, with the target fixed when
the first kernel binds, so two targets cannot share a process.
"""

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

if not __package__:  # run as a script (python tools/compile_report.py): the checkout's packages, not installed ones
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iso_kernels import envs
from iso_kernels.hardware import GPU_ARCHS
from iso_kernels.launch import one_line_warnings

# The architectures compiled for (compute capability -> opt-in shared memory per block, SM count, GPUs named)
# are iso_kernels.hardware.GPU_ARCHS, the facts the cost model's presets describe too.
# ptxas spill stores per thread that still count as no real spilling (see triton_ops._config.MAX_LOCAL_BYTES).
MAX_SPILL_STORE_BYTES = 64
# SASS opcodes counted in the instruction mix: Hopper warpgroup MMA, Ampere/Ada warp MMA, FP32 FMA,
# async global->shared copies (cp.async), TMA loads, and local-memory traffic (spills).
SASS_OPCODES = ("HGMMA", "HMMA", "FFMA", "LDGSTS", "UTMALDG", "LDL", "STL")
# Bump when the report's cache entries change shape: every cached kernel must carry its ptxas log.
_CACHE_SCHEMA = 1


# --- a driver that compiles for a target and launches nothing ---
def _cuobjdump(cubin: bytes, *flags: str) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


class _CompileOnlyUtils:
    def __init__(self, shared_limit, multiprocessors):
        self.shared_limit = shared_limit
        self.multiprocessors = multiprocessors

    def get_device_properties(self, device):
        return {"max_shared_mem": self.shared_limit, "multiprocessor_count": self.multiprocessors,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0,
                "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        """What cuModuleLoad + cuFuncGetAttribute would give Triton: registers, local bytes / 4, max threads."""
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", _cuobjdump(cubin, "-res-usage"))
        registers, stack, local = (int(v) for v in usage.groups())
        return None, None, registers, (stack + local) // 4, 1024

    def unload_module(self, module):
        pass


class _NoLaunch:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver on a machine without one: compiles for ``GPUTarget("cuda", cc, 32)``
    and treats every launch, including the autotuner's timing runs, as a no-op."""

    def __init__(self, capability, shared_limit=None, multiprocessors=None):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.shared_limit = shared_limit or GPU_ARCHS[capability].shared_memory_bytes
        self.utils = _CompileOnlyUtils(self.shared_limit, multiprocessors or GPU_ARCHS[capability].multiprocessors)
        self.launcher_cls = _NoLaunch

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        def run_once(fn, quantiles=None, **kwargs):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return run_once

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0, device="meta")

    def clear_cache(self, cache):
        pass


def _keep_ptxas_log_in_metadata():
    """Make every compile store ptxas' -v report in the kernel's metadata (and so in Triton's cache)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    make_cubin = CUDABackend.make_cubin
    if getattr(make_cubin, "keeps_ptxas_log", False):
        return

    def make_cubin_keeping_log(self, src, metadata, opt, capability):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            cubin = make_cubin(self, src, metadata, opt, capability)
        metadata["ptxas_log"] = printed.getvalue()
        return cubin

    make_cubin_keeping_log.keeps_ptxas_log = True
    CUDABackend.make_cubin = make_cubin_keeping_log


# --- cases: launchers on meta tensors at the shapes users run ---
@dataclass(frozen=True)
class Case:
    kernel: str
    name: str
    dtype: torch.dtype
    launch: object  # () -> None: calls the launcher
    tf32: bool = False


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _window_name(window):
    return "" if window == (-1, -1) else f" window {window}"


def _attention_case(dtype, head_dim, n_heads, n_kv_heads, seq_len, q_start, causal=True, window=(-1, -1)):
    from triton_ops.chunked_attention import chunked_attention_fwd

    q_len = seq_len - q_start
    q = _meta(1, q_len, n_heads, head_dim, dtype=dtype)
    kv = _meta(1, seq_len, n_kv_heads, head_dim, dtype=dtype)
    part = "full" if q_start == 0 else f"chunk [{q_start},{seq_len})"
    name = (f"hd{head_dim} {n_heads}/{n_kv_heads} heads S={seq_len} {part}{'' if causal else ' non-causal'}"
            f"{_window_name(window)}")
    return Case("chunked_attention", name, dtype,
                lambda: chunked_attention_fwd(q, kv, kv, q_start, causal, head_dim ** -0.5, *window))


def _varlen_attention_case(dtype, head_dim, n_heads, n_kv_heads, batch, total_q, kv_capacity, block_size,
                           causal=True, window=(-1, -1)):
    """``batch`` sequences of ``total_q`` queries in all, each over up to ``kv_capacity`` keys: a contiguous
    (batch, kv_capacity, ...) cache for ``block_size`` None, else pages of ``block_size`` through a block table
    (the launch reads no index values, so meta tensors stand for them); ``window``: the sliding window."""
    from triton_ops.chunked_attention_varlen import chunked_attention_varlen_fwd

    q = _meta(total_q, n_heads, head_dim, dtype=dtype)
    index = _meta(batch + 1, dtype=torch.int32), _meta(batch, dtype=torch.int32)
    if block_size is None:
        kv, block_table, cache = _meta(batch, kv_capacity, n_kv_heads, head_dim, dtype=dtype), None, "contiguous"
    else:
        blocks_per_seq = -(-kv_capacity // block_size)
        kv = _meta(batch * blocks_per_seq, block_size, n_kv_heads, head_dim, dtype=dtype)
        block_table, cache = _meta(batch, blocks_per_seq, dtype=torch.int32), f"pages of {block_size}"
    name = (f"hd{head_dim} {n_heads}/{n_kv_heads} heads {batch} seqs {total_q} queries over <={kv_capacity} keys, "
            f"{cache}{'' if causal else ' non-causal'}{_window_name(window)}")
    return Case("chunked_attention_varlen", name, dtype,
                lambda: chunked_attention_varlen_fwd(q, kv, kv, *index, block_table, causal, head_dim ** -0.5,
                                                     *window))


# Llama-2/3-70B (hidden 8192, intermediate 28672) row-parallel GEMMs: (label, N, K) at TP 4 and 8.
LLAMA_70B_ROW_PARALLEL = [("o_proj TP4", 8192, 2048), ("down_proj TP4", 8192, 7168),
                          ("o_proj TP8", 8192, 1024), ("down_proj TP8", 8192, 3584)]


def _gemm_case(dtype, label, n, k, m, rows_per_signal, tf32=False):
    from triton_ops.gemm_signal import gemm_signal

    x, weight = _meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype)
    signal = None if rows_per_signal is None else _meta(-(-m // rows_per_signal), dtype=torch.int32)
    signal_name = "no signal" if signal is None else f"rows_per_signal={rows_per_signal}"
    return Case("gemm_signal", f"{label} M={m} {signal_name}{' tf32' if tf32 else ''}", dtype,
                lambda: gemm_signal(x, weight, signal, rows_per_signal or 128), tf32)


def _norm_case(dtype, hidden, rows, residual):
    from triton_ops.add_rms_norm import add_rms_norm

    x = _meta(rows, hidden, dtype=dtype)
    return Case("add_rms_norm", f"hidden={hidden} rows={rows}{' + residual' if residual else ''}", dtype,
                lambda: add_rms_norm(x, x if residual else None, _meta(hidden, dtype=dtype), 1e-5))


def _merge_case(dtype, head_dim, n_heads, q_len):
    from triton_ops.merge_attention_states import merge_attention_states

    out = _meta(1, q_len, n_heads, head_dim, dtype=dtype)
    lse = _meta(1, n_heads, q_len, dtype=torch.float32)
    return Case("merge_attention_states", f"hd{head_dim} {n_heads} heads q_len={q_len}", dtype,
                lambda: merge_attention_states(out, lse, out, lse))


# Mixture-of-experts blocks per rank, every expert's intermediate dimension sharded: (label, hidden, inter per
# rank, experts, top_k). Mixtral-8x22B (inter 16384) and Qwen3-235B-A22B (moe inter 1536) at TP 8; in the full
# matrix also Mixtral-8x7B (inter 14336) at TP 2 and Qwen3-30B-A3B (hidden 2048, moe inter 768) at TP 4.
MOE_MAIN = [("Mixtral-8x22B TP8", 6144, 16384 // 8, 8, 2), ("Qwen3-235B-A22B TP8", 4096, 1536 // 8, 128, 8)]
MOE_MORE = [("Mixtral-8x7B TP2", 4096, 14336 // 2, 8, 2), ("Qwen3-30B-A3B TP4", 2048, 768 // 4, 128, 8)]


def _moe_cases(dtype, label, hidden, inter, experts, top_k, tokens):
    """The two kernels of one MoE launch, a case each through its phase's launcher, on the blocks the launch
    aligns the tokens to (BLOCK_M as the launch chooses it, named in the case)."""
    from triton_ops.moe_experts import align_blocks, block_m_for, moe_experts_down, moe_experts_gate_up

    block_m = block_m_for(tokens * top_k, experts, dtype)
    ids, weights = _meta(tokens, top_k, dtype=torch.int64), _meta(tokens, top_k, dtype=torch.float32)
    sorted_pairs, block_expert = align_blocks(ids, experts, block_m)
    x, h = _meta(tokens, hidden, dtype=dtype), _meta(block_expert.shape[0] * block_m, inter, dtype=dtype)
    w_gate_up, w_down = _meta(experts, 2 * inter, hidden, dtype=dtype), _meta(experts, hidden, inter, dtype=dtype)
    name = f"{label} {experts} experts top{top_k} tokens={tokens} BLOCK_M={block_m}"

    def gate_up():
        moe_experts_gate_up(x, w_gate_up, sorted_pairs, block_expert, top_k, block_m)

    def down():
        moe_experts_down(h, w_down, weights, sorted_pairs, block_expert, block_m)

    return [Case("moe_experts_gate_up", name, dtype, gate_up), Case("moe_experts_down", name, dtype, down)]


# A sliding window's sides (left, right): Gemma 3's local layers (1024 keys back; the right side is moot when
# causal). The window is a runtime argument, so any size compiles the same kernel.
SLIDING_WINDOW = (1024, -1)


def cases(matrix="main"):
    """``main``: the shapes of a Llama-70B-class ISO prefill in bf16 (and fp32's exact path), and each attention
    kernel under a sliding window — what the default test suite checks. ``full``: every dtype, head_dim
    64/128/256, causal and not, windowed and not, 4k-16k tokens with ISO chunk boundaries that are not multiples
    of 16, all row-parallel GEMMs and signal sizes."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if matrix == "main":
        return [
            _attention_case(bf16, 128, 8, 1, 4096, 1536),  # 70B at TP8: 64/8 heads -> 8/1 per rank
            _attention_case(bf16, 64, 32, 8, 4096, 1536),
            _attention_case(fp32, 128, 8, 1, 4096, 1536),
            _attention_case(bf16, 128, 8, 1, 4096, 1536, window=SLIDING_WINDOW),
            _varlen_attention_case(bf16, 128, 8, 1, 16, 4096, 8192, None),
            _varlen_attention_case(bf16, 128, 8, 1, 16, 4096, 8192, 16),
            _varlen_attention_case(fp32, 128, 8, 1, 16, 4096, 8192, 16),
            _varlen_attention_case(bf16, 128, 8, 1, 16, 4096, 8192, 16, window=SLIDING_WINDOW),
            _gemm_case(bf16, "o_proj TP8", 8192, 1024, 4096, None),
            _gemm_case(bf16, "down_proj TP4", 8192, 7168, 4096, 128),
            _gemm_case(fp32, "o_proj TP8", 8192, 1024, 4096, None),
            _norm_case(bf16, 8192, 4096, residual=True),
            _merge_case(bf16, 128, 8, 2560),
            *[case for shard in MOE_MAIN for case in _moe_cases(bf16, *shard, 4096)],
            *_moe_cases(fp32, *MOE_MAIN[0], 4096),
        ]
    if matrix != "full":
        raise ValueError(f"matrix must be 'main' or 'full', got {matrix!r}")
    found = []
    for dtype in (fp16, bf16, fp32):
        for head_dim, n_heads, n_kv_heads in ((64, 32, 8), (128, 8, 1), (256, 16, 8)):
            for seq_len, q_start in ((4096, 0), (4096, 1536), (16384, 7001)):
                found.append(_attention_case(dtype, head_dim, n_heads, n_kv_heads, seq_len, q_start))
            found.append(_attention_case(dtype, head_dim, n_heads, n_kv_heads, 4096, 0, causal=False))
            for block_size in (None, 16, 256):
                found.append(_varlen_attention_case(dtype, head_dim, n_heads, n_kv_heads, 16, 4096, 8192,
                                                    block_size))
            found.append(_varlen_attention_case(dtype, head_dim, n_heads, n_kv_heads, 16, 4096, 8192, 64,
                                                causal=False))
            found.append(_attention_case(dtype, head_dim, n_heads, n_kv_heads, 16384, 7001, window=SLIDING_WINDOW))
            found.append(_varlen_attention_case(dtype, head_dim, n_heads, n_kv_heads, 16, 4096, 8192, 16,
                                                causal=False, window=(SLIDING_WINDOW[0], 256)))
        for label, n, k in LLAMA_70B_ROW_PARALLEL:
            for m in (4096, 16384, 9383):
                found.append(_gemm_case(dtype, label, n, k, m, None))
            for rows_per_signal in (16, 128, 1000):
                found.append(_gemm_case(dtype, label, n, k, 9383, rows_per_signal))
        for hidden in (4096, 8192):
            found += [_norm_case(dtype, hidden, 4096, residual) for residual in (False, True)]
        found += [_merge_case(dtype, head_dim, 8, 9383) for head_dim in (64, 128, 256)]
        found += [case for shard in MOE_MAIN + MOE_MORE for tokens in (16, 1000, 9383)
                  for case in _moe_cases(dtype, *shard, tokens)]
    found += [_gemm_case(fp32, label, n, k, 4096, 128, tf32=True) for label, n, k in LLAMA_70B_ROW_PARALLEL]
    return found


# --- one row per compiled config ---
@dataclass
class Row:
    triton: str
    arch: int
    kernel: str
    case: str
    dtype: str
    config: str
    num_warps: int
    num_stages: int
    kept: bool
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    shared_limit: int
    tensor_core_op: str  # HGMMA (wgmma), HMMA (mma.sync) or none
    sass: str  # JSON: counts of SASS_OPCODES and the total


def _ptxas_numbers(log):
    """(registers, stack frame, spill stores, spill loads) from ptxas -v."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if frame is None or registers is None:
        raise RuntimeError(f"no ptxas register report in the kernel's metadata:\n{log}")
    return int(registers[1]), int(frame[1]), int(frame[2]), int(frame[3])


def _sass_mix(cubin):
    sass = _cuobjdump(cubin, "-sass")
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = {op: sum(1 for o in opcodes if o == op) for op in SASS_OPCODES}
    counts["total"] = len(opcodes)
    return counts


def _config_key(num_warps, num_stages, meta):
    return num_warps, num_stages, tuple(sorted(meta.items()))


def _compiled_config(kernel, meta_names):
    constants = {kernel.src.fn.arg_names[path[0]]: value for path, value in kernel.src.constants.items()}
    meta = {name: constants[name] for name in meta_names if name in constants}
    return _config_key(kernel.metadata.num_warps, kernel.metadata.num_stages, meta), meta


def _jit_functions():
    """(autotuner or None, jit function) of every kernel a case may launch."""
    from triton.runtime.autotuner import Autotuner

    from triton_ops import (
        add_rms_norm,
        chunked_attention,
        chunked_attention_varlen,
        gemm_signal,
        merge_attention_states,
        moe_experts,
    )

    kernels = [chunked_attention._chunked_attention_fwd_kernel,
               chunked_attention_varlen._chunked_attention_varlen_fwd_kernel, gemm_signal._gemm_signal_kernel,
               add_rms_norm._add_rms_norm_kernel, merge_attention_states._merge_attention_states_kernel,
               moe_experts._moe_experts_gate_up_kernel, moe_experts._moe_experts_down_kernel]
    return [(k, k.fn) if isinstance(k, Autotuner) else (None, k) for k in kernels]


def _cached_kernels(jit_fn):
    caches = jit_fn.device_caches
    return dict(caches[0][0]) if 0 in caches else {}


def _run_case(case, driver, kernels):
    """Launch one case; return its rows (one per config compiled for it)."""
    import triton

    kept_configs = {}
    for tuner, jit_fn in kernels:
        # Every case binds and prunes afresh (compiles come from Triton's disk cache after the first run), so
        # its rows are exactly the configs its own launch compiled.
        jit_fn.device_caches.clear()
        if tuner is not None:
            tuner.cache.clear()
            # The no-op launches time every config alike: keep such results out of Triton's autotune cache on
            # disk, where a real run on the same architecture (--arch native) would take them for its own.
            tuner.cache_results = False
            prune_configs = type(tuner).prune_configs

            def capture(kwargs, tuner=tuner, prune=prune_configs):
                pruned = prune(tuner, kwargs)
                kept_configs[tuner] = {_config_key(c.num_warps, c.num_stages, c.kwargs) for c in pruned}
                return pruned

            tuner.prune_configs = capture
    precision = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if case.tf32 else "ieee"
    try:
        case.launch()
    finally:
        torch.backends.cuda.matmul.fp32_precision = precision
        for tuner, _ in kernels:
            if tuner is not None:
                del tuner.prune_configs
    rows = []
    for tuner, jit_fn in kernels:
        meta_names = tuner.configs[0].kwargs.keys() if tuner is not None else ()
        for kernel in _cached_kernels(jit_fn).values():
            key, meta = _compiled_config(kernel, meta_names)
            # A single-config kernel, or an autotuner whose one config skipped pruning, keeps what it ran.
            kept = tuner not in kept_configs or key in kept_configs[tuner]
            rows.append(_row(case, driver, kernel, meta, kept, triton.__version__))
    return rows


def _row(case, driver, kernel, meta, kept, triton_version):
    registers, stack, spill_stores, spill_loads = _ptxas_numbers(getattr(kernel.metadata, "ptxas_log", ""))
    sass = _sass_mix(kernel.asm["cubin"])
    tensor_core_op = "HGMMA" if sass["HGMMA"] else "HMMA" if sass["HMMA"] else "none"
    return Row(
        triton=triton_version, arch=driver.target.arch, kernel=case.kernel, case=case.name,
        dtype=str(case.dtype).removeprefix("torch."), config=" ".join(f"{k}={v}" for k, v in sorted(meta.items())),
        num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages, kept=kept,
        registers=registers, stack_bytes=stack, spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
        shared_bytes=kernel.metadata.shared, shared_limit=driver.shared_limit,
        tensor_core_op=tensor_core_op, sass=json.dumps(sass, sort_keys=True),
    )


def default_cache_dir():
    import triton

    return str(envs.compile_cache_dir() / f"triton-{triton.__version__}-v{_CACHE_SCHEMA}")


def report_arch(arch, matrix="main", all_candidates=False):
    """Rows for one architecture (an int compute capability, or "native" for the local GPU), in this
    process, of the candidates launches compile there, or of every candidate with ``all_candidates``. Must run
    in a process that has not launched Triton kernels for another target."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset: interpreted kernels do not compile")
    os.environ.setdefault("TRITON_CACHE_DIR", default_cache_dir())
    import triton

    _keep_ptxas_log_in_metadata()
    if arch == "native":
        if not torch.cuda.is_available():
            raise RuntimeError("--arch native needs a CUDA device")
        major, minor = torch.cuda.get_device_capability()
        properties = torch.cuda.get_device_properties()
        driver = CompileOnlyDriver(10 * major + minor, properties.shared_memory_per_block_optin,
                                   properties.multi_processor_count)
    else:
        driver = CompileOnlyDriver(int(arch))
    triton.runtime.driver.set_active(driver)
    from triton_ops import _config

    _config.PER_ARCH_CANDIDATES = not all_candidates
    _config.COMPILE_THREADS = 1  # the ptxas log of each compile comes through this process's stdout
    kernels = _jit_functions()
    rows = []
    for case in cases(matrix):
        rows += _run_case(case, driver, kernels)
    return rows


def _report_arch_in_child(arch, matrix, all_candidates):
    return [asdict(row) for row in report_arch(arch, matrix, all_candidates)]


def report(archs, matrix="main", jobs=2, all_candidates=False):
    """Rows for every arch in ``archs``, each compiled in its own process, ``jobs`` at a time."""
    if archs == ["native"]:
        return [asdict(row) for row in report_arch("native", matrix, all_candidates)]
    import multiprocessing

    # A fresh process per architecture (maxtasksperchild=1), never a worker that compiled for another: Triton
    # keeps the first device properties it reads per device ordinal (compiler.max_shared_mem is an lru_cache),
    # so a third architecture in a reused worker was judged against the shared memory of the worker's first.
    with multiprocessing.get_context("spawn").Pool(max(1, min(jobs, len(archs))), maxtasksperchild=1) as pool:
        per_arch = pool.starmap(_report_arch_in_child, [(arch, matrix, all_candidates) for arch in archs])
    return [row for rows in per_arch for row in rows]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Row)])
        writer.writeheader()
        writer.writerows(rows)


def summary(rows):
    """Per kernel, arch and dtype, over the kept configs: the registers, shared memory, stages and spills
    range, and the tensor-core op."""
    groups = {}
    for row in rows:
        if row["kept"]:
            groups.setdefault((row["kernel"], row["arch"], row["dtype"]), []).append(row)
    lines = [f"{'kernel':<24}{'arch':>5} {'dtype':<9}{'kept':>5}{'regs':>9}{'smem KiB':>14}{'stages':>8}"
             f"{'max spill B':>12}  tensor cores"]
    for (kernel, arch, dtype), kept in sorted(groups.items()):
        regs = sorted({r["registers"] for r in kept})
        smem = sorted({r["shared_bytes"] // 1024 for r in kept})
        stages = sorted({r["num_stages"] for r in kept})
        ops = "/".join(sorted({r["tensor_core_op"] for r in kept}))
        lines.append(f"{kernel:<24}{arch:>5} {dtype:<9}{len(kept):>5}{_span(regs):>9}{_span(smem):>14}"
                     f"{_span(stages):>8}{max(r['spill_store_bytes'] for r in kept):>12}  {ops}")
    return "\n".join(lines)


def _span(values):
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=",".join(map(str, GPU_ARCHS)),
                        help="compute capabilities to compile for, comma-separated (default %(default)s: "
                             f"{', '.join(arch.name for arch in GPU_ARCHS.values())}), or 'native' for this "
                             "machine's GPU")
    parser.add_argument("--matrix", choices=("main", "full"), default="main",
                        help="main: a Llama-70B-class bf16 prefill's shapes; full: every dtype, head_dim and shape")
    parser.add_argument("--csv", help="write one row per compiled config to this file")
    parser.add_argument("--jobs", type=int, default=2, help="architectures compiled at once, one process each")
    parser.add_argument("--all-candidates", action="store_true",
                        help="also compile the candidates an architecture's list leaves out as never kept there")


def run(args: argparse.Namespace) -> int:
    archs = ["native"] if args.arch == "native" else [a.strip() for a in args.arch.split(",") if a.strip()]
    for arch in archs:
        if arch != "native" and (not arch.isdigit() or int(arch) not in GPU_ARCHS):
            raise ValueError(f"--arch: {arch!r} is not one of {sorted(GPU_ARCHS)} or 'native'")
    rows = report(archs, args.matrix, args.jobs, args.all_candidates)
    if args.csv:
        write_csv(rows, args.csv)
    print(summary(rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.compile_report",
                                     description="Compile every Triton kernel for sm_80/89/90 without a GPU (or for "
                                                 "this GPU: --arch native) and report registers, spills, shared "
                                                 "memory and the SASS instruction mix per compiled config.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    one_line_warnings()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
