"""Run a function on N local ranks (the CLI's TP group and the tests' multi-rank harness).

The ranks are started by torch's elastic launcher (``elastic_launch``, the engine behind ``torchrun``), each
with its own process group (gloo on CPU, NCCL on GPUs). The launcher watches them: when one fails it stops
the others, when the launching process gets SIGINT, SIGTERM, SIGHUP or SIGQUIT it stops them all before
raising, and it names a rank killed by a signal. Around it this module adds a deadline, one-line
descriptions of what failed, and quiet logs.
"""

import _thread
import contextlib
import datetime
import io
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

# torch.distributed.nn.functional, imported before any process group exists (engine and cli import this
# module before they start or join one): its collectives take ``group=group.WORLD`` defaults, evaluated at
# first import. Imported later (torch._dynamo imports it, and creating a model may import dynamo), they keep
# the default group alive past destroy_process_group, and with it gloo's worker threads into interpreter
# finalization, where one that releases a finished collective's tensors needs the GIL: CPython before 3.14
# ends it with pthread_exit, and the unwind through libtorch's noexcept frames calls std::terminate (SIGABRT
# at a rank's exit).
import torch.distributed.nn.functional
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

# Signals that stop the launch (the elastic agent's own list); ranks are sent the same one.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Ranks die at once on a stop signal (default action), so this only bounds a rank that ignores it.
_SHUTDOWN_TIMEOUT_S = 5
# A rank whose error may be the echo of a dead peer (its collective saw "connection closed") looks this long
# for the peer to turn up dead, and then this long for the launcher to stop it, so that the launcher reports
# the rank that died rather than the survivor's second-hand error.
_PEER_DEATH_WINDOW_S = 1.0
_WAIT_TO_BE_STOPPED_S = 10.0


class RankError(RuntimeError):
    """A rank failed; ``failures`` maps rank -> what happened (a traceback, "died: killed by SIGKILL", ...)."""

    def __init__(self, failures):
        self.failures = failures
        super().__init__("\n".join(f"rank {rank}: {self.summary(rank)}" for rank in sorted(failures)))

    def summary(self, rank):
        """One line: a traceback's last line (the exception), or the note itself."""
        lines = self.failures[rank].strip().splitlines()
        return lines[-1] if lines else "failed"

    def first_line(self):
        """The cause in one line: ``rank 0 died: killed by SIGKILL`` or ``rank 1: ValueError: ...``."""
        rank = min(self.failures)
        text = self.summary(rank)
        return f"rank {rank} {text}" if text.startswith("died:") else f"rank {rank}: {text}"


class Stopped(Exception):
    """The launching process got SIGTERM, SIGHUP or SIGQUIT (SIGINT is KeyboardInterrupt); every rank has been
    stopped."""

    def __init__(self, signum):
        self.signum = signal.Signals(signum)
        super().__init__(f"stopped by {self.signum.name}")


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def one_line_warnings():
    """Warnings print as ``warning: <message>``: one line, without the file, line and source they come from."""
    warnings.formatwarning = _one_line_warning


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_group_options(backend):
    """torch's NCCL backend on a high-priority stream, so that its collectives do not queue behind the compute
    kernels they should overlap (nccl-ext's comm stream takes the device's highest priority likewise);
    None, torch's default, for gloo and where this torch build has no NCCL."""
    if backend != "nccl" or not hasattr(dist, "ProcessGroupNCCL"):
        return None
    return dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)


# --- collectives of the launched ranks ---
def max_over_ranks(value):
    """The largest ``value`` (a float) of any rank of the default group, on every rank."""
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- inside each rank ---
def _rank_main(fn, args, device_type, timeout_s, done_folder):
    # Default actions: a stop signal from the launcher (or Ctrl-C reaching the whole process group) ends the
    # rank at once, even while it is blocked inside a collective, with no KeyboardInterrupt traceback. A shell
    # may have started us with SIGINT ignored, which exec passes on. (torch.multiprocessing also asks the
    # kernel for SIGINT when the launcher dies, so with the default action a rank never outlives it.)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    one_line_warnings()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            pg_options=process_group_options(backend))
    pids = [None] * world_size
    try:
        dist.all_gather_object(pids, os.getpid())
        result = _serialize(fn(rank, world_size, *args))
    except Exception:
        _wait_to_be_stopped_if_a_peer_died([pid for r, pid in enumerate(pids) if r != rank and pid])
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (Path(done_folder) / str(rank)).touch()
    return result


def _wait_to_be_stopped_if_a_peer_died(peer_pids):
    deadline = time.monotonic() + _PEER_DEATH_WINDOW_S
    while not any(_is_dead(pid) for pid in peer_pids):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    time.sleep(_WAIT_TO_BE_STOPPED_S)  # the launcher sees the dead peer and stops this rank meanwhile


def _is_dead(pid):
    """Gone, or a zombie its parent (the launcher) has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _serialize(value):
    """Results travel as bytes: tensors sent through a torch queue share memory with a process that is about
    to exit, and the parent could not open them any more."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


# --- in the launching process ---
def spawn_ranks(fn, world_size=2, *, args=(), device_type="cpu", timeout_s=120.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results in rank order.

    ``fn`` and its results must be picklable (a module-level function). Raises ``RankError`` naming the
    failing rank (its traceback, or the signal that killed it) or, past ``timeout_s``, the ranks that had not
    finished (all are stopped); ``KeyboardInterrupt`` or ``Stopped`` when this process got SIGINT or
    SIGTERM/SIGHUP/SIGQUIT (the ranks are stopped first).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size={world_size} needs {world_size} GPUs; {torch.cuda.device_count()} visible")
    # The agent turns stop signals into SignalException once it has started the ranks (and leaves its handlers
    # installed); the same from the start makes the deadline work during rendezvous too.
    with tempfile.TemporaryDirectory(prefix="iso_kernels_ranks_") as scratch, _quiet_elastic_logs(), \
            handle_stop_signals(_raise_signal_exception), _Deadline(timeout_s) as deadline:
        done_folder = Path(scratch) / "done"
        done_folder.mkdir()
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=f"iso-kernels-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", start_method="spawn", max_restarts=0,
            monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=str(Path(scratch) / "logs")),
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        try:
            outputs = elastic_launch(config, _rank_main)(fn, args, device_type, timeout_s, str(done_folder))
        except ChildFailedError as exc:
            raise RankError({rank: _describe(failure) for rank, failure in exc.failures.items()}) from None
        except SignalException as exc:
            if exc.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None  # as Ctrl-C anywhere else in Python (pytest stops, say)
            if not deadline.expired:
                raise Stopped(exc.sigval) from None
            finished = {int(path.name) for path in done_folder.iterdir()}
            raise RankError({rank: f"timed out after {timeout_s:g}s" for rank in range(world_size)
                             if rank not in finished}) from None
    return [torch.load(io.BytesIO(outputs[rank]), weights_only=False) for rank in range(world_size)]


def _describe(failure):
    """A failed rank as text: its traceback, or how it died."""
    if failure.exitcode < 0:
        return f"died: killed by {failure.signal_name()}"
    message = failure.message
    if isinstance(message, dict):  # an exception recorded by the rank: its traceback
        return message.get("extraInfo", {}).get("py_callstack") or message.get("message", "")
    return f"exited with code {failure.exitcode}" + (f" ({message})" if failure.error_file_data else "")


@contextlib.contextmanager
def _quiet_elastic_logs():
    """The agent logs every failure with a traceback, and each stop at WARNING; spawn_ranks reports them."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    # Each of these loggers has its own level (elastic's get_logger sets one), so the parents' would not do.
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(prefixes)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _raise_signal_exception(signum, frame):
    raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))


@contextlib.contextmanager
def handle_stop_signals(handler):
    """``handler`` for every stop signal while the block runs; the previous handlers afterwards. Only the
    main thread can set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


class _Deadline:
    """At ``timeout_s`` stops the launch the way SIGTERM would (the agent then stops every rank)."""

    def __init__(self, timeout_s):
        self.expired = False
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True

    def _expire(self):
        self.expired = True
        _thread.interrupt_main(signal.SIGTERM)  # runs the main thread's SIGTERM handler, no real signal

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
