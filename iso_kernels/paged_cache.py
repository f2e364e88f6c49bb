"""A paged KV cache for serving batches, and ``PackedBatch``: several requests' new tokens packed in one stream.

Every layer stores K and V in pages of ``block_size`` tokens (``PagedKVCache``: (num_blocks, block_size,
n_kv_heads, head_dim) each); all layers use the same page numbers, so one ``PagedCache`` keeps, per request,
its block table (its pages in token order) and its length (the tokens whose K/V are stored). Requests with a
common prefix share that prefix's full pages, so a prefill computes only the tokens after it.

A ``PackedBatch`` says where the tokens of a packed stream belong: request after request, each with its new
tokens and the positions they take in it. The model runs such a stream as tokens of shape (1, total): RoPE at
each token's position, K/V written to its slot, attention by ``ops.chunked_attention_varlen`` over the pages.
``PackedBatch.slice`` cuts a stream by token index, so the ISO schedule's chunks may end inside a request:
the part after the cut attends to the part before it through the cache, like a chunk of a single prompt.
"""

import functools
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops

# vLLM's default page size; chunked_attention_varlen takes powers of two in [16, 256].
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class PackedBatch:
    """Request i of a packed stream: its ``q_lens[i]`` new tokens come after those of request i - 1 and take its
    positions ``starts[i] .. starts[i] + q_lens[i] - 1`` (``starts[i]`` tokens of it are cached already: a
    shared prefix, or earlier chunks); ``block_tables[i]`` are its pages, position p in slot ``p % block_size``
    of page ``block_tables[i][p // block_size]``. ``requests`` are the ``PagedCache`` ids, for the caller.

    Host tuples describe the batch and are checked here, once. The index tensors the model reads are made once
    per batch, on ``device``, by one copy from pinned memory that does not block the host (``index_tensors``);
    a ``slice`` cuts its own out of its whole batch's on the device, so running a batch in chunks reads
    nothing back to the host.
    """

    q_lens: tuple
    starts: tuple
    block_tables: tuple
    block_size: int
    requests: tuple = ()
    device: torch.device | str = "cpu"
    # A slice: the whole batch it was cut from, where its stream begins there, and its first request's index
    # there (its index tensors are views and device arithmetic on the whole batch's).
    whole: "PackedBatch | None" = field(default=None, repr=False, compare=False)
    stream_offset: int = 0
    first_request: int = 0

    def __post_init__(self):
        if not len(self.q_lens) == len(self.starts) == len(self.block_tables):
            raise ValueError(f"q_lens, starts and block_tables must have one entry per request, got "
                             f"{len(self.q_lens)}, {len(self.starts)} and {len(self.block_tables)}")
        for i, (n, start, table) in enumerate(zip(self.q_lens, self.starts, self.block_tables, strict=True)):
            if n < 1 or start < 0:
                raise ValueError(f"request {i}: needs >= 1 new token and start >= 0, got {n} and {start}")
            if len(table) * self.block_size < start + n:
                raise ValueError(f"request {i}: {len(table)} pages of {self.block_size} cannot hold "
                                 f"{start + n} tokens")

    # --- host-side description ---
    @property
    def total(self):
        return sum(self.q_lens)

    @functools.cached_property
    def cu_seqlens(self):
        """Where each request's tokens begin in the stream, and the stream's end: (batch + 1,) ints."""
        bounds = [0]
        for n in self.q_lens:
            bounds.append(bounds[-1] + n)
        return tuple(bounds)

    @property
    def max_end(self):
        """One past the last position of any request: what the RoPE tables must cover."""
        return max(start + n for start, n in zip(self.starts, self.q_lens, strict=True))

    @property
    def last_rows(self):
        """The stream index of each request's last token: the rows of next-token logits."""
        return [end - 1 for end in self.cu_seqlens[1:]]

    def slice(self, begin, end):
        """The batch of stream tokens [begin, end): the requests that have tokens there, each cut to them."""
        keep = []
        for i, (a, b) in enumerate(itertools.pairwise(self.cu_seqlens)):
            lo, hi = max(a, begin), min(b, end)
            if lo < hi:
                keep.append((i, hi - lo, self.starts[i] + lo - a))
        if not keep:
            raise ValueError(f"stream tokens [{begin}, {end}) are outside the batch's {self.total}")
        whole = self.whole or self
        return PackedBatch(tuple(n for _, n, _ in keep), tuple(start for _, _, start in keep),
                           tuple(self.block_tables[i] for i, _, _ in keep), self.block_size,
                           tuple(self.requests[i] for i, _, _ in keep) if self.requests else (), self.device,
                           whole, self.stream_offset + begin, self.first_request + keep[0][0])

    def unpack(self, packed):
        """Per request, its rows of ``packed`` (total, ...): a list of (q_lens[i], ...) views."""
        return [packed[a:b] for a, b in itertools.pairwise(self.cu_seqlens)]

    def check_tokens(self, tokens):
        """Refuse a token tensor that is not this batch's stream (1, total)."""
        if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] != self.total:
            raise ValueError(f"a packed batch of {len(self.q_lens)} requests runs tokens of shape (1, {self.total}), "
                             f"got {tuple(tokens.shape)}")

    def check_pages(self, num_blocks):
        """Refuse page numbers outside a pool of ``num_blocks`` pages (on the host: no device read)."""
        for i, table in enumerate(self.block_tables):
            bad = [page for page in table if not 0 <= page < num_blocks]
            if bad:
                raise ValueError(f"request {i}: page {bad[0]} is outside the pool's {num_blocks} pages")

    # --- index tensors for the attention op and the cache writes ---
    @functools.cached_property
    def index_tensors(self):
        """The batch's ``IndexTensors`` on ``device``: built once for the whole batch, cut on the device for a
        slice. Build them before a CUDA graph captures a forward of the batch (the copy reads host memory)."""
        if self.whole is None:
            return IndexTensors.build(self)
        return self.whole.index_tensors.cut(self.first_request, len(self.q_lens), self.stream_offset, self.total)

    @property
    def cu_seqlens_q(self):
        """(batch + 1,) int32: where each request's tokens begin in the stream, and its end."""
        return self.index_tensors.cu_seqlens_q

    @property
    def seqused_k(self):
        """(batch,) int32: the keys each request's attention reads, its cached ones and its tokens in the batch."""
        return self.index_tensors.seqused_k

    @property
    def block_table(self):
        """(batch, max pages) int32; rows padded with page 0, which the op never reads past seqused_k."""
        return self.index_tensors.block_table

    @property
    def positions(self):
        """(total,) int64: each token's position in its request (the RoPE row)."""
        return self.index_tensors.positions

    @property
    def slots(self):
        """(total,) int64: each token's row in the pages flattened to (num_blocks * block_size, ...)."""
        return self.index_tensors.slots

    def last_rows_in(self, begin, end):
        """(k,) int64 on ``device``: the rows, counted from ``begin``, of the requests' last tokens (``last_rows``)
        that fall in stream tokens [begin, end) of this batch; None when none does."""
        ends = self.last_rows
        first = next((j for j, row in enumerate(ends) if row >= begin), len(ends))
        count = sum(1 for row in ends[first:] if row < end)
        if count == 0:
            return None
        return self.index_tensors.last_rows[first:first + count] - begin


@dataclass(frozen=True)
class IndexTensors:
    """A packed batch's index tensors on its device: what the attention op reads (cu_seqlens_q, seqused_k,
    block_table, int32) and the cache writes and RoPE read (slots, positions, int64), plus each request's last
    stream row (last_rows, int64) for the LM head."""

    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    last_rows: torch.Tensor

    @staticmethod
    def build(batch):
        """All of them from ``batch``'s host tuples, made on the CPU and moved in one copy: from pinned memory
        and non-blocking where the device is a GPU."""
        q_lens = torch.tensor(batch.q_lens, dtype=torch.int64)
        starts = torch.tensor(batch.starts, dtype=torch.int64)
        cu = torch.tensor(batch.cu_seqlens, dtype=torch.int64)
        width = max(len(table) for table in batch.block_tables)
        table = torch.tensor([list(t) + [0] * (width - len(t)) for t in batch.block_tables], dtype=torch.int64)
        request_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens, output_size=batch.total)
        positions = torch.arange(batch.total) - cu[request_of_token] + starts[request_of_token]
        pages = table[request_of_token, positions // batch.block_size]
        slots = pages * batch.block_size + positions % batch.block_size
        parts = (cu, starts + q_lens, table.flatten(), positions, slots, cu[1:] - 1)
        flat = torch.cat(parts)
        device = torch.device(batch.device)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        cu, seqused, table_flat, positions, slots, last_rows = flat.split([len(part) for part in parts])
        return IndexTensors(cu.to(torch.int32), seqused.to(torch.int32),
                            table_flat.view(len(q_lens), width).to(torch.int32), positions, slots, last_rows)

    def cut(self, first, count, offset, length):
        """The index tensors of ``count`` requests from request ``first`` on, cut to stream tokens
        [offset, offset + length): views and device arithmetic, nothing read back to the host."""
        end = offset + length
        bounds = self.cu_seqlens_q[first:first + count + 1]
        cu = bounds.clamp(offset, end) - offset
        # A request cut at ``end`` reads its keys up to there: seqused_k less its tokens after the cut.
        next_starts = bounds[1:]
        seqused = self.seqused_k[first:first + count] - (next_starts - next_starts.clamp(max=end))
        return IndexTensors(cu, seqused, self.block_table[first:first + count], self.positions[offset:end],
                            self.slots[offset:end], cu[1:].long() - 1)


class KVBuffers(nn.Module):
    """One layer's K and V: zero buffers of ``shape``, not saved with the weights."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class PagedKVCache(KVBuffers):
    """One layer's K and V pages: (num_blocks, block_size, n_kv_heads, head_dim) each."""

    def __init__(self, num_blocks, block_size, n_kv_heads, head_dim, dtype, device):
        super().__init__((num_blocks, block_size, n_kv_heads, head_dim), dtype, device)

    def attend(self, q, k, v, batch: PackedBatch, *, window_size=(-1, -1)):
        """q: (1, total, n_head, head_dim), k, v: (1, total, n_kv_heads, head_dim) of ``batch``'s tokens. Stores
        k and v in their slots, then returns each request's causal attention over its pages, shaped like q;
        ``window_size=(left, right)`` limits it to a sliding window (``ops.chunked_attention_varlen``'s)."""
        for pages, new in ((self.k, k), (self.v, v)):
            pages.view(-1, *pages.shape[2:]).index_copy_(0, batch.slots, new[0])
        # The batch checked its values on the host (PackedBatch, Transformer.check_positions): no device read.
        out = ops.chunked_attention_varlen(q[0], self.k, self.v, cu_seqlens_q=batch.cu_seqlens_q,
                                           seqused_k=batch.seqused_k, block_table=batch.block_table,
                                           window_size=window_size, check_index_values=False)
        return out[None]

    def copy_page(self, src, dst):
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]


class BlockAllocator:
    """Hands out the page numbers of a pool; a page several requests share is free again once all release it."""

    def __init__(self, num_blocks):
        self.holders = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self):
        return len(self.free)

    def allocate(self):
        if not self.free:
            raise RuntimeError(f"out of KV cache pages: all {len(self.holders)} are in use")
        page = self.free.pop()
        self.holders[page] = 1
        return page

    def share(self, page):
        if self.holders[page] == 0:
            raise ValueError(f"page {page} is free: only a page in use can be shared")
        self.holders[page] += 1

    def release(self, page):
        if self.holders[page] == 0:
            raise ValueError(f"page {page} is already free")
        self.holders[page] -= 1
        if self.holders[page] == 0:
            self.free.append(page)


class PagedCache:
    """The requests of a serving batch and the pages they hold, over every layer's ``PagedKVCache``.

    Each rank of a tensor-parallel group keeps its own and makes the same calls, so all hand out the same pages.
    """

    def __init__(self, layers, max_seq_len):
        self.layers = list(layers)  # one PagedKVCache per model layer, indexed by the same page numbers
        num_blocks, self.block_size = self.layers[0].k.shape[:2]
        self.max_seq_len = max_seq_len
        self.allocator = BlockAllocator(num_blocks)
        self.tables, self.lengths = {}, {}
        self._next_id = 0

    def add_request(self, *, prefix_of=None, prefix_len=0):
        """A new request's id. With ``prefix_of``, it begins with that request's first ``prefix_len`` tokens,
        whose K/V are not computed again: it shares their full pages and gets a copy of a partly used last one
        (it will write its own tokens there)."""
        request, self._next_id = self._next_id, self._next_id + 1
        table = []
        if prefix_of is not None:
            if not 0 <= prefix_len <= self.lengths[prefix_of]:
                raise ValueError(f"prefix_len {prefix_len} is outside request {prefix_of}'s "
                                 f"{self.lengths[prefix_of]} cached tokens")
            full, partial = divmod(prefix_len, self.block_size)
            table = list(self.tables[prefix_of][:full])
            for page in table:
                self.allocator.share(page)
            if partial:
                table.append(self._copy_of(self.tables[prefix_of][full]))
        self.tables[request], self.lengths[request] = table, prefix_len if prefix_of is not None else 0
        return request

    def _copy_of(self, page):
        copy = self.allocator.allocate()
        for layer in self.layers:
            layer.copy_page(page, copy)
        return copy

    def append(self, requests, counts):
        """Reserve ``counts[i]`` new tokens at the end of request ``requests[i]`` (pages as needed); returns the
        ``PackedBatch`` of those tokens, in this order. The tokens' K/V are stored when the model runs it."""
        if len(set(requests)) != len(requests):
            raise ValueError(f"a request may appear once in a batch, got {list(requests)}")
        needed = 0
        for request, count in zip(requests, counts, strict=True):
            if count < 1:
                raise ValueError(f"request {request}: a batch adds >= 1 token to each of its requests, got {count}")
            end = self.lengths[request] + count
            if end > self.max_seq_len:
                raise ValueError(f"request {request} would hold {end} tokens, beyond the {self.max_seq_len} "
                                 "of setup_paged_caches")
            needed += max(0, -(-end // self.block_size) - len(self.tables[request]))
        if needed > self.allocator.num_free:  # refuse before changing anything
            raise RuntimeError(f"out of KV cache pages: the batch needs {needed} more, {self.allocator.num_free} "
                               "are free")
        starts = []
        for request, count in zip(requests, counts, strict=True):
            start = self.lengths[request]
            table = self.tables[request]
            while len(table) * self.block_size < start + count:
                table.append(self.allocator.allocate())
            starts.append(start)
            self.lengths[request] = start + count
        return PackedBatch(tuple(counts), tuple(starts), tuple(tuple(self.tables[r]) for r in requests),
                           self.block_size, tuple(requests), self.layers[0].k.device)

    def release(self, request):
        """Drop a finished request; pages no other request shares are free again."""
        for page in self.tables.pop(request):
            self.allocator.release(page)
        del self.lengths[request]
