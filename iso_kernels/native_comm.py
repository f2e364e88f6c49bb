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
A flag wait that times out is reported by the next ``all_reduce_start``/``wait()``/``close()`` as a
RuntimeError (the collective behind it ran on incomplete data).
"""

import os

import torch
import torch.distributed as dist

from . import _ext
from .comm import Communicator, PendingAllReduce, _check_ready_flag

# A producer normally raises its flag within milliseconds; seconds means it never will (lost launch, wrong
# target, or CUDA lazy loading that cannot load the producer while the wait kernel runs). Generous, so a
# slow first call is not mistaken for a hang.
DEFAULT_FLAG_TIMEOUT_S = 5.0


def nccl_ext_unavailable_reason(device, group=None, *, world_size=None):
    """Why the ``nccl-ext`` communicator cannot start for ``device`` and ``group``, or None when it can.

    Pure: reads the environment, ``_ext`` and torch's device/process-group state; creates nothing.
    """
    if os.environ.get("ISO_KERNELS_DISABLE_NATIVE_COMM", "0") not in ("", "0"):
        return "disabled by ISO_KERNELS_DISABLE_NATIVE_COMM"
    if _ext.load() is None:
        return f"the native extension iso_kernels._C is unavailable: {_ext.ext_reason()}"
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device (NCCL works on CUDA tensors only)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialised (the NCCL id is shared through the process group)"
    group_size = dist.get_world_size(group)
    if world_size is not None and world_size != group_size:
        return f"world_size={world_size} does not match the process group's size {group_size}"
    return None


class NcclExtCommunicator(Communicator):
    """One NCCL communicator per rank of ``group`` on ``torch.cuda.current_device()``, built by ``_C``.

    Rank 0 of ``group`` makes the NCCL unique id and broadcasts it over ``group`` (any backend).
    ``stream_priority``: the comm stream's CUDA priority (lower runs first; e.g. -1 to let collectives
    pre-empt compute blocks). ``flag_timeout_s``: bound on each flag wait.
    """

    name = "nccl-ext"
    supports_ready_flag = True

    def __init__(self, group=None, *, world_size=None, stream_priority=0,
                 flag_timeout_s=DEFAULT_FLAG_TIMEOUT_S):
        reason = nccl_ext_unavailable_reason("cuda", group, world_size=world_size)
        if reason is not None:
            raise RuntimeError(f"the nccl-ext communicator cannot start: {reason}")
        super().__init__(group, world_size=world_size)
        native = _ext.load()
        if not flag_timeout_s > 0:
            raise ValueError(f"flag_timeout_s must be positive, got {flag_timeout_s}")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._flag_timeout_ns = int(flag_timeout_s * 1e9)
        self._dtypes = {torch.float16: native.DataType.float16, torch.bfloat16: native.DataType.bfloat16,
                        torch.float32: native.DataType.float32}
        unique_id = [native.nccl_unique_id() if self.rank == 0 else None]
        root = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
        dist.broadcast_object_list(unique_id, src=root, group=group)
        self._comm = native.OverlapComm(unique_id[0], self.world_size, self.rank, self.device.index,
                                        stream_priority)
        self.comm_stream = torch.cuda.ExternalStream(self._comm.comm_stream, device=self.device)

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None) -> PendingAllReduce:
        self._check_tensor(tensor)
        if tensor.device != self.device:
            raise ValueError(f"tensor is on {tensor.device}, but this communicator works on {self.device}")
        if ready_flag is not None:
            signal, index, target = ready_flag
            _check_ready_flag(signal, index, target)
            if signal.device != self.device or not signal.is_contiguous():
                raise ValueError(f"ready_flag[0] (signal) must be contiguous on {self.device}, "
                                 f"got {signal.device} (contiguous={signal.is_contiguous()})")
        if after is not None and ready_flag is None:
            raise ValueError("after= needs ready_flag=: without the flag nothing orders the collective after "
                             "the producer that follows the event")
        if after is not None and not isinstance(after, torch.cuda.Event):
            raise TypeError(f"after must be a torch.cuda.Event, got {type(after).__name__}")
        comm = self._open()
        comm.check_status()

        if after is None:
            comm.comm_wait_for(torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.comm_stream.wait_event(after)
        if ready_flag is not None:
            comm.wait_flag(signal.data_ptr() + index * signal.element_size(), target, self._flag_timeout_ns)
            signal.record_stream(self.comm_stream)
        # One event pair per collective (not the extension's ring of reused events): a wait long after the
        # start, with many row-group collectives in between, must still wait for this collective only.
        started, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started.record(self.comm_stream)
        if tensor.numel() > 0:
            comm.all_reduce(tensor.data_ptr(), tensor.numel(), self._dtypes[tensor.dtype])
        done.record(self.comm_stream)
        tensor.record_stream(self.comm_stream)
        pending = PendingAllReduce(tensor, lambda: self._caller_waits(done))
        pending.events = (started, done)
        return pending

    def _caller_waits(self, done):
        torch.cuda.current_stream(self.device).wait_event(done)
        self._open().check_status()

    def synchronize(self):
        """Block the host until every collective issued so far has finished; raise on a timed-out flag."""
        self._open().synchronize()

    def _open(self):
        if self._comm is None:
            raise RuntimeError("the nccl-ext communicator is closed")
        return self._comm

    def close(self):
        """Finish this rank's collectives and free the communicator (idempotent); raises on a pending
        flag timeout after freeing."""
        comm, self._comm = getattr(self, "_comm", None), None
        if comm is None:
            return
        try:
            comm.synchronize()
        finally:
            comm.destroy()
