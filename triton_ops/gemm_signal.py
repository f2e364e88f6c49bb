"""GEMM ``out = x @ weight.T`` that publishes its progress per row group.

After a program stores its output tile it release-adds the number of elements it stored to the int32
counter of the tile's row group (``rows_per_signal`` rows). A row group is complete exactly when its counter
reaches ``rows_in_group * N``, whatever tile sizes the autotuner picked, so another stream can start
communicating finished rows while the GEMM still runs. Inputs are validated by ``iso_kernels.ops``.
"""


import torch
import triton
import triton.language as tl

from . import _config

# --- configs ---
# 16-bit candidates, best first; ``_prune`` compiles each for the device and keeps those without spills and
# within its shared memory (``_config.keep_fitting``). Hopper: 128x256 and 128x128 with BLOCK_K=64 keep the
# tensor cores fed at 3-4 pipeline stages within 227 KiB; sm_89 (99 KiB) keeps only the <= 96 KiB pipelines
# (128x128 at 3 stages, 64x128 at 4); 64-row tiles give short chunks (M ~ 1k) enough programs for 132 SMs.
# GROUP_M=8 row tiles share each weight tile through L2, which matters once the weight outgrows L2
# (down_proj at TP4: 8192 x 7168 bf16 = 117 MB).
_CONFIGS_16BIT = [
    _config.config(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in [
        (128, 256, 8, 3), (128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 4, 4), (64, 256, 4, 3), (64, 128, 4, 4),
    ]
]
# No per-architecture list (``_config.arch_candidates``): every candidate is kept on every architecture by one
# Triton at least. Under 3.9 all six fit sm_80, 89 and 90 with and without a signal; 3.6 drops 128x256 on sm_89
# (and on sm_80 without a signal: 32-48 B frames) and, with a signal, 128x128 at 4 warps and 64x256 on sm_80/89
# (bench/results/compile_report_triton-3.6.0.csv and -3.9.0.csv, main matrix).
# fp32 (exact ieee dots on the FMA units unless torch allows TF32): operand tiles sit in registers, so only
# small tiles avoid spilling (128x128 spills 1.6-9.6 KB per thread); the first that fits is taken untuned.
_CONFIGS_FP32 = [
    _config.config(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, GROUP_M=8, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
]
# The interpreter's one config: GROUP_M=4 with the test shapes leaves a partial last group, which the
# tile-order mapping must handle; BLOCK_M=16 makes tiles straddle row groups whenever rows_per_signal is
# not a multiple of 16.
_INTERPRETER_CONFIG = _config.config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)


def _candidates(is_fp32, rows_per_signal=None):
    """The candidate configs for one dtype class. With a signal (``rows_per_signal`` given), GROUP_M row
    tiles finish together, so GROUP_M * BLOCK_M is capped at rows_per_signal: otherwise a group's counter
    would complete only when GROUP_M * BLOCK_M rows do, not rows_per_signal."""
    candidates = _CONFIGS_FP32 if is_fp32 else _CONFIGS_16BIT
    if rows_per_signal is None:
        return candidates
    return [triton.Config({**cfg.kwargs, "GROUP_M": max(1, min(cfg.kwargs["GROUP_M"],
                                                               rows_per_signal // cfg.kwargs["BLOCK_M"]))},
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            for cfg in candidates]


def _prune(configs, named_args, **kwargs):
    """The candidates of the input's dtype that fit this device (``_config.keep_fitting``)."""
    arguments = _config.launch_arguments(named_args, kwargs)
    is_fp32 = arguments["x_ptr"].dtype == torch.float32
    rows_per_signal = arguments["rows_per_signal"] if arguments["signal_ptr"] is not None else None
    return _config.keep_fitting(_gemm_signal_kernel.fn, _candidates(is_fp32, rows_per_signal), arguments,
                                first_fit=is_fp32)


def _zero_signal(named_args, reset_only=False):
    """Autotuning runs the kernel many times; each run must start from zeroed counters, and so must the
    final launch after tuning (Triton calls this with reset_only=True then)."""
    if named_args["signal_ptr"] is not None:
        named_args["signal_ptr"].zero_()


def _zero_signal_after_tuning(named_args, exception=None):
    """Tuning runs leave the counters at their targets; zero them in stream order before the real launch,
    so a flag waiter ordered after the caller's zeroing never sees a benchmark run's "done"."""
    _zero_signal(named_args)


# --- kernels ---
@triton.jit
def _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), grouped m-major: groups of GROUP_M row tiles are issued in row order,
    each column by column, so all N tiles of the first rows finish first and each weight tile is read
    once per group from DRAM."""
    tiles_per_group = GROUP_M * num_pid_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_height = tl.minimum(num_pid_m - first_m, GROUP_M)
    local = pid - group * tiles_per_group
    pid_m = first_m + local % group_height
    pid_n = local // group_height
    return pid_m, pid_n


@_config.autotune(
    configs=_CONFIGS_16BIT + _CONFIGS_FP32,
    # ISO chunks come in arbitrary lengths: tune once per power-of-two bucket of M, not per length.
    key=["M_bucket", "N", "K", "rows_per_signal", "HAS_SIGNAL"],
    prune_configs_by={"early_config_prune": _prune},
    pre_hook=_zero_signal,
    post_hook=_zero_signal_after_tuning,
)
# M and its bucket are not specialized either, so a new chunk length reuses the compiled kernels (Triton would
# compile a variant per "M == 1" and "M divisible by 16"): M only masks rows and counts row tiles, while the
# loads and stores vectorize along K and N, which stay specialized.
@triton.jit(do_not_specialize=["M", "M_bucket"])
def _gemm_signal_kernel(
    x_ptr, w_ptr, out_ptr, signal_ptr,
    M, N, K, rows_per_signal, M_bucket,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_SIGNAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- which tile ---
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # weight is (N, K): read it as a (BLOCK_K, BLOCK_N) tile of weight.T
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # --- main loop over K; the mask zero-fills the ragged last step ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # --- store the tile, then publish it ---
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if HAS_SIGNAL:
        # A tile may hold rows of several row groups (the group size does not shape the tiles): each group
        # gets the count of the elements stored in it. The releases are issued by one thread: the barrier
        # puts every thread's stores before them, and a release (cumulative at gpu scope) makes them visible
        # to whoever acquires the counter.
        row_start = pid_m * BLOCK_M
        row_end = tl.minimum(row_start + BLOCK_M, M)
        cols_stored = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N)
        tl.debug_barrier()
        for group in range(row_start // rows_per_signal, (row_end - 1) // rows_per_signal + 1):
            rows_stored = (tl.minimum(row_end, (group + 1) * rows_per_signal)
                           - tl.maximum(row_start, group * rows_per_signal))
            tl.atomic_add(signal_ptr + group, (rows_stored * cols_stored).to(tl.int32), sem="release", scope="gpu")


# --- launcher ---
def _torch_allows_tf32():
    """fp32 follows torch.matmul. ``fp32_precision`` (torch >= 2.9) reads under both of torch's APIs, while
    ``allow_tf32`` raises once a user has set the new one."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else torch.backends.cuda.matmul.allow_tf32


def gemm_signal(x, weight, signal=None, rows_per_signal=128):
    """``x @ weight.T`` -> (M, N) in x's dtype. x: (M, K), weight: (N, K), signal: int32 (ceil(M / rows),)
    or None. Zeroes ``signal`` on the current stream, then launches the GEMM on that stream."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if signal is not None:
        signal.zero_()
    if m == 0 or n == 0:
        return out
    tf32 = x.dtype != torch.float32 or _torch_allows_tf32()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _config.launch_tuned(
        _gemm_signal_kernel, grid, _INTERPRETER_CONFIG,
        x, weight, out, signal,
        m, n, k, rows_per_signal, triton.next_power_of_2(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_SIGNAL=signal is not None,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        DOT_F32=_config.interpreting() and x.dtype == torch.bfloat16,
    )
    return out
