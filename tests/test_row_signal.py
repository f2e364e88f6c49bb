"""The row-group rule of the row-signal path (schedule.row_group_rows) and the host cost of issuing groups."""

import math
import time

import pytest
import torch

from iso_kernels import schedule
from iso_kernels.comm import PendingAllReduce

# llama-1b (hidden 2048) prompts of 4k and 16k tokens, whole (serial) and as ISO chunks: even halves, an uneven
# three-way split and the small ragged blocks that tests use.
BLOCK_ROWS = [4096, 16384, 2048, 1365, 2731, 8192 + 100, 37, 16, 1]
REQUESTED = [16, 24, 128, 512]  # 24: off the 16-row grid
HIDDEN = 2048


class _RecordingComm:
    """A flag-capable communicator that only records each collective's rows and flag; nothing is reduced."""

    supports_ready_flag = True

    def __init__(self):
        self.calls = []

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        self.calls.append((tensor.shape[0], ready_flag[1], ready_flag[2]))
        return PendingAllReduce(tensor)


@pytest.mark.parametrize("rows", BLOCK_ROWS)
@pytest.mark.parametrize("requested", REQUESTED)
def test_group_count_is_bounded_and_rows_suit_gemm_signal(rows, requested):
    rows_per_signal = schedule.row_group_rows(rows, requested)
    assert math.ceil(rows / rows_per_signal) <= schedule.MAX_ROW_GROUPS
    assert rows_per_signal % 16 == 0 and rows_per_signal >= requested


@pytest.mark.parametrize("rows, requested, expected", [
    (4096, 128, 512), (16384, 128, 2048),  # the cap decides: exactly MAX_ROW_GROUPS groups
    (4096, 1024, 1024), (37, 16, 16),  # the request already gives few groups: kept
    (100, 100, 112),  # a request off the 16-row grid is rounded up
])
def test_group_size_is_the_request_unless_the_cap_needs_more(rows, requested, expected):
    assert schedule.row_group_rows(rows, requested) == expected


def test_chunks_in_one_power_of_two_bucket_share_a_group_size():
    # gemm_signal autotunes per (next power of two of M, rows_per_signal): one size per bucket adds no key
    assert {schedule.row_group_rows(rows, 128) for rows in range(2049, 4097)} == {512}


@pytest.mark.parametrize("requested, max_groups", [(0, 8), (-16, 8), (16, 0)])
def test_rejects_non_positive_sizes(requested, max_groups):
    with pytest.raises(ValueError, match=">= 1"):
        schedule.row_group_rows(4096, requested, max_groups)


def test_reducer_issues_at_most_the_cap_and_covers_every_row():
    comm = _RecordingComm()
    reducer = schedule._Reducer(comm, "iso", None, row_signal_rows=128)
    out = torch.zeros(1, 4096, 64)
    reducer.start(out, 0, 0, "mlp", reducer.signal_for(out))
    assert len(comm.calls) == schedule.MAX_ROW_GROUPS
    assert [index for _, index, _ in comm.calls] == list(range(schedule.MAX_ROW_GROUPS))
    assert sum(rows for rows, _, _ in comm.calls) == 4096
    assert all(target == rows * 64 for rows, _, target in comm.calls)


def _issue_seconds(rows_per_signal, blocks=100, repeats=5):
    """Best-of-``repeats`` host seconds to zero one 4k-row block's counters and issue its row-group
    collectives, per block, through the schedule's own Python path with a communicator that does nothing."""
    comm = _RecordingComm()
    out = torch.zeros(1, 4096, HIDDEN, dtype=torch.bfloat16)
    groups = -(-4096 // rows_per_signal)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(blocks):
            signal = schedule.RowSignal(torch.zeros(groups, dtype=torch.int32), rows_per_signal)
            schedule._start_by_row_group(comm, out, signal).wait()
        best = min(best, (time.perf_counter() - start) / blocks)
    return best, groups


@pytest.mark.slow
def test_host_time_per_collective_of_the_issue_path(record_property):
    """The capped block (MAX_ROW_GROUPS groups) against the uncapped 128-row one (32 groups), timed in the same
    run: fewer collectives cost the host less. The per-collective cost is printed, not asserted."""
    capped_s, capped_groups = _issue_seconds(schedule.row_group_rows(4096, 128))
    uncapped_s, uncapped_groups = _issue_seconds(128)
    assert capped_groups == schedule.MAX_ROW_GROUPS and uncapped_groups == 32
    per_collective_us = 1e6 * (uncapped_s - capped_s) / (uncapped_groups - capped_groups)
    record_property("host_us_per_collective", per_collective_us)
    print(f"\nrow-signal issue path (no-op communicator, 4096 x {HIDDEN} bf16 block): "
          f"{1e6 * capped_s:.1f} us per block of {capped_groups} groups, "
          f"{1e6 * uncapped_s:.1f} us per block of {uncapped_groups} groups; "
          f"{per_collective_us:.1f} us per extra collective, "
          f"{1e6 * uncapped_s / uncapped_groups:.1f} us per collective at {uncapped_groups} groups")
    assert capped_s < uncapped_s
