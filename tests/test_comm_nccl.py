"""The nccl-ext path on real GPUs: ``_C``'s stream kernels, flag waits and failure paths in this process
(@gpu: sticky timeout reports, the watchdog aborting a synchronize/destroy/init past its timeout, abort from
another thread, a with-block that raised), and ``NcclExtCommunicator`` in spawned ranks, each case in ranks
and a communicator of its own — exact sums, collectives in flight together, flag-gated starts (emulated
producer and ``gemm_signal``), CUDA-graph capture, a recorded tensor freed after close(), a flag timeout raised
by every rank at settle(), both NCCL_COMM_BLOCKING settings — at world 1 (@gpu: NCCL runs a one-rank
communicator on a single GPU) and world 2 (@multigpu). Timing is asserted only against quantities of the same
run (``stream_sleep`` lengths, the timeouts under test), never as a speedup."""

import threading
import time
import traceback

import pytest
import torch

from iso_kernels import _ext, launch

from helpers import integer_valued

WORLDS = [pytest.param(1, marks=pytest.mark.gpu), pytest.param(2, marks=pytest.mark.multigpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (17, 33), (3, 5, 64), (4097,)]
# Long enough to dwarf launch jitter, short enough to keep the suite quick.
SLEEP_NS = 30_000_000
# A flag wait's bound where it is expected to succeed.
WAIT_TIMEOUT_NS = 5_000_000_000
# A stream kept busy "forever" next to the short timeouts under test (and still bounded).
HANG_NS = 3_000_000_000
# The caller's work queued after a flag-gated start: the collective must finish well before it does.
TAIL_NS = 300_000_000
GEMM_SHAPE = (200, 96, 64, 32)  # M (not a multiple of rows_per_signal), N, K, rows_per_signal
# One case's spawned ranks, start-up and NCCL init included (gemm_signal_gated may autotune on a cold cache).
CASE_TIMEOUT_S = 60
CASES = ("exact_sum", "in_flight", "flag_gated", "gemm_signal_gated", "graph_capture", "stream_outlives_close",
         "flag_timeout_is_raised_by_every_rank", "blocking_setting_from_the_environment")


def _timed_event():
    return torch.cuda.Event(enable_timing=True)


# --- _C directly, in this process ---
@pytest.mark.gpu
def test_stream_sleep_occupies_the_stream_not_the_host(native):
    stream = torch.cuda.Stream()
    native.stream_sleep(stream.cuda_stream, 0)  # loads the kernel module outside the measurement
    stream.synchronize()
    start, end = _timed_event(), _timed_event()
    start.record(stream)
    native.stream_sleep(stream.cuda_stream, SLEEP_NS)
    queued_while_busy = not stream.query()
    end.record(stream)
    end.synchronize()
    assert queued_while_busy, "stream_sleep blocked the host instead of the stream"
    assert start.elapsed_time(end) >= 0.95 * SLEEP_NS / 1e6


def _one_rank_comm(native, timeout_s=60.0):
    """A one-rank OverlapComm on a fresh torch stream (the caller keeps the stream alive)."""
    stream = torch.cuda.Stream()
    comm = native.OverlapComm(native.nccl_unique_id(), 1, 0, torch.cuda.current_device(), stream.cuda_stream,
                              int(timeout_s * 1e9))
    return comm, stream


@pytest.mark.gpu
def test_flag_wait_holds_the_comm_stream_until_the_flag(native):
    caller = torch.cuda.current_stream()
    comm, comm_stream = _one_rank_comm(native)
    with comm:
        flag = torch.zeros(3, dtype=torch.int32, device="cuda")
        flag[1].fill_(5)  # loads the fill kernel now, not while the wait below spins (lazy module loading)
        flag.zero_()
        start, released = _timed_event(), _timed_event()
        start.record(caller)
        comm.comm_wait_for(caller.cuda_stream)  # after the zeroing: the wait must not read the old memory
        comm.wait_flag(flag[1:].data_ptr(), 5, WAIT_TIMEOUT_NS)
        released.record(comm_stream)
        native.stream_sleep(caller.cuda_stream, SLEEP_NS)  # its kernel was loaded when comm was created
        flag[1].fill_(5)
        comm.synchronize()  # raises had the wait timed out
        held_ms = start.elapsed_time(released)
        assert held_ms >= 0.95 * SLEEP_NS / 1e6
        assert held_ms < 0.5 * WAIT_TIMEOUT_NS / 1e6, "the wait ran into its timeout: a launch stalled behind it"


@pytest.mark.gpu
def test_flag_wait_timeouts_are_reported_and_stay_reported(native):
    caller = torch.cuda.current_stream()
    comm, _ = _one_rank_comm(native)
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    comm.comm_wait_for(caller.cuda_stream)
    comm.wait_flag(flag.data_ptr(), 1, 2_000_000)
    with pytest.raises(RuntimeError, match="flag wait timed out on rank 0: 1 wait.s. timed out; the first held "
                                           "0 < target 1"):
        comm.synchronize()
    comm.wait_flag(flag.data_ptr(), 3, 2_000_000)
    with pytest.raises(RuntimeError, match="2 wait.s. timed out; the first held 0 < target 1"):
        comm.synchronize()
    with pytest.raises(ValueError, match="timeout_ns"):
        comm.wait_flag(flag.data_ptr(), 1, 0)
    with pytest.raises(ValueError, match="flag_ptr"):
        comm.wait_flag(0, 1, 1000)
    with pytest.raises(ValueError, match="count"):
        comm.all_reduce(flag.data_ptr(), 0, native.DataType.float32)
    comm.destroy()
    comm.destroy()
    assert comm.closed
    with pytest.raises(RuntimeError, match="closed"):
        comm.comm_wait_for(caller.cuda_stream)


@pytest.mark.gpu
@pytest.mark.parametrize("call", ["synchronize", "destroy"])
def test_watchdog_aborts_a_wait_that_outlasts_its_timeout(native, call):
    timeout_s = 0.5
    comm, comm_stream = _one_rank_comm(native, timeout_s)
    native.stream_sleep(comm_stream.cuda_stream, HANG_NS)  # a collective that never ends, as far as we know
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"on rank 0: not finished within the timeout of {timeout_s:g} s.*"
                                           "the communicator was aborted"):
        getattr(comm, call)()
    waited = time.perf_counter() - start
    assert comm.closed
    assert timeout_s <= waited < HANG_NS / 1e9, "the watchdog must stop the wait at its timeout"
    comm_stream.synchronize()


@pytest.mark.gpu
def test_abort_from_another_thread_ends_a_synchronize(native):
    comm, comm_stream = _one_rank_comm(native)
    native.stream_sleep(comm_stream.cuda_stream, HANG_NS)
    errors = []

    def waiter():
        try:
            comm.synchronize()
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=waiter)
    start = time.perf_counter()
    thread.start()
    time.sleep(0.2)  # the waiter is polling by now (it holds no lock between polls)
    comm.abort()
    thread.join(timeout=HANG_NS / 1e9)
    assert not thread.is_alive() and time.perf_counter() - start < HANG_NS / 1e9
    assert len(errors) == 1 and "aborted while this call waited" in errors[0], errors
    assert comm.closed
    comm_stream.synchronize()


@pytest.mark.gpu
def test_with_block_aborts_without_waiting_when_the_body_raises(native):
    comm, comm_stream = _one_rank_comm(native)
    start = time.perf_counter()
    with pytest.raises(KeyError), comm:
        native.stream_sleep(comm_stream.cuda_stream, HANG_NS)
        raise KeyError("the body broke")
    assert comm.closed and time.perf_counter() - start < HANG_NS / 1e9
    comm_stream.synchronize()


@pytest.mark.gpu
def test_init_without_its_peers_gives_up_at_the_timeout(native):
    """Rank 0 of 2 alone: the non-blocking init is polled to the deadline, aborted, and raises."""
    stream = torch.cuda.Stream()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="ncclCommInitRankConfig on rank 0: not finished within the timeout"):
        native.OverlapComm(native.nccl_unique_id(), 2, 0, torch.cuda.current_device(), stream.cuda_stream,
                           500_000_000)
    assert time.perf_counter() - start >= 0.5


# --- NcclExtCommunicator in spawned ranks ---
def _case_exact_sum(comm, rank, world_size):
    torch.manual_seed(1234)  # every rank rebuilds every rank's input
    inputs = {(dtype, shape): [integer_valued(shape, dtype) for _ in range(world_size)]
              for dtype in DTYPES for shape in SHAPES}
    reduced = {key: comm.all_reduce(per_rank[rank].to(comm.device)) for key, per_rank in inputs.items()}
    torch.cuda.synchronize()
    expected = {(dtype, shape): torch.stack([t.double() for t in per_rank]).sum(0).to(dtype)
                for (dtype, shape), per_rank in inputs.items()}
    wrong = [key for key in inputs if not torch.equal(reduced[key].cpu(), expected[key])]
    assert not wrong, f"inexact sums for (dtype, shape) {wrong}"


def _case_in_flight(comm, rank, world_size):
    """Several collectives in flight, issued from a side stream, waited in reverse order."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        tensors = [torch.full((1000 + i,), float(rank + i), device=comm.device) for i in range(4)]
        pending = [comm.all_reduce_start(t) for t in tensors]
        results = [p.wait() for p in reversed(pending)][::-1]
    side.synchronize()
    ranks_sum = world_size * (world_size - 1) / 2
    for i, result in enumerate(results):
        assert torch.equal(result, torch.full_like(result, ranks_sum + world_size * i)), i


def _case_flag_gated(comm, rank, world_size):
    """Producer queued first (slow, then data, then flag); the collective is started after it with
    ``after`` = an event from before the producer: it must wait for the flag, and not for the caller's
    later work."""
    native = _ext.load()
    caller = torch.cuda.current_stream()
    data = torch.full((4097,), float(rank + 1), device=comm.device)
    x = torch.zeros_like(data)
    signal = torch.zeros(2, dtype=torch.int32, device=comm.device)
    torch.cuda.synchronize()
    start, released = _timed_event(), _timed_event()
    start.record(caller)
    after = torch.cuda.Event()
    after.record(caller)
    native.stream_sleep(caller.cuda_stream, SLEEP_NS)
    x.copy_(data)
    signal[1].fill_(7)
    pending = comm.all_reduce_start(x, ready_flag=(signal, 1, 7), after=after)
    released.record(comm.comm_stream)
    tail = torch.cuda.Event()
    native.stream_sleep(caller.cuda_stream, TAIL_NS)
    tail.record(caller)
    released.synchronize()
    tail_finished_first = tail.query()
    result = pending.wait()
    torch.cuda.synchronize()
    assert torch.equal(result, torch.full_like(data, world_size * (world_size + 1) / 2)), result[:4]
    assert start.elapsed_time(released) >= 0.95 * SLEEP_NS / 1e6, "the collective did not wait for the flag"
    assert not tail_finished_first, "the collective waited for the caller's later work, not just the flag"


def _case_gemm_signal_gated(comm, rank, world_size):
    """The gemm_signal protocol: zero, record `after`, GEMM, one flag-gated all-reduce per row group."""
    from iso_kernels.ops.gemm_signal import gemm_signal, signal_targets

    m, n, k, rows = GEMM_SHAPE
    torch.manual_seed(99)
    xs = [integer_valued((m, k), torch.float32, low=-3, high=4) for _ in range(world_size)]
    ws = [integer_valued((n, k), torch.float32, low=-3, high=4) for _ in range(world_size)]
    x, w = xs[rank].to(comm.device), ws[rank].to(comm.device)
    targets = signal_targets(m, n, rows).tolist()
    signal = torch.zeros(len(targets), dtype=torch.int32, device=comm.device)
    gemm_signal(x, w, signal, rows_per_signal=rows)  # autotunes this shape before any wait overlaps it
    torch.cuda.synchronize()

    signal.zero_()
    after = torch.cuda.Event()
    after.record()
    out = gemm_signal(x, w, signal, rows_per_signal=rows)
    pending = [comm.all_reduce_start(out[g * rows:(g + 1) * rows], ready_flag=(signal, g, target),
                                     after=after)
               for g, target in enumerate(targets)]
    for p in pending:
        p.wait()
    torch.cuda.synchronize()
    expected = sum(a.double() @ b.double().T for a, b in zip(xs, ws, strict=True)).float()
    mismatch = (out.cpu() != expected).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} wrong elements, first at {mismatch[:4].tolist()}"


def _case_graph_capture(comm, rank, world_size):
    """Fork to the comm stream and rejoin inside a CUDA graph; replays see new inputs."""
    src = torch.zeros(2048 + 3, device=comm.device)
    static = torch.zeros_like(src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up of the same collective outside the capture
        comm.all_reduce_start(static).wait()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(src)
        comm.all_reduce_start(static).wait()
        static.mul_(2)
    for step in range(3):
        src.fill_(float(rank + step))
        graph.replay()
        torch.cuda.synchronize()
        expected = 2 * (world_size * (world_size - 1) / 2 + world_size * step)
        assert torch.equal(static, torch.full_like(static, expected)), (step, static[:4])


def _case_stream_outlives_close(comm, rank, world_size):
    """A tensor recorded on a closed communicator's comm stream is freed later: torch records an event on
    that stream then, which must still exist. The stream has the device's highest priority."""
    from iso_kernels.comm import NcclExtCommunicator

    native = _ext.load()
    with NcclExtCommunicator() as other:
        y = other.all_reduce(torch.full((1 << 20,), float(rank), device=comm.device))
        torch.cuda.synchronize()
        least, greatest = native.stream_priority_range(comm.device.index)
        priority = other.comm_stream.priority
    assert torch.equal(y, torch.full_like(y, world_size * (world_size - 1) / 2))
    del y  # freed after close(): the caching allocator records an event on the comm stream
    reused = torch.empty(1 << 20, device=comm.device)
    reused.fill_(1.0)
    torch.cuda.synchronize()
    assert priority < least or greatest == least, (priority, least, greatest)


def _case_flag_timeout_is_raised_by_every_rank(comm, rank, world_size):
    """The last rank's flag is never raised: its wait times out and its collective runs on stale data. Every
    rank issues the same collectives; settle() raises the same error on all of them and aborts each."""
    from iso_kernels.comm import CommFailure, NcclExtCommunicator

    failing = world_size - 1
    short = NcclExtCommunicator(flag_timeout_s=0.2, timeout_s=60)
    signal = torch.zeros(1, dtype=torch.int32, device=comm.device)
    if rank != failing:
        signal.fill_(1)
    x = torch.ones(64, device=comm.device)
    after = torch.cuda.Event()
    after.record()
    short.all_reduce_start(x, ready_flag=(signal, 0, 1), after=after).wait()
    short.all_reduce_start(torch.ones(8, device=comm.device)).wait()  # one more: nobody raised early
    with pytest.raises(CommFailure) as info:
        short.settle()
    assert set(info.value.failures) == {failing}
    assert f"rank {failing}: flag wait timed out on rank {failing}" in str(info.value)
    with pytest.raises(RuntimeError, match="closed"):
        short.all_reduce_start(x)
    short.close()


def _case_blocking_setting_from_the_environment(comm, rank, world_size):
    """NCCL_COMM_BLOCKING overrides the non-blocking config; both settings must work end to end."""
    import os

    from iso_kernels.comm import NcclExtCommunicator

    for value in ("1", "0"):
        os.environ["NCCL_COMM_BLOCKING"] = value
        try:
            with NcclExtCommunicator() as other:
                y = other.all_reduce(torch.full((4097,), float(rank + 1), device=comm.device))
                torch.cuda.synchronize()
                other.settle()
        finally:
            del os.environ["NCCL_COMM_BLOCKING"]
        assert torch.equal(y, torch.full_like(y, world_size * (world_size + 1) / 2)), value


def _run_case(rank, world_size, case):
    """One case on a communicator of its own: a sticky NCCL failure (an aborted or errored communicator) in one
    case cannot make the others fail."""
    from iso_kernels.comm import NcclExtCommunicator

    with NcclExtCommunicator() as comm:
        try:
            globals()[f"_case_{case}"](comm, rank, world_size)
            return {case: None}
        except Exception:  # noqa: BLE001 - reported per rank by the parent
            return {case: traceback.format_exc()}


@pytest.fixture(params=WORLDS)
def outcomes(request, case):
    """Per test (function scope): fresh ranks and a fresh communicator for this case alone."""
    return launch.spawn_ranks(_run_case, request.param, args=(case,), device_type="cuda",
                              timeout_s=CASE_TIMEOUT_S)


@pytest.mark.parametrize("case", CASES)
def test_nccl_ext_case(outcomes, case):
    failures = {rank: result[case] for rank, result in enumerate(outcomes) if result[case] is not None}
    assert not failures, "\n".join(f"rank {rank}:\n{text}" for rank, text in failures.items())
