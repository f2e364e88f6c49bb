"""Prefill schedules: serial (compute, then all-reduce) and ISO (one chunk's all-reduce overlaps another's compute).

Per layer both run, on the compute stream,

    attention(c1), attention(c2), ..., mlp(c1), mlp(c2), ...

and start each block's all-reduce as soon as its output exists. ``serial`` waits for every all-reduce at once;
``iso`` waits only where a chunk needs the result: chunk c's MLP waits for its own attention all-reduce and its
next attention block for its own MLP all-reduce. Chunk c's attention reads the K/V that earlier chunks wrote to
the cache in the same layer. Both schedules run the same arithmetic in the same order, so with the same chunks
their logits are bitwise equal; only the waiting differs.
"""

import contextlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .comm import Communicator, PendingAllReduce
from .paged_cache import PackedBatch
from .split import ChunkSplit

if TYPE_CHECKING:  # annotations only: forward runs the model and timeline it is given, it imports neither
    from .model import Transformer
    from .timeline import Timeline

SCHEDULES = ("serial", "iso")
# At most this many row-group all-reduces per block (one chunk's attention or MLP). Each group costs the host
# the schedule's issue path (tests/test_row_signal.py, no-op communicator, 2-core dev CPU: 3 us, 7-12 us at
# load 12) plus the native communicator's checks, two CUDA events, a flag-wait and an NCCL launch (not yet
# measured), and costs the comm stream one collective latency. The gain is bounded by the block's all-reduce:
# G groups leave about 1/G of it exposed after the GEMM, so 8 groups hide 7/8 and 32 only 9 points more. A
# llama-1b block of 4k tokens computes for ~0.3-0.5 ms on one H200 (its FLOPs at ~600 TFLOP/s): 32 groups of
# 128 rows (1024 collectives per prefill) at 10-30 us each would keep the host as busy as the GPU; 8 take a
# quarter. Larger groups also help the GEMM: gemm_signal caps GROUP_M * BLOCK_M (row tiles sharing weight
# tiles through L2) at rows_per_signal.
MAX_ROW_GROUPS = 8
# Group sizes on the 16-row grid of gemm_signal's smallest row tile: a tile that straddles two groups
# completes the first only once it has computed rows of the second too.
SIGNAL_ROW_MULTIPLE = 16


def row_group_rows(rows, requested, max_groups=MAX_ROW_GROUPS):
    """Rows per signal group of a block of ``rows`` rows: at least ``requested``, and enough that the block
    issues at most ``max_groups`` all-reduces, rounded up to a multiple of SIGNAL_ROW_MULTIPLE.

    The cap is taken from the next power of two above ``rows``, gemm_signal's autotune bucket of M, rather than
    from ``rows`` itself: chunks of any length in one bucket then share a group size and add no autotune key.
    """
    if requested < 1 or max_groups < 1:
        raise ValueError(f"requested rows and max_groups must be >= 1, got {requested} and {max_groups}")
    bucket = 1 << max(rows - 1, 0).bit_length()
    group = max(requested, -(-bucket // max_groups))
    return -(-group // SIGNAL_ROW_MULTIPLE) * SIGNAL_ROW_MULTIPLE


@dataclass
class RowSignal:
    """Counters that ``gemm_signal`` raises per group of ``rows_per_signal`` output rows.

    ``after`` is recorded on the compute stream once the counters are zeroed and before the GEMM is launched:
    the comm stream waits for it, then for each group's counter, never for the whole GEMM. Without it a flag
    wait could read a recycled buffer's old "done" value before the zeroing ran.
    """

    counters: torch.Tensor
    rows_per_signal: int
    after: object = None


class _Chunk:
    """One chunk's residual stream and the all-reduce it still has to wait for.

    start: the position of the chunk's first token (int), or the ``PackedBatch`` of its part of a packed stream.
    head_rows: which of its rows (dim 1) the LM head runs on: a slice or an index tensor; None for none.
    """

    def __init__(self, start, hidden, head_rows):
        self.start, self.residual, self.head_rows = start, hidden, head_rows
        self.pending = None

    def take_reduced(self):
        """Wait for the chunk's pending all-reduce; None before the first layer."""
        pending, self.pending = self.pending, None
        return pending.wait() if pending is not None else None


def forward(model: "Transformer", tokens: torch.Tensor, comm: Communicator | None = None,
            split: ChunkSplit | None = None, *, start: int | PackedBatch = 0, schedule: str = "iso",
            timeline: "Timeline | None" = None, all_logits: bool = True,
            row_signal_rows: int | None = None) -> torch.Tensor:
    """Run ``tokens`` (batch, n) at positions [start, start + n) through ``model`` in the chunks of ``split``
    (a ``ChunkSplit`` of n tokens; default one chunk); return fp32 logits.

    A packed batch of requests (``iso_kernels.paged_cache``, the model's paged caches) runs the same way:
    ``start`` is its ``PackedBatch`` and ``tokens`` (1, total) its stream. The split cuts the stream by token
    count, so a chunk may end inside a request; the request's next chunk attends to it through the cache.

    comm: an ``iso_kernels.comm`` communicator of the tensor-parallel group, or None at TP=1.
    schedule: "serial" or "iso". all_logits: logits for every position (batch, n, vocab), else the last
    position's (batch, vocab), of a packed batch the last of each request's (requests, vocab).
    row_signal_rows: with a communicator that starts collectives from device flags, row-parallel GEMMs announce
    finished row groups of at least this many rows (``row_group_rows``: at most MAX_ROW_GROUPS per block) and
    each group's all-reduce starts as soon as it is stored (GPU only).

    ``forward`` never reads device data back to the host, so on a GPU the host runs ahead of the chunks
    (tests/test_host_syncs.py), and never settles the communicator: call ``settle(comm)`` on every rank after a
    job's forwards. A CUDA graph can capture it after one eager run of the same shapes (which compiles, tunes,
    warms the row-signal kernels and builds a packed batch's index tensors); while capturing it refuses a
    timeline and anything that eager run would have done.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n = tokens.shape[1]
    split = split or ChunkSplit((n,))
    if split.seq_len != n:
        raise ValueError(f"split {list(split.ends)} covers {split.seq_len} positions, tokens have {n}")
    model.check_positions(tokens, start)
    span = timeline.span if timeline is not None else _no_span
    reducer = _Reducer(comm, schedule, timeline, row_signal_rows)
    if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
        _check_capturable(model, tokens, split, start, timeline, reducer.row_signal_rows)
    elif reducer.row_signal_rows is not None and tokens.is_cuda:
        _warm_row_signal_kernels(model, tokens, split, start, reducer.row_signal_rows)
    chunks = _make_chunks(model.tok_embeddings(tokens), split, start, all_logits)

    # Each half ends where its all-reduce starts; only the waiting (take_reduced) differs between schedules,
    # and waiting is not compute: outside the spans.
    for index, layer in enumerate(model.layers):
        for c, chunk in enumerate(chunks):
            update = chunk.take_reduced()
            with span("attention", c, index), reducer.signalling(layer.attention.row_parallel, chunk) as signal:
                out, chunk.residual = layer.attention_half(chunk.residual, update, chunk.start, model.rope)
            chunk.pending = reducer.start(out, c, index, "attention", signal)
        for c, chunk in enumerate(chunks):
            update = chunk.take_reduced()
            with span("mlp", c, index), reducer.signalling(layer.feed_forward.row_parallel, chunk) as signal:
                out, chunk.residual = layer.mlp_half(chunk.residual, update)
            chunk.pending = reducer.start(out, c, index, "mlp", signal)

    logits = []
    for c, chunk in enumerate(chunks):
        update = chunk.take_reduced()
        if chunk.head_rows is not None:
            with span("head", c, len(model.layers)):
                rows = chunk.head_rows
                logits.append(model.head(chunk.residual[:, rows], update[:, rows]))
    logits = torch.cat(logits, dim=1)
    if all_logits:
        return logits
    return logits[0] if isinstance(start, PackedBatch) else logits[:, -1]


def settle(comm) -> None:
    """Every rank, after the forwards of a job (outside their timed region, never while a CUDA graph captures):
    the communicator's failure agreement. A failure on any rank (a timed-out flag wait, an NCCL error) is raised
    here on all of them alike; it costs one collective and a host sync, which ``forward`` itself never does.
    Duck-typed stand-ins (tests) and None (TP 1) need not have it."""
    settle_comm = getattr(comm, "settle", None)
    if settle_comm is not None:
        settle_comm()


def _check_capturable(model, tokens, split, start, timeline, row_signal_rows):
    """Refuse what a CUDA graph cannot capture: timing events, a first launch of the row-signal kernels (their
    warm-up compiles and runs collectives-free passes) and a packed batch's first host-to-device index copy."""
    if timeline is not None:
        raise ValueError("timeline records timing events: pass none while a CUDA graph captures")
    key = _row_signal_key(tokens, split, start, row_signal_rows)
    if row_signal_rows is not None and key not in _WARMED_ROW_SIGNAL.get(model, ()):
        raise RuntimeError("run one eager forward with these chunks and row signals before capturing it (the "
                           "row-signal kernels' warm-up cannot be captured)")
    if isinstance(start, PackedBatch) and "index_tensors" not in vars(start):
        raise RuntimeError("build the packed batch's index tensors before capturing a forward of it "
                           "(batch.index_tensors, or one eager forward)")


def _make_chunks(embedded, split, start, all_logits):
    """The chunks of ``split``, each with its positions and the rows its LM head runs on: all of them, the last
    chunk's last row, or the last rows of the packed requests that end in it."""
    bounds = split.bounds()
    if not isinstance(start, PackedBatch):
        rows = [slice(None) if all_logits else None] * len(bounds)
        if not all_logits:
            rows[-1] = slice(-1, None)
        return [_Chunk(start + a, embedded[:, a:b].contiguous(), r) for (a, b), r in zip(bounds, rows, strict=True)]
    return [_Chunk(start.slice(a, b), embedded[:, a:b].contiguous(),
                   slice(None) if all_logits else start.last_rows_in(a, b)) for a, b in bounds]


# model -> the (batch, chunk ends, rows per signal, device, packed) whose row-signal kernels have run once
_WARMED_ROW_SIGNAL = weakref.WeakKeyDictionary()


def _warm_row_signal_kernels(model, tokens, split, start, row_signal_rows):
    """Run the row-signal pass's compute kernels once, without collectives, before its first flag wait.

    A kernel's first launch can stall behind a flag wait spinning on the comm stream, until the wait times out:
    CUDA's lazy module loading loads the module then, and Triton compiles and autotunes (synchronising the
    device) at a shape's first launch. A pass with the same chunks and row signals but no collective does all
    of that up front. It writes the KV cache at the same positions, which the real pass overwrites before it
    reads them.
    """
    key = _row_signal_key(tokens, split, start, row_signal_rows)
    warmed = _WARMED_ROW_SIGNAL.setdefault(model, set())
    if key not in warmed:
        warmed.add(key)  # first: the warm-up pass itself must not warm up again
        forward(model, tokens, _NoCollectives(), split, start=start, schedule="serial", all_logits=False,
                row_signal_rows=row_signal_rows)


def _row_signal_key(tokens, split, start, row_signal_rows):
    return tokens.shape[0], split.ends, row_signal_rows, tokens.device, isinstance(start, PackedBatch)


class _NoCollectives:
    """A flag-capable stand-in communicator that reduces nothing and never waits (the warm-up pass)."""

    supports_ready_flag = True

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        return PendingAllReduce(tensor)


@contextlib.contextmanager
def _no_span(*_):
    yield


class _Reducer:
    """Starts block all-reduces; in serial mode waits at once. Records comm intervals on the timeline."""

    def __init__(self, comm, schedule, timeline, row_signal_rows):
        self.comm, self.schedule, self.timeline = comm, schedule, timeline
        self.row_signal_rows = row_signal_rows if comm is not None and comm.supports_ready_flag else None

    def signal_for(self, block_input):
        """A zeroed counter buffer for the block's row-parallel GEMM, or None when row signals are off."""
        if self.row_signal_rows is None:
            return None
        rows = block_input.shape[0] * block_input.shape[1]
        rows_per_signal = row_group_rows(rows, self.row_signal_rows)
        groups = -(-rows // rows_per_signal)
        counters = torch.zeros(groups, dtype=torch.int32, device=block_input.device)
        after = None
        if counters.is_cuda:
            after = torch.cuda.Event()
            after.record()
        return RowSignal(counters, rows_per_signal, after)

    @contextlib.contextmanager
    def signalling(self, linear, chunk):
        """While a half runs on ``chunk``, its row-parallel ``linear`` raises the RowSignal this yields (None
        when row signals are off, or the half has no such GEMM: an MoE block)."""
        if linear is None:
            yield None
            return
        linear.row_signal = signal = self.signal_for(chunk.residual)
        try:
            yield signal
        finally:
            linear.row_signal = None

    def start(self, out, chunk, layer, kind, signal=None):
        """All-reduce ``out`` (the block's partial output); with ``signal``, per row group as it is stored."""
        if self.comm is None:
            return PendingAllReduce(out)  # TP=1 without a link: nothing to reduce
        if signal is not None:
            # The flags describe ``out`` itself: a copy would be ordered by neither them nor ``after``.
            if not out.is_contiguous():
                raise RuntimeError("a row-signalled block output must be contiguous")
            pending = _start_by_row_group(self.comm, out, signal)
        else:
            pending = self.comm.all_reduce_start(out.contiguous())
        if self.timeline is not None:
            self.timeline.comm(pending, kind, chunk, layer)
        if self.schedule == "serial":
            pending.wait()
        return pending


def _start_by_row_group(comm, out, signal):
    """One all-reduce per row group, each gated on its counter reaching the group's target."""
    flat = out.view(-1, out.shape[-1])
    rows, n = flat.shape
    # ops.signal_targets on the host, from the shape alone: no tensor to read back in the chunk loop.
    targets = [min(signal.rows_per_signal, rows - first) * n for first in range(0, rows, signal.rows_per_signal)]
    group_pending = [comm.all_reduce_start(flat[g * signal.rows_per_signal:(g + 1) * signal.rows_per_signal],
                                           ready_flag=(signal.counters, g, target), after=signal.after)
                     for g, target in enumerate(targets)]
    return PendingAllReduce.of_parts(out, group_pending)
