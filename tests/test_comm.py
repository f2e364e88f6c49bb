"""iso_kernels.comm over gloo on loopback: exact sums, the torch backend's watcher thread, the emulated link's
time and overlap, bad input, and the multi-rank harness's own failure handling."""

import datetime
import math
import threading
import time

import pytest
import torch
import torch.distributed as dist

from iso_kernels import comm, launch

from helpers import integer_valued

WORLD_SIZES = [2, 4]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (17, 33), (3, 5, 64)]
# A link slow enough that 100 ms collectives dominate scheduling noise on a loaded 2-core machine.
SLOW_LINK = comm.LinkModel("test", latency_s=100e-3, bus_bandwidth=1e12)
OVERLAP_TRIES = 3


def _exact_sums(rank, world_size):
    """Every backend, dtype and shape: each rank holds integer data; the result is the exact sum."""
    torch.manual_seed(1234)  # same generator everywhere, so each rank can rebuild all ranks' inputs
    inputs = {(dtype, shape): [integer_valued(shape, dtype) for _ in range(world_size)]
              for dtype in DTYPES for shape in SHAPES}
    checked = 0
    for link in (None, comm.LinkModel("fast", latency_s=1e-4, bus_bandwidth=1e9)):
        with comm.make_communicator("torch", world_size=world_size, link=link) as communicator:
            for (dtype, shape), per_rank in inputs.items():
                expected = torch.stack([t.double() for t in per_rank]).sum(0).to(dtype)
                pending = [communicator.all_reduce_start(per_rank[rank].clone()) for _ in range(2)]
                for result in pending:
                    reduced = result.wait()
                    assert torch.equal(reduced, expected), (communicator.name, dtype, shape)
                    checked += 1
    return checked


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_reduce_is_exact_sum(world_size):
    counts = launch.spawn_ranks(_exact_sums, world_size, timeout_s=120)
    assert counts == [2 * 2 * len(DTYPES) * len(SHAPES)] * world_size


def _gloo_watcher(rank, world_size):
    """TorchCommunicator on gloo: its watcher records when the collective ended, hands the collective's own
    error to the caller, abandons what is in flight at abort(), and is gone after close()."""
    communicator = comm.make_communicator("torch")
    pending = communicator.all_reduce_start(torch.full((64,), float(rank + 1)))
    reduced = pending.wait()
    returned = time.perf_counter()
    assert torch.equal(reduced, torch.full((64,), 3.0))
    start, end = pending.interval
    assert start <= end <= returned
    quick = dist.new_group(timeout=datetime.timedelta(seconds=2))
    spare = dist.new_group()
    if rank == 0:
        with comm.TorchCommunicator(quick) as timing_out, pytest.raises(RuntimeError, match="(?i)timed out"):
            timing_out.all_reduce_start(torch.ones(4)).wait()  # rank 1 never issues its side
        abandoning = comm.TorchCommunicator(spare)
        pending = abandoning.all_reduce_start(torch.ones(4))  # rank 1 issues its side after the barrier
        abandoning.abort()
        with pytest.raises(RuntimeError, match="abandoned"):
            pending.wait()
        assert not pending.work.is_completed()
    dist.barrier()
    if rank == 1:
        dist.all_reduce(torch.ones(4), group=spare)
    communicator.close()
    return [thread.name for thread in threading.enumerate() if thread.name == "iso-kernels-gloo-watcher"]


@pytest.mark.slow
def test_gloo_all_reduce_is_waited_for_on_the_communicators_thread():
    assert launch.spawn_ranks(_gloo_watcher, 2, timeout_s=120) == [[], []]


def _busy_compute(seconds):
    a = torch.randn(128, 128)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
    return a


def _emulated_link_timing(rank, world_size):
    communicator = comm.make_communicator("torch", link=SLOW_LINK)
    x = torch.ones(1024)
    modelled = communicator.modelled_seconds(x)

    start = time.perf_counter()
    communicator.all_reduce(x.clone())
    alone = time.perf_counter() - start

    # Two back-to-back collectives queue on the link like on a real comm stream.
    start = time.perf_counter()
    first, second = communicator.all_reduce_start(x.clone()), communicator.all_reduce_start(x.clone())
    cpu_before = time.process_time()
    first.wait(), second.wait()
    queued = time.perf_counter() - start
    cpu_waiting = time.process_time() - cpu_before

    # Compute issued right after the start runs while the link is busy, against the same compute issued after
    # the collective has finished. Load only adds time, so the fastest of a few tries is each one's own cost.
    overlapped, serial = math.inf, math.inf
    for _ in range(OVERLAP_TRIES):
        start = time.perf_counter()
        pending = communicator.all_reduce_start(x.clone())
        _busy_compute(modelled)
        pending.wait()
        overlapped = min(overlapped, time.perf_counter() - start)
        start = time.perf_counter()
        communicator.all_reduce(x.clone())
        _busy_compute(modelled)
        serial = min(serial, time.perf_counter() - start)
    return modelled, alone, queued, cpu_waiting, overlapped, serial


@pytest.mark.slow
def test_emulated_link_takes_its_time_and_overlaps():
    for modelled, alone, queued, cpu_waiting, overlapped, serial in launch.spawn_ranks(_emulated_link_timing, 2):
        assert alone >= 0.95 * modelled
        assert queued >= 1.9 * modelled, "two collectives must share the link one after the other"
        assert cpu_waiting < 0.5 * queued, "waiting on the emulated link must sleep, not spin"
        # Serially the compute (modelled seconds long) follows the collective; overlapped, most of it hides.
        assert overlapped < serial - 0.5 * modelled, (overlapped, serial, modelled)


def test_link_for_ratio_hits_the_ratio():
    link = comm.link_for_ratio(0.5, compute_s=2.0, bytes_per_collective=1 << 20, collectives=10, world_size=2)
    assert link.seconds(1 << 20, 2) * 10 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ratio"):
        comm.link_for_ratio(-1, compute_s=1.0, bytes_per_collective=1, collectives=1, world_size=2)


@pytest.mark.parametrize("spec, expected", [(None, None), ("none", None), ("ratio:0.5", comm.LinkSpec(ratio=0.5)),
                                            ("pcie4", comm.LinkSpec(fixed=comm.LINK_PRESETS["pcie4"]))])
def test_parse_link(spec, expected):
    assert comm.parse_link(spec) == expected


def test_link_spec_resolves_a_ratio_against_the_measured_compute():
    fixed = comm.LINK_PRESETS["pcie4"]
    assert comm.LinkSpec(fixed=fixed).resolve(2.0, 1 << 20, 10, 2) is fixed
    assert comm.LinkSpec(ratio=0.5).resolve(2.0, 1 << 20, 10, 2) == comm.link_for_ratio(0.5, 2.0, 1 << 20, 10, 2)


@pytest.mark.parametrize("spec", ["ratio:x", "ratio:0", "warp-drive"])
def test_parse_link_rejects(spec):
    with pytest.raises(ValueError, match="link"):
        comm.parse_link(spec)


def test_pending_all_reduce_of_parts_waits_for_each_part_once_and_spans_them():
    waited = []
    parts = [comm.PendingAllReduce(torch.ones(2), lambda i=i: waited.append(i)) for i in range(3)]
    for i, part in enumerate(parts):
        part.events = (f"start {i}", f"end {i}")  # stand-ins for CUDA events
    whole = torch.zeros(6)
    pending = comm.PendingAllReduce.of_parts(whole, parts)
    assert pending.events == ("start 0", "end 2")
    assert pending.wait() is whole and pending.wait() is whole
    assert waited == [0, 1, 2]
    assert comm.PendingAllReduce(whole).wait() is whole  # nothing to wait for


def _bad_inputs(rank, world_size):
    communicator = comm.make_communicator("torch")
    cases = {
        "contiguous": torch.ones(4, 4).T[:, :2],
        "dtype": torch.ones(4, dtype=torch.int64),
        "is on meta": torch.ones(4, device="meta"),
    }
    for expected, tensor in cases.items():
        with pytest.raises(ValueError, match=expected):
            communicator.all_reduce_start(tensor)
    with pytest.raises(TypeError, match="tensor"):
        communicator.all_reduce_start([1.0, 2.0])
    with pytest.raises(ValueError, match="world_size"):
        comm.make_communicator("torch", world_size=world_size + 1)
    with pytest.raises(ValueError, match="backend"):
        comm.make_communicator("carrier-pigeon")
    with pytest.raises(ValueError, match="link"):
        comm.make_communicator("emulated")
    return True


@pytest.mark.slow
def test_bad_inputs_raise_named_errors():
    assert launch.spawn_ranks(_bad_inputs, 2) == [True, True]


def _one_rank_raises(rank, world_size):
    if rank == 1:
        raise KeyError("rank one broke")
    torch.distributed.barrier()  # rank 0 would wait here forever without the launcher's cleanup


def _rank_itself(rank, world_size):
    return rank


def _one_rank_hangs(rank, world_size):
    if rank == 0:
        time.sleep(3600)
    return rank


@pytest.mark.slow
def test_failing_rank_does_not_hang_the_others():
    with pytest.raises(launch.RankError) as info:
        launch.spawn_ranks(_one_rank_raises, 2, timeout_s=60)
    assert "rank one broke" in info.value.failures[1]
    assert "timed out" not in str(info.value)  # the launcher stopped rank 0, not the deadline


@pytest.mark.slow
def test_hanging_rank_times_out():
    # Rank 1 must start and report before the deadline: give it three times what starting two ranks takes
    # now, on this machine, however busy it is.
    started = time.perf_counter()
    launch.spawn_ranks(_rank_itself, 2, timeout_s=120)
    start_up_s = time.perf_counter() - started
    with pytest.raises(launch.RankError) as info:
        launch.spawn_ranks(_one_rank_hangs, 2, timeout_s=max(8.0, 3 * start_up_s))
    assert "timed out" in info.value.failures[0]
    assert 1 not in info.value.failures
