"""``gemm_signal``: ``x @ weight.T`` whose output tiles announce themselves, per row group, on int32
counters, so that another stream can all-reduce finished rows while the GEMM still runs. On CUDA tensors
the custom op runs the Triton kernel; on CPU tensors the reference, which writes the final counts."""

import torch

from .. import reference
from ._checks import check_same_device, check_tensor

_INT32_MAX = 2**31 - 1


# --- custom op: CUDA runs the Triton kernel, CPU the reference ---
@torch.library.custom_op("iso_kernels::gemm_signal", mutates_args=("signal",), device_types="cuda")
def _gemm_signal(x: torch.Tensor, weight: torch.Tensor, signal: torch.Tensor | None,
                 rows_per_signal: int) -> torch.Tensor:
    from triton_ops.gemm_signal import gemm_signal as launch

    return launch(x, weight, signal, rows_per_signal)


@_gemm_signal.register_kernel("cpu")
def _(x, weight, signal, rows_per_signal):
    out = reference.gemm_ref(x, weight)
    if signal is not None:
        signal.copy_(reference.gemm_signal_counts_ref(x.shape[0], weight.shape[0], rows_per_signal))
    return out


@_gemm_signal.register_fake
def _(x, weight, signal, rows_per_signal):
    return x.new_empty((x.shape[0], weight.shape[0]))


# --- validation ---
def _check_groups(m, n, rows_per_signal):
    if isinstance(rows_per_signal, bool) or not isinstance(rows_per_signal, int):
        raise TypeError(f"rows_per_signal must be an int, got {type(rows_per_signal).__name__}")
    if rows_per_signal <= 0:
        raise ValueError(f"rows_per_signal must be positive, got {rows_per_signal}")
    if min(m, rows_per_signal) * n > _INT32_MAX:
        raise ValueError(f"rows_per_signal={rows_per_signal} with N={n} overflows an int32 counter")


def _check_gemm_signal(x, weight, signal, rows_per_signal):
    check_tensor("x", x, ndim=2, layout="(M, K)")
    check_tensor("weight", weight, ndim=2, layout="(N, K)")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (N, K) with K = x.shape[1] = {x.shape[1]}, got {tuple(weight.shape)}")
    check_same_device("x", x, weight=weight)
    m = x.shape[0]
    _check_groups(m, weight.shape[0], rows_per_signal)
    if signal is None:
        return
    if not isinstance(signal, torch.Tensor):
        raise TypeError(f"signal must be a torch.Tensor or None, got {type(signal).__name__}")
    groups = -(-m // rows_per_signal)
    if signal.dtype != torch.int32:
        raise ValueError(f"signal dtype must be torch.int32, got {signal.dtype}")
    if signal.shape != (groups,):
        raise ValueError(f"signal must have shape ({groups},) = ceil(M / rows_per_signal), "
                         f"got {tuple(signal.shape)}")
    check_same_device("x", x, signal=signal)
    if not signal.is_contiguous():
        raise ValueError("signal must be contiguous")


# --- public functions ---
def gemm_signal(x: torch.Tensor, weight: torch.Tensor, signal: torch.Tensor | None = None, *,
                rows_per_signal: int = 128) -> torch.Tensor:
    """``x @ weight.T`` (the F.linear layout) that counts finished output per row group.

    x: (M, K); weight: (N, K); both fp16, bf16 or fp32, same dtype and device. Returns (M, N) in x's dtype.
    fp32 uses TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` lets torch.matmul do so.

    signal: None, or int32 (ceil(M / rows_per_signal),) on x's device. Row group g holds rows
    ``[g * rows_per_signal, min((g + 1) * rows_per_signal, M))``; every output tile, once stored,
    release-adds (gpu scope) the number of elements it stored to its group's counter, so group g is
    complete exactly when ``signal[g] == signal_targets(M, N, rows_per_signal)[g]`` (rows_in_group * N),
    whatever tiles the autotuner chose. Tiles are issued rows-first, so early row groups finish first.
    rows_per_signal: any positive int; it does not shape the tiles (a tile that holds rows of several groups
    adds to each the elements it stored there), so small groups keep the tensor-core tiles.

    Counter contract (reuse without a generation count):
      * This call first zeroes ``signal`` on the current stream, then launches the GEMM on it, so a buffer
        left at its targets by an earlier call ends at exactly the new targets, never above them.
      * A waiter must read ``signal`` only after that zero in stream order, or it may take the old targets
        for this call's. To overlap a waiter with the GEMM: ``signal.zero_()`` on the current stream,
        record an event, call ``gemm_signal`` (its own zero rewrites zeros, which no waiter misreads), then
        on the waiter's stream wait on the event and enqueue the wait (acquire loads until the target)
        and the consumer of the rows.
      * The caller must order any waiter of an earlier call on the same buffer before this call (e.g. the
        compute stream waits on the all-reduce that followed it), or the zero can hide that call's targets.
      * On a GPU the first call for a new (M, N, K, rows_per_signal, dtype) autotunes: it runs the kernel
        once per candidate config, re-zeroing in between. Warm each shape up before overlapping a waiter.
    On CPU (the reference path) ``signal`` receives the final targets, the same end state.
    """
    _check_gemm_signal(x, weight, signal, rows_per_signal)
    return _gemm_signal(x, weight, signal, rows_per_signal)


def signal_targets(m: int, n: int, rows_per_signal: int = 128, *,
                   device: torch.device | str | int | None = None) -> torch.Tensor:
    """int32 (ceil(m / rows_per_signal),): the value each counter of ``gemm_signal`` holds once its row
    group is stored, ``rows_in_group * n``; what a stream-side wait compares against."""
    if m < 0 or n < 0:
        raise ValueError(f"m and n must be >= 0, got m={m}, n={n}")
    _check_groups(m, n, rows_per_signal)
    return reference.gemm_signal_counts_ref(m, n, rows_per_signal).to(device)
