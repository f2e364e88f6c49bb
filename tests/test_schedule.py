"""The ISO schedule against the serial one on the same chunks (bitwise, TP 2 and 4 over gloo, a slow emulated
link), and the row-signal path's per-group all-reduces."""

import pytest
import torch

from iso_kernels import checkpoint, comm, launch, schedule
from iso_kernels.split import ChunkSplit

SEQ_LEN, BATCH = 37, 2
SPLITS = [ChunkSplit.even(SEQ_LEN), ChunkSplit.at(SEQ_LEN, 0.3), ChunkSplit.at(SEQ_LEN, 20),
          ChunkSplit((5, 16, 30, 37))]


def _iso_equals_serial(rank, world_size, folder, tokens, link):
    model = checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size)
    model.setup_caches(*tokens.shape)
    communicator = comm.make_communicator("torch", link=link)
    equal = []
    with torch.inference_mode():
        for split in SPLITS:
            iso = schedule.forward(model, tokens, communicator, split, schedule="iso")
            serial = schedule.forward(model, tokens, communicator, split, schedule="serial")
            equal.append(torch.equal(iso, serial))
    return equal


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_iso_is_bitwise_equal_to_serial_on_same_chunks(tiny_checkpoint, world_size):
    tokens = torch.randint(0, 512, (BATCH, SEQ_LEN))
    # A slow emulated link makes the ISO schedule really run ahead of the all-reduces it does not need yet, and
    # delivers each result only at wait(): reading a chunk's block output before waiting would see partial sums.
    link = comm.LinkModel("slow", latency_s=2e-3, bus_bandwidth=1e8)
    for rank_result in launch.spawn_ranks(_iso_equals_serial, world_size, args=(str(tiny_checkpoint), tokens, link)):
        assert rank_result == [True] * len(SPLITS)


def test_rejects_a_split_of_another_length(tiny_checkpoint):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    model.setup_caches(BATCH, SEQ_LEN)
    with pytest.raises(ValueError, match="covers 36 positions, tokens have 37"):
        schedule.forward(model, torch.zeros(BATCH, SEQ_LEN, dtype=torch.long), None, ChunkSplit((20, 36)))


class _FlagCheckingComm:
    """A TP=1 stand-in for a flag-triggered communicator: records each row group's flag at start time."""

    supports_ready_flag = True
    name = "flag-check"

    def __init__(self):
        self.starts = []

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        signal, index, target = ready_flag
        self.starts.append((signal[index].item(), target, tensor.shape[0]))
        return comm.PendingAllReduce(tensor)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_row_signal_all_reduces_start_per_finished_group(tiny_checkpoint, backend):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    model.setup_caches(BATCH, SEQ_LEN)
    tokens = torch.randint(0, 512, (BATCH, SEQ_LEN))
    split = ChunkSplit.at(SEQ_LEN, 0.5)
    flags = _FlagCheckingComm()
    with torch.inference_mode():
        plain = schedule.forward(model, tokens, None, split)
        signalled = schedule.forward(model, tokens, flags, split, row_signal_rows=16)
    torch.testing.assert_close(signalled, plain, atol=1e-5, rtol=1e-5)
    # 2 layers x 2 blocks x 2 chunks; a chunk of 2 x 18 or 2 x 19 rows is 3 groups of <= 16 rows
    assert len(flags.starts) == 2 * 2 * 2 * 3
    hidden = model.args.dim
    assert all(value == target == rows * hidden for value, target, rows in flags.starts)
    # the signal is set only while its half runs
    assert all(layer.attention.wo.row_signal is None and layer.feed_forward.w2.row_signal is None
               for layer in model.layers)
