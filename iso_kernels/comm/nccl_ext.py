"""``nccl-ext``: all-reduce through ``iso_kernels._C`` — NCCL on a dedicated comm stream, optionally started
by a device flag that a producer kernel (``iso_kernels.ops.gemm_signal``) raises as its rows finish.

Stream protocol of ``all_reduce_start(tensor, ready_flag=None, after=None)``:
  * the comm stream waits (CUDA event, no host block) for the caller's current stream: all work enqueued
    there so far precedes the collective. With ``after`` (a ``torch.cuda.Event`` recorded on the caller's
    stream *before* the producer was launched) it waits for that event instead, so the collective can run
    beside the producer's tail;
  * with ``ready_flag=(signal, index, target)`` a one-thread kernel then holds the comm stream until
    ``signal[index] >= target`` (acquire load; the producer release-adds), bounded by ``flag_timeout_s``;
  * NCCL sums ``tensor`` in place; ``tensor.record_stream(comm stream)`` keeps the caching allocator from
    reusing its memory before that ends; ``wait()`` makes the then-current stream wait for this collective
    only (its own completion event), not for collectives started after it; ``events`` holds CUDA events at
    the collective's start (after any flag wait) and end, for timelines.

``after`` without ``ready_flag`` is refused: nothing would then order the collective after its data.
The flag protocol for ``gemm_signal`` is stated in its docstring: zero ``signal`` on the current stream,
record ``after``, launch ``gemm_signal``, then ``all_reduce_start(rows, ready_flag=..., after=after)``.

The comm stream is a ``torch.cuda.Stream`` that this object keeps (torch never destroys its streams), so
tensors recorded on it may be freed after ``close()``.

Failures: a flag wait that times out lets its collective run on incomplete data, and an NCCL error is
asynchronous; neither is raised where it happens (the host is far ahead, and a rank raising alone would
issue fewer collectives than its peers). ``settle()`` — called by every rank after a prefill — waits for the
comm stream (bounded), checks, agrees across the group and, when any rank failed, aborts the communicator
on every rank and raises one ``CommFailure`` naming each failed rank and its cause. Every blocking native
call (init, a collective's connection handshake, synchronize, finalize) is bounded by ``timeout_s``: past it
the communicator is aborted and the call raises.
"""

import math

import torch
import torch.distributed as dist

from .. import _ext, envs
from .base import CommFailure, Communicator, PendingAllReduce, agree_on_status

# A producer normally raises its flag within milliseconds; seconds means it never will (lost launch, wrong
# target, or CUDA lazy loading that cannot load the producer while the wait kernel runs). Generous, so a
# slow first call is not mistaken for a hang.
DEFAULT_FLAG_TIMEOUT_S = 5.0
# Bound on every blocking native call (joining the ranks, a first collective's handshake, waiting for the comm
# stream, finalize): the default of torch.distributed's NCCL process groups, 10 minutes. Override per
# communicator (timeout_s=) or process-wide with $ISO_KERNELS_COMM_TIMEOUT_S (seconds).
DEFAULT_TIMEOUT_S = 600.0


def comm_timeout_s(timeout_s: float | None = None, *, flag_timeout_s: float = DEFAULT_FLAG_TIMEOUT_S) -> float:
    """The watchdog bound in seconds: ``timeout_s``, else $ISO_KERNELS_COMM_TIMEOUT_S, else DEFAULT_TIMEOUT_S.

    It must exceed ``flag_timeout_s``: a flag wait that gives up reports its timeout only if the watchdog
    waiting for the comm stream outlasts it.
    """
    source = "timeout_s"
    if timeout_s is None:
        text = envs.comm_timeout_text()
        source, timeout_s = (envs.COMM_TIMEOUT_VAR, text) if text else ("DEFAULT_TIMEOUT_S", DEFAULT_TIMEOUT_S)
    try:
        value = float(timeout_s)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a number of seconds, got {timeout_s!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source} must be a positive, finite number of seconds, got {timeout_s!r}")
    if not value > flag_timeout_s:
        raise ValueError(f"{source}={value:g} must exceed flag_timeout_s={flag_timeout_s:g}: the watchdog would "
                         "abort before a timed-out flag wait could report")
    return value


def nccl_ext_unavailable_reason(device: torch.device | str, group: dist.ProcessGroup | None = None, *,
                                world_size: int | None = None) -> str | None:
    """Why the ``nccl-ext`` communicator cannot start on this rank for ``device`` and ``group``, or None.

    Pure: reads the environment, ``_ext`` and torch's device/process-group state; creates nothing. Ranks can
    differ (a driver, a device): ``agreed_unavailable_reason`` makes one answer for the group.
    """
    if envs.native_comm_disabled():
        return f"disabled by {envs.DISABLE_NATIVE_COMM_VAR}"
    native = _ext.load()
    if native is None:
        return f"the native extension iso_kernels._C is unavailable: {_ext.ext_reason()}"
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device (NCCL works on CUDA tensors only)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if native.device_count() == 0:
        info = native.build_info()
        return (f"iso_kernels._C sees no CUDA device although torch does: its static CUDA runtime "
                f"{info['cuda_runtime']} needs a newer driver than this one ({info['driver']}; CUDA 13 needs "
                "r580+); rebuild _C with the toolkit torch uses")
    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialised (the NCCL id is shared through the process group)"
    group_size = dist.get_world_size(group)
    if world_size is not None and world_size != group_size:
        return f"world_size={world_size} does not match the process group's size {group_size}"
    return None


def agreed_unavailable_reason(device: torch.device | str, group: dist.ProcessGroup | None = None, *,
                              world_size: int | None = None) -> str | None:
    """``nccl_ext_unavailable_reason`` for the whole group: None only when every rank can start nccl-ext,
    else every rank's reason ("rank R: ..."), the same string on every rank. Collective over ``group``."""
    local = nccl_ext_unavailable_reason(device, group, world_size=world_size)
    if not dist.is_available() or not dist.is_initialized():
        return local  # no group to agree with (and the reason says so)
    reasons = [None] * dist.get_world_size(group)
    dist.all_gather_object(reasons, local, group=group)
    failing = {rank: reason for rank, reason in enumerate(reasons) if reason is not None}
    if not failing:
        return None
    if len(set(failing.values())) == 1 and len(failing) == len(reasons):
        return next(iter(failing.values()))  # one reason everywhere: say it once
    return "; ".join(f"rank {rank}: {reason}" for rank, reason in failing.items())


def highest_stream_priority(device: torch.device | str) -> int:
    """The device's greatest stream priority (CUDA: lower numbers run first), e.g. -5 on H100."""
    native = _ext.load()
    return native.stream_priority_range(torch.device(device).index)[1]


class NcclExtCommunicator(Communicator):
    """One NCCL communicator per rank of ``group`` on ``torch.cuda.current_device()``, built by ``_C``.

    Rank 0 of ``group`` makes the NCCL unique id and broadcasts it over ``group`` (any backend). Collective:
    every rank constructs it; when any rank cannot, every rank raises the same error.
    ``stream_priority``: the comm stream's CUDA priority; default (None) the device's highest, so NCCL's blocks
    are scheduled ahead of the compute stream's queued GEMM blocks instead of behind them (torch maps a value
    outside its stream pool's range to the nearest one it has). ``flag_timeout_s``: bound on each flag wait.
    ``timeout_s``: bound on every blocking native call (``comm_timeout_s``: default 600 s, or
    $ISO_KERNELS_COMM_TIMEOUT_S).
    """

    name = "nccl-ext"
    supports_ready_flag = True

    def __init__(self, group: dist.ProcessGroup | None = None, *, world_size: int | None = None,
                 stream_priority: int | None = None, flag_timeout_s: float = DEFAULT_FLAG_TIMEOUT_S,
                 timeout_s: float | None = None):
        self._comm = None
        if not flag_timeout_s > 0:
            raise ValueError(f"flag_timeout_s must be positive, got {flag_timeout_s}")
        timeout_s = comm_timeout_s(timeout_s, flag_timeout_s=flag_timeout_s)
        reason = agreed_unavailable_reason("cuda", group, world_size=world_size)
        if reason is not None:
            raise RuntimeError(f"the nccl-ext communicator cannot start: {reason}")
        super().__init__(group, world_size=world_size)
        native = _ext.load()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_s = timeout_s
        self._flag_timeout_ns = int(flag_timeout_s * 1e9)
        self._dtypes = {torch.float16: native.DataType.float16, torch.bfloat16: native.DataType.bfloat16,
                        torch.float32: native.DataType.float32}
        if stream_priority is None:
            stream_priority = highest_stream_priority(self.device)
        # torch owns the stream: it outlives this communicator and every tensor recorded on it.
        self.comm_stream = torch.cuda.Stream(device=self.device, priority=stream_priority)
        unique_id = [native.nccl_unique_id() if self.rank == 0 else None]
        root = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
        dist.broadcast_object_list(unique_id, src=root, group=group)
        self._comm = native.OverlapComm(unique_id[0], self.world_size, self.rank, self.device.index,
                                        self.comm_stream.cuda_stream, int(timeout_s * 1e9))

    def all_reduce_start(self, tensor: torch.Tensor, *, ready_flag: tuple[torch.Tensor, int, int] | None = None,
                         after: torch.cuda.Event | None = None) -> PendingAllReduce:
        self._check_tensor(tensor)
        if tensor.device != self.device:
            raise ValueError(f"tensor is on {tensor.device}, but this communicator works on {self.device}")
        if ready_flag is not None:
            signal, index, target = ready_flag
            self._check_ready_flag(signal, index, target)
            if signal.device != self.device or not signal.is_contiguous():
                raise ValueError(f"ready_flag[0] (signal) must be contiguous on {self.device}, "
                                 f"got {signal.device} (contiguous={signal.is_contiguous()})")
        if after is not None and ready_flag is None:
            raise ValueError("after= needs ready_flag=: without the flag nothing orders the collective after "
                             "the producer that follows the event")
        if after is not None and not isinstance(after, torch.cuda.Event):
            raise TypeError(f"after must be a torch.cuda.Event, got {type(after).__name__}")
        # No status check here: a rank that raised on its own flag timeout would issue fewer collectives than
        # its peers. Failures are raised, by every rank together, at settle().
        comm = self._open()

        if after is None:
            comm.comm_wait_for(torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.comm_stream.wait_event(after)
        if ready_flag is not None:
            comm.wait_flag(signal.data_ptr() + index * signal.element_size(), target, self._flag_timeout_ns)
            signal.record_stream(self.comm_stream)
        # One event pair per collective: a wait long after the start, with many row-group collectives in
        # between, must still wait for this collective only. Timing events (a timeline's intervals) only
        # outside a CUDA graph's capture, where no timeline runs.
        timing = not torch.cuda.is_current_stream_capturing()
        started, done = torch.cuda.Event(enable_timing=timing), torch.cuda.Event(enable_timing=timing)
        started.record(self.comm_stream)
        if tensor.numel() > 0:
            comm.all_reduce(tensor.data_ptr(), tensor.numel(), self._dtypes[tensor.dtype])
        done.record(self.comm_stream)
        tensor.record_stream(self.comm_stream)
        pending = PendingAllReduce(tensor, lambda: torch.cuda.current_stream(self.device).wait_event(done))
        pending.events = (started, done) if timing else None
        return pending

    def synchronize(self) -> None:
        """Block the host (at most ``timeout_s``) until every collective issued so far has finished; raise on
        a timed-out flag wait or an NCCL error, on this rank only (``settle()`` is the collective version)."""
        self._open().synchronize()

    def settle(self) -> None:
        """Collective: wait for this rank's collectives (bounded), check them, and agree with the group. When
        any rank failed, every rank aborts its communicator and raises the same ``CommFailure``. It blocks the
        host, so not inside CUDA-graph capture."""
        local_error = None
        try:
            self.synchronize()
        except RuntimeError as exc:
            # Abort before agreeing: a collective of ours still stuck must not hold up the peers.
            local_error = str(exc) + self._abort_noting_errors()
        try:
            agree_on_status(local_error, self.group, what=f"the {self.name} communicator")
        except CommFailure:
            self._abort_noting_errors()
            raise

    def _abort_noting_errors(self):
        """abort(), turning its failure into a note for the error being raised anyway."""
        try:
            self.abort()
        except RuntimeError as exc:
            return f" (then abort failed too: {exc})"
        return ""

    def _open(self):
        if self._comm is None:
            raise RuntimeError("the nccl-ext communicator is closed")
        return self._comm

    def close(self) -> None:
        """Finish this rank's collectives and free the communicator (idempotent; each step bounded by
        ``timeout_s``); raises on a pending flag timeout after freeing."""
        comm, self._comm = self._comm, None
        if comm is None:
            return
        try:
            comm.synchronize()
        finally:
            comm.destroy()

    def abort(self) -> None:
        """Abort NCCL without waiting for peers (idempotent). Safe while another thread waits in
        ``synchronize()``/``close()``, which then raises."""
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.abort()
