"""``torch``: torch.distributed's async all-reduce (gloo on CPU, NCCL on GPU)."""

import time

import torch.distributed as dist

from .base import Communicator, PendingAllReduce


class TorchCommunicator(Communicator):
    """torch.distributed async all-reduce. On NCCL, ``work.wait()`` makes the current stream wait (no host
    block) and ProcessGroupNCCL keeps the tensor alive until the collective ends; on gloo the collective runs
    on gloo's own thread and ``wait()`` blocks the host."""

    name = "torch"

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        self._check_tensor(tensor)
        if ready_flag is not None:
            # torch.distributed cannot start a collective from a device flag: wait for the whole producer.
            self._check_ready_flag(*ready_flag)
        start = time.perf_counter()
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        pending = PendingAllReduce(tensor, work.wait)
        if tensor.device.type == "cpu":
            # The future completes on gloo's thread: that is when the wire went quiet, not when we waited.
            def finished(_future):
                pending.interval = (start, time.perf_counter())

            work.get_future().add_done_callback(finished)
        return pending
