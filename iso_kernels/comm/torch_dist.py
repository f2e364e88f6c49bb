"""``torch``: torch.distributed's async all-reduce (gloo on CPU, NCCL on GPU)."""

import collections
import datetime
import threading
import time

import torch
import torch.distributed as dist

from .base import Communicator, PendingAllReduce

# How often a watcher blocked in a collective looks whether its communicator is being aborted; a collective
# that completes wakes it at once.
POLL_S = 0.1
# How long an idle watcher waits for the next collective before its thread ends: a process that never closes
# its communicator exits at most this much later.
LINGER_S = 0.2
ABANDONED = "all-reduce abandoned: the communicator was aborted"


class TorchCommunicator(Communicator):
    """torch.distributed async all-reduce. On NCCL, ``work.wait()`` makes the current stream wait (no host
    block) and ProcessGroupNCCL keeps the tensor alive until the collective ends; on gloo the collective runs
    on gloo's own thread, and the communicator's watcher (``_GlooWatcher``) waits for it."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup | None = None, *, world_size: int | None = None):
        super().__init__(group, world_size=world_size)
        self._watcher = _GlooWatcher()

    def all_reduce_start(self, tensor: torch.Tensor, *, ready_flag: tuple[torch.Tensor, int, int] | None = None,
                         after: torch.cuda.Event | None = None) -> PendingAllReduce:
        self._check_tensor(tensor)
        if ready_flag is not None:
            # torch.distributed cannot start a collective from a device flag: wait for the whole producer.
            self._check_ready_flag(*ready_flag)
        start = time.perf_counter()
        # Issued here, on the caller's thread, so that every rank issues its collectives in the same order.
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        if tensor.device.type != "cpu":
            return PendingAllReduce(tensor, work.wait)
        pending = _GlooAllReduce(tensor, work, start)
        self._watcher.watch(pending)
        return pending

    def close(self) -> None:
        self._watcher.stop(abandon=False)

    def abort(self) -> None:
        self._watcher.stop(abandon=True)


class _GlooAllReduce(PendingAllReduce):
    """A gloo all-reduce that the communicator's watcher waits for; ``wait()`` waits for the watcher and
    raises what the collective's own wait raised there (a peer gone, the process group's timeout)."""

    def __init__(self, tensor, work, start):
        super().__init__(tensor, self._watched)
        self.work, self.start = work, start
        self.done = threading.Event()
        self.error = None

    def _watched(self):
        self.done.wait()
        if self.error is not None:
            raise self.error


class _GlooWatcher:
    """Waits for a communicator's gloo all-reduces, in issue order, on a Python thread of its own, and records
    when each one ended (``pending.interval``: the wire went quiet then, not when the caller waited).

    Why not a done-callback on the work's future: gloo runs it (and frees it) on its own worker thread, and
    that thread then needs the GIL. If it does while the interpreter finalizes, CPython (before 3.14)
    pthread_exits it, and the forced unwind through libtorch's noexcept Future::markCompleted calls
    std::terminate ("terminate called without an active exception", SIGABRT, at a rank's exit). Here no
    Python runs on gloo's threads: the watcher blocks in ``work.wait()``, which releases the GIL.

    The thread is not a daemon (one returning from C++ during finalization would meet the same end): it runs
    while collectives are in flight and ``LINGER_S`` after, so the interpreter's exit joins it; ``stop()``
    joins it at once. A watched collective's wait is bounded by the process group's timeout.
    """

    def __init__(self):
        self._queue = collections.deque()
        self._changed = threading.Condition()
        self._thread = None
        self._stopping = False
        self._abandon = False

    def watch(self, pending):
        with self._changed:
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="iso-kernels-gloo-watcher")
                self._thread.start()
            self._changed.notify()

    def stop(self, *, abandon):
        """End the thread: once the collectives in flight have ended, or (``abandon``) within ``POLL_S``,
        their waits raising instead. Idempotent; a later ``watch`` starts a new thread."""
        with self._changed:
            thread = self._thread
            self._stopping, self._abandon = True, abandon
            self._changed.notify()
        if thread is not None:
            thread.join()
        with self._changed:
            self._stopping = self._abandon = False

    def _run(self):
        while True:
            with self._changed:
                if not self._queue and not self._stopping:
                    self._changed.wait(LINGER_S)
                if not self._queue or self._abandon:
                    for pending in self._queue:
                        pending.error = RuntimeError(ABANDONED)
                        pending.done.set()
                    self._queue.clear()
                    self._thread = None
                    return
                pending = self._queue.popleft()
            try:
                self._wait_for(pending.work)
                pending.interval = (pending.start, time.perf_counter())
            except Exception as exc:  # noqa: BLE001 - raised again by the caller's wait()
                pending.error = exc
            finally:
                pending.done.set()

    def _wait_for(self, work):
        poll = datetime.timedelta(seconds=POLL_S)
        while True:
            try:
                return work.wait(poll)
            except RuntimeError:
                if work.is_completed():
                    return work.wait()  # the collective's own error, or a success just after the poll ran out
                if self._abandon:
                    raise RuntimeError(ABANDONED) from None
