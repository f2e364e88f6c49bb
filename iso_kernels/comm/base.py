"""What every communicator shares: the ``Communicator`` interface and its checks, the pending all-reduce it
returns, and the failure agreement of ``settle()``."""

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import torch
import torch.distributed as dist

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PendingAllReduce:
    """An all-reduce in flight. ``wait()`` returns the reduced tensor; ``interval`` its (start, end) once known.

    ``interval`` is in ``time.perf_counter()`` seconds on CPU; on GPU, backends that own their comm stream set
    ``events`` (CUDA events at the collective's start and end) instead. Without ``wait_fn`` the tensor is
    already reduced (no communication, or a serial schedule that has waited).
    """

    def __init__(self, tensor: torch.Tensor, wait_fn: Callable[[], object] | None = None):
        self.tensor = tensor
        self._wait_fn = wait_fn
        self.interval: tuple[float, float] | None = None
        self.events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    @classmethod
    def of_parts(cls, tensor: torch.Tensor, parts: Sequence["PendingAllReduce"]) -> "PendingAllReduce":
        """The all-reduces ``parts`` (of pieces of ``tensor``, in issue order) seen as one: waiting waits for
        each, and ``events`` span from the first one's start to the last one's end."""
        def wait_for_every_part():
            for part in parts:
                part.wait()

        pending = cls(tensor, wait_for_every_part)
        if parts[0].events is not None:
            pending.events = (parts[0].events[0], parts[-1].events[1])
        return pending

    def wait(self) -> torch.Tensor:
        if self._wait_fn is not None:
            self._wait_fn()
            self._wait_fn = None
        return self.tensor


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s collectives run: the current CUDA device when it has NCCL and a GPU is visible,
    else the CPU (gloo; also a mixed "cpu:gloo,cuda:nccl" group on a machine without GPUs)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("communicator needs torch.distributed initialised (init_process_group)")
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_Comm = TypeVar("_Comm", bound="Communicator")


class Communicator:
    """Base class: a tensor-parallel group and the validation every backend shares."""

    name = "base"

    def __init__(self, group: dist.ProcessGroup | None = None, *, world_size: int | None = None):
        self.device = group_device(group)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if world_size is not None and world_size != self.world_size:
            raise ValueError(f"world_size={world_size} does not match the process group's size {self.world_size}")

    def _check_tensor(self, tensor, name="tensor"):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {SUPPORTED_DTYPES}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the collective works on its storage in place)")
        if tensor.device.type != self.device.type:
            raise ValueError(f"{name} is on {tensor.device}, but the {self.name} communicator works on {self.device}")

    @staticmethod
    def _check_ready_flag(signal, index, target):
        if not isinstance(signal, torch.Tensor) or signal.dtype != torch.int32:
            raise ValueError("ready_flag[0] (signal) must be an int32 tensor")
        if not 0 <= index < signal.numel():
            raise ValueError(f"ready_flag[1] (index) {index} is outside signal of length {signal.numel()}")
        if target <= 0:
            raise ValueError(f"ready_flag[2] (target) must be positive, got {target}")

    supports_ready_flag = False  # True where a collective can start from a device flag before its producer ends

    def all_reduce_start(self, tensor: torch.Tensor, *, ready_flag: tuple[torch.Tensor, int, int] | None = None,
                         after: torch.cuda.Event | None = None) -> PendingAllReduce:
        """Start an in-place sum of ``tensor``. ``ready_flag=(signal, index, target)``: the data is complete
        once ``signal[index] >= target``; ``after``: a CUDA event, recorded before the producer, that the
        collective may wait for instead of everything on the caller's stream (flag-capable backends only)."""
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_start(tensor).wait()

    def settle(self) -> None:
        """Wait for every collective issued so far and raise, on every rank alike, if one failed on any rank.
        Collective: every rank of the group calls it at the same point. Here a no-op: torch's collectives raise
        through their own work handles and watchdog."""

    def close(self) -> None:
        pass

    def abort(self) -> None:
        """Tear down without waiting for peers (error paths)."""
        self.close()

    def __enter__(self: _Comm) -> _Comm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # After an exception peers may never match this rank's collectives: waiting for them could hang.
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class CommFailure(RuntimeError):
    """A communicator failed on one or more ranks; raised with the same text on every rank of the group.
    ``failures`` maps group rank -> cause."""

    def __init__(self, what: str, failures: dict[int, str], world_size: int):
        self.failures = failures
        causes = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(failures.items()))
        super().__init__(f"{what} failed on {len(failures)} of {world_size} rank(s): {causes}")


def agree_on_status(local_error: str | None, group: dist.ProcessGroup | None = None, *,
                    what: str = "the communicator") -> None:
    """Collective: share whether this rank failed (``local_error``: its cause, or None) and raise one
    ``CommFailure`` naming every failed rank and its cause on every rank of ``group`` if any failed.

    Costs one all-reduce of one integer when no rank failed (an all-gather of the causes only when one did);
    works on any torch.distributed backend (gloo on CPU).
    """
    failed = torch.tensor([local_error is not None], dtype=torch.int32, device=group_device(group))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if not failed.item():
        return
    world_size = dist.get_world_size(group)
    causes = [None] * world_size
    dist.all_gather_object(causes, local_error, group=group)
    raise CommFailure(what, {rank: cause for rank, cause in enumerate(causes) if cause is not None}, world_size)
