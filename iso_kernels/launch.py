"""Run a function on N local ranks (the CLI's TP group and the tests' multi-rank harness).

Each rank is a spawned process with its own process group (gloo on CPU, NCCL on GPUs) on 127.0.0.1. A rank
that raises sends its traceback back through a queue; the launcher then stops the others, so one failing rank
never leaves the rest hanging in a collective. A global deadline bounds the whole run.
"""

import datetime
import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks that have not reported this long after the first failure are stuck in a collective with it.
_GRACE_AFTER_FAILURE_S = 5.0


class RankError(RuntimeError):
    """One or more ranks failed; ``failures`` maps rank -> its traceback text (or a timeout note)."""

    def __init__(self, failures):
        self.failures = failures
        super().__init__("\n".join(f"rank {rank}: {failures[rank]}" for rank in sorted(failures)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_rank(rank, world_size, port, device_type="cpu", timeout_s=60.0):
    """Join the local group: gloo for CPU, NCCL (one GPU per rank) for CUDA."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    backend = "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _rank_main(rank, world_size, port, device_type, timeout_s, fn, args, results):
    try:
        init_rank(rank, world_size, port, device_type, timeout_s)
        results.put((rank, True, _serialize(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, KeyboardInterrupt included
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serialize(value):
    """Results travel as bytes: tensors sent through a torch queue share memory with a process that is about
    to exit, and the parent could not open them any more."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def spawn_ranks(fn, world_size=2, *, args=(), device_type="cpu", timeout_s=120.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results in rank order.

    ``fn`` and its results must be picklable (a module-level function). Raises ``RankError`` carrying every
    failing rank's traceback, or naming the ranks still running at the deadline (they are killed).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size={world_size} needs {world_size} GPUs; {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, world_size, port, device_type, timeout_s, fn, args, results))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outputs, failures = {}, {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in outputs and r not in failures and p.exitcode != 0]
                for r in dead:
                    failures[r] = f"rank {r} exited with code {procs[r].exitcode} without a report"
                continue
            (outputs if ok else failures)[rank] = value
            if failures:
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    finally:
        # Ranks that reported still tear down their process group; give them a moment before killing.
        grace = time.monotonic() + (_GRACE_AFTER_FAILURE_S if not failures else 0.0)
        for proc in procs:
            proc.join(timeout=max(0.0, grace - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
    for rank in range(world_size):
        if rank not in outputs and rank not in failures:
            failures[rank] = ("did not finish: killed after the first failure" if failures
                              else f"timed out after {timeout_s:.0f}s")
    if failures:
        raise RankError(failures)
    return [torch.load(io.BytesIO(outputs[rank]), weights_only=False) for rank in range(world_size)]
