"""``schedule.forward`` reads no device data back to the host: on CUDA such a read (``.item()``, ``.tolist()``,
``.cpu()``, ``nonzero``, a tensor's truth value) is a host sync that waits for the queued work, a chunk's
pending all-reduce included, and idles the GPU while the host refills its queue. On CPU every tensor stands in
for a device tensor: a dispatch mode counts the reads aten sees and wrappers count those that bypass it
(``tolist``, ``numpy``, ``cpu``). The ops' own kernels are not counted: on CUDA they are Triton launches, and
their CPU kernels (the stand-ins here) read their index tensors by design."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iso_kernels import checkpoint, models, ops, schedule
from iso_kernels.batch import add_prompts, cache_prefix
from iso_kernels.paged_cache import IndexTensors, PackedBatch
from iso_kernels.split import ChunkSplit

VOCAB = models.PRESETS["llama-tiny"]["vocab_size"]
READ_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
            torch.ops.aten.nonzero.default, torch.ops.aten.is_nonzero.default}
UNDISPATCHED_READS = ("tolist", "numpy", "cpu")


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor data outside the ``iso_kernels`` ops' kernels, by what read."""

    def __init__(self):
        super().__init__()
        self.reads, self._in_kernel = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "iso_kernels":
            self._in_kernel += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self._in_kernel -= 1
        if func in READ_OPS and not self._in_kernel:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, name):
        if not self._in_kernel:
            self.reads.append(name)


@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    counter = HostReads()
    for name in UNDISPATCHED_READS:
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, _name=name, _original=original, **kwargs):
            counter.count(f"Tensor.{_name}")
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with counter:
        yield counter
    monkeypatch.undo()


class _Passthrough:
    """A communicator that reduces nothing and reads nothing: what is counted is the schedule's own."""

    supports_ready_flag = False

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        from iso_kernels.comm import PendingAllReduce

        return PendingAllReduce(tensor)


@pytest.fixture
def model(tiny_checkpoint):
    return checkpoint.load_checkpoint(tiny_checkpoint)


def test_the_detector_sees_every_kind_of_read(monkeypatch):
    x = torch.arange(6.0)
    with counting_host_reads(monkeypatch) as reads:
        x.sum().item(), x.tolist(), x.cpu(), x.nonzero(), bool(x[1] > 0), x.numpy()
    assert sorted(reads.reads) == sorted(["aten._local_scalar_dense.default", "Tensor.tolist", "Tensor.cpu",
                                          "aten.nonzero.default", "aten._local_scalar_dense.default",
                                          "Tensor.numpy"])


def test_the_detector_sees_the_varlen_ops_value_checks(monkeypatch):
    """The op's public function checks the index values (one read) unless its caller vouches for them."""
    q, cache = torch.randn(5, 2, 16), torch.randn(1, 16, 2, 16)
    index = dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32),
                 seqused_k=torch.tensor([7], dtype=torch.int32))
    with counting_host_reads(monkeypatch) as checked:
        ops.chunked_attention_varlen(q, cache, cache, **index)
    with counting_host_reads(monkeypatch) as vouched:
        ops.chunked_attention_varlen(q, cache, cache, **index, check_index_values=False)
    assert checked.reads and not vouched.reads


@pytest.mark.parametrize("mode", ["iso", "serial"])
def test_a_single_request_forward_reads_nothing_back(model, monkeypatch, mode):
    tokens = torch.randint(0, VOCAB, (2, 45))
    model.setup_caches(2, 45)
    with torch.inference_mode():
        expected = schedule.forward(model, tokens, _Passthrough(), ChunkSplit((13, 30, 45)), schedule=mode)
        with counting_host_reads(monkeypatch) as reads:
            logits = schedule.forward(model, tokens, _Passthrough(), ChunkSplit((13, 30, 45)), schedule=mode,
                                      all_logits=False)
    assert reads.reads == []
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-5)  # the head on one row, not all


@pytest.mark.parametrize("all_logits", [True, False])
def test_a_packed_forward_reads_nothing_back(model, monkeypatch, all_logits):
    """A batch with a cached prefix, chunks cut inside requests; its index tensors are built inside the counted
    forward, from the host tuples (no device data)."""
    cache = model.setup_paged_caches(16, 96, block_size=16)
    with torch.inference_mode():
        owner = cache_prefix(model, cache, torch.randint(0, VOCAB, (20,)))
        prompts = [torch.randint(0, VOCAB, (n,)) for n in (3, 40, 17)]
        tokens, batch = add_prompts(cache, prompts, prefixes=[None, (owner, 20), None])
        with counting_host_reads(monkeypatch) as reads:
            schedule.forward(model, tokens, _Passthrough(), ChunkSplit((10, 41, 60)), start=batch,
                             all_logits=all_logits)
    assert reads.reads == []


def _assert_cut_equals_rebuilt(part):
    """``part``'s index tensors, cut from its whole batch's, against those built from its host tuples as for a
    whole batch. A cut block table keeps the whole batch's width: the columns past a slice's own are padding."""
    rebuilt = IndexTensors.build(PackedBatch(part.q_lens, part.starts, part.block_tables, part.block_size))
    for name, expected in vars(rebuilt).items():
        got = getattr(part.index_tensors, name)
        if name == "block_table":
            got = got[:, :expected.shape[1]]
        assert torch.equal(got, expected), (part.stream_offset, part.total, name)


def test_a_slices_index_tensors_cut_on_the_device_equal_those_built_from_its_host_tuples():
    batch = PackedBatch((3, 5, 2, 9), (0, 10, 4, 30), ((0,), (1,), (2,), (3, 4, 5)), 16, requests=(7, 8, 9, 10))
    for begin, end in [(0, 19), (2, 7), (3, 8), (7, 18), (9, 12)]:
        _assert_cut_equals_rebuilt(batch.slice(begin, end))
    # A slice of a slice is cut from the whole batch.
    inner = batch.slice(2, 17).slice(4, 11)
    assert inner.whole is batch and inner.stream_offset == 6
    _assert_cut_equals_rebuilt(inner)


def test_pages_outside_the_pool_are_refused_on_the_host(model):
    model.setup_paged_caches(4, 64, block_size=16)
    batch = PackedBatch((4,), (0,), ((4,),), 16)
    with pytest.raises(ValueError, match="page 4 is outside the pool's 4 pages"):
        model(torch.zeros(1, 4, dtype=torch.long), start=batch)
