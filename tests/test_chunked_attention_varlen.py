"""chunked_attention_varlen: the Triton kernel (interpreted on CPU) and the CPU kernel (torch's fused attention per
sequence) against torch SDPA per sequence with a bottom-right mask, an explicit logsumexp, and the fp32 reference;
ragged sequences (empty ones too) over contiguous and paged caches with shuffled block tables; GQA/MQA; the
same bits as chunked_attention and as the unpaged layout; sliding windows against SDPA with a band mask built
here, and the key blocks outside a window never read; PagedKVCache.attend's window; opcheck; bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from iso_kernels.ops import chunked_attention, chunked_attention_varlen
from iso_kernels.paged_cache import PackedBatch, PagedKVCache
from iso_kernels.reference import chunked_attention_varlen_ref

from helpers import assert_close_to_ref, window_mask

# Queries per sequence and the keys cached before them (seqused_k = both): lengths that are not block multiples,
# a decode-like single query, a sequence with keys but no queries and one with neither. Interpreter blocks are
# 64 x 32.
Q_LENS = [1, 37, 0, 91, 200, 0]
EXTRA_KEYS = [0, 60, 5, 0, 33, 0]
MAX_KV = 250  # rows of the contiguous cache: past seqused_k they hold keys no query may see
BLOCK_SIZES = [None, 16, 64, 256]  # None: contiguous (batch, max_kv, ...) cache
HEADS = [(2, 2), (4, 1)]  # (n_heads, n_kv_heads): MHA and MQA; the main tests run GQA (4, 2)
DTYPES = [torch.float32, torch.float16]
HEAD_DIMS = [16, 128, 256]
BACKENDS = ["torch", "triton"]  # the op's CPU kernel and its Triton kernel (interpreted on CPU)
# (causal, window_size, block_size) over Q_LENS / EXTRA_KEYS (keys 1, 97, 5, 91, 233, 0; capacity MAX_KV): windows
# narrower than a key block (32 under the interpreter), spanning several, wider than most sequences but not the
# capacity (so the kernel still runs windowed), wider than every one; without causal both sides, left-only and
# right-only.
WINDOW_CASES = [
    (True, (5, -1), None),
    (True, (5, 0), 16),
    (True, (70, -1), 64),
    (True, (100, -1), None),
    (True, (1000, -1), 16),
    (False, (20, 7), None),
    (False, (40, -1), 16),
    (False, (-1, 3), 256),
]


def make_batch(q_lens, extra_keys, n_heads, n_kv_heads, head_dim, dtype, device, block_size=None,
               max_kv=MAX_KV):
    """(q, k_cache, v_cache, index kwargs, per-sequence keys and values). With ``block_size`` the caches are a
    pool of pages in shuffled order, with spare pages, and block-table entries past each sequence's pages point
    outside the pool (the op must not read them)."""
    kv_lens = [n + extra for n, extra in zip(q_lens, extra_keys, strict=True)]
    q = torch.randn(sum(q_lens), n_heads, head_dim, dtype=dtype, device=device)
    keys = [torch.randn(n, n_kv_heads, head_dim, dtype=dtype, device=device) for n in kv_lens]
    values = [torch.randn(n, n_kv_heads, head_dim, dtype=dtype, device=device) for n in kv_lens]
    index = {"cu_seqlens_q": torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                                          device=device),
             "seqused_k": torch.tensor(kv_lens, dtype=torch.int32, device=device)}
    if block_size is None:
        k_cache = torch.randn(len(q_lens), max_kv, n_kv_heads, head_dim, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        for seq, n in enumerate(kv_lens):
            k_cache[seq, :n], v_cache[seq, :n] = keys[seq], values[seq]
        return q, k_cache, v_cache, index, keys, values
    pages_per_seq = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(pages_per_seq) + 3
    order = torch.randperm(num_blocks).tolist()
    k_cache = torch.randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    max_blocks = -(-max_kv // block_size)
    block_table = torch.full((len(q_lens), max_blocks), num_blocks + 1000, dtype=torch.int32)
    for seq, (n, n_pages) in enumerate(zip(kv_lens, pages_per_seq, strict=True)):
        for page in range(n_pages):
            block = order.pop()
            block_table[seq, page] = block
            rows = slice(page * block_size, min(n, (page + 1) * block_size))
            k_cache[block, :rows.stop - rows.start] = keys[seq][rows]
            v_cache[block, :rows.stop - rows.start] = values[seq][rows]
    index["block_table"] = block_table.to(device)
    return q, k_cache, v_cache, index, keys, values


def per_sequence(q, index, keys, values):
    """(q_i, k_i, v_i) of the sequences that have queries, heads first."""
    bounds = index["cu_seqlens_q"].tolist()
    for seq, (k, v) in enumerate(zip(keys, values, strict=True)):
        if bounds[seq + 1] > bounds[seq]:
            group = q.shape[1] // k.shape[1]
            yield (q[bounds[seq]:bounds[seq + 1]].transpose(0, 1), k.transpose(0, 1).repeat_interleave(group, 0),
                   v.transpose(0, 1).repeat_interleave(group, 0))


def visible_keys(q_len, kv_len, causal, window_size=(-1, -1)):
    """(q_len, kv_len) bool, True where a query sees a key: query j of a sequence sits at position
    kv_len - q_len + j (bottom-right)."""
    return window_mask(q_len, kv_len, None, causal, window_size)


def sdpa_oracle(q, index, keys, values, causal=True, dtype=torch.float32, window_size=(-1, -1)):
    """torch SDPA in ``dtype``, one sequence at a time, with causal_lower_right masks (or, with a window, the
    boolean ``visible_keys``); packed like q."""
    outs = [q.new_empty(0, *q.shape[1:])]
    for qh, kh, vh in per_sequence(q, index, keys, values):
        mask = causal_lower_right(qh.shape[1], kh.shape[1]) if causal else None
        if window_size != (-1, -1):
            mask = visible_keys(qh.shape[1], kh.shape[1], causal, window_size).to(q.device)
        out = F.scaled_dot_product_attention(qh[None].to(dtype), kh[None].to(dtype), vh[None].to(dtype),
                                             attn_mask=mask)
        outs.append(out[0].transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


def lse_oracle(q, index, keys, values, causal=True, softmax_scale=None, window_size=(-1, -1)):
    """logsumexp over each query's visible keys of its fp32 scores: (n_heads, total_q)."""
    scale = softmax_scale or q.shape[-1] ** -0.5
    lses = [torch.empty(q.shape[1], 0)]
    for qh, kh, _ in per_sequence(q, index, keys, values):
        scores = qh.float() @ kh.float().transpose(1, 2) * scale
        visible = visible_keys(*scores.shape[1:], causal, window_size)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1).cpu())
    return torch.cat(lses, dim=1).to(q.device)


def check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values, causal=True, window_size=(-1, -1)):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    window = {"causal": causal, "window_size": window_size}
    ref, _ = chunked_attention_varlen_ref(q, k_cache, v_cache, **index, **window)
    torch_out, _ = chunked_attention_varlen_ref(q, k_cache, v_cache, **index, **window, upcast=False)
    assert_close_to_ref(out, ref, torch_out, name="output vs reference")
    assert_close_to_ref(out, sdpa_oracle(q, index, keys, values, causal, window_size=window_size),
                        sdpa_oracle(q, index, keys, values, causal, q.dtype, window_size), name="output vs SDPA")
    torch.testing.assert_close(lse, lse_oracle(q, index, keys, values, **window), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_causal_matches_sdpa(backend, device, block_size, dtype):
    q, k_cache, v_cache, index, keys, values = make_batch(Q_LENS, EXTRA_KEYS, 4, 2, 64, dtype, device, block_size)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values)


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("n_heads,n_kv_heads", HEADS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_mha_and_mqa(backend, device, n_heads, n_kv_heads, block_size):
    q, k_cache, v_cache, index, keys, values = make_batch([5, 70, 0], [40, 3, 9], n_heads, n_kv_heads, 64,
                                                          torch.float32, device, block_size, max_kv=120)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [None, 32])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_noncausal(backend, device, block_size, dtype):
    q, k_cache, v_cache, index, keys, values = make_batch([1, 37, 0, 91], [96, 60, 5, 0], 4, 2, 64, dtype, device,
                                                          block_size, max_kv=130)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, causal=False, return_lse=True)
    check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values, causal=False)


@pytest.mark.parametrize("causal,window_size,block_size", WINDOW_CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_window_matches_sdpa_with_a_band_mask(backend, device, causal, window_size, block_size):
    q, k_cache, v_cache, index, keys, values = make_batch(Q_LENS, EXTRA_KEYS, 4, 2, 64, torch.float16, device,
                                                          block_size)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, causal=causal, window_size=window_size,
                                        return_lse=True)
    check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values, causal, window_size)


# (causal, window_size): two sequences of one query tile each (BLOCK_M = 64 under the interpreter), whose windows
# start inside a key block (BLOCK_N = 32), far from their first keys.
SKIP_CASES = [(True, (50, -1)), (False, (21, 7))]


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("causal,window_size", SKIP_CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_window_never_reads_the_keys_before_it(backend, device, causal, window_size, block_size):
    """NaN in the keys and values before each sequence's first window, whole key blocks of them for the Triton
    kernel: a kernel that read them (a block it loads and only masks multiplies NaN values by probability 0)
    would return NaN, so a correct output shows they were skipped. For the Triton kernel, NaN in one masked key
    of a block it does load comes through (the check can fail)."""
    from triton_ops.chunked_attention import _INTERPRETER_CONFIG

    q_lens, extra_keys = [40, 30], [260, 220]
    q, k_cache, v_cache, index, keys, values = make_batch(q_lens, extra_keys, 2, 1, 64, torch.float32, device,
                                                          block_size, max_kv=300)
    expected = sdpa_oracle(q, index, keys, values, causal, window_size=window_size)
    block_n = 1 if backend == "torch" else _INTERPRETER_CONFIG.kwargs["BLOCK_N"]
    firsts = [(extra - window_size[0]) // block_n * block_n for extra in extra_keys]
    for seq, first in enumerate(firsts):
        assert first > 0 and not visible_keys(q_lens[seq], q_lens[seq] + extra_keys[seq], causal,
                                              window_size)[:, :first].any()
        poison_keys(k_cache, v_cache, index, seq, range(first))
    out = chunked_attention_varlen(q, k_cache, v_cache, **index, causal=causal, window_size=window_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if backend == "triton":
        assert firsts[0] < extra_keys[0] - window_size[0], "the first key loaded must be one no query sees"
        poison_keys(k_cache, v_cache, index, 0, range(firsts[0], firsts[0] + 1))
        out = chunked_attention_varlen(q, k_cache, v_cache, **index, causal=causal, window_size=window_size)
        assert torch.isnan(out[:q_lens[0]]).any()


def poison_keys(k_cache, v_cache, index, seq, positions):
    """NaN in keys and values ``positions`` of sequence ``seq``, wherever its cache holds them."""
    positions = torch.tensor(list(positions), dtype=torch.long)
    if "block_table" in index:
        block_size = k_cache.shape[1]
        rows = index["block_table"][seq, positions // block_size].long(), positions % block_size
    else:
        rows = seq, positions
    for cache in (k_cache, v_cache):
        cache[rows] = float("nan")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_paged_kv_cache_attends_within_its_window(backend, device):
    """PagedKVCache.attend stores the batch's K/V in its pages and passes its window to the op."""
    batch = PackedBatch(q_lens=(5, 40), starts=(30, 0), block_tables=((2, 0, 4), (1, 3, 5)), block_size=16,
                        device=device)
    cache = PagedKVCache(6, 16, 2, 64, torch.float32, device)
    cache.k.normal_(), cache.v.normal_()  # request 0's 30 cached keys
    q = torch.randn(1, batch.total, 4, 64, device=device)
    k, v = (torch.randn(1, batch.total, 2, 64, device=device) for _ in range(2))
    out = cache.attend(q, k, v, batch, window_size=(8, -1))
    expected = chunked_attention_varlen(q[0], cache.k, cache.v, cu_seqlens_q=batch.cu_seqlens_q,
                                        seqused_k=batch.seqused_k, block_table=batch.block_table,
                                        window_size=(8, -1))
    assert torch.equal(out[0], expected)
    assert not torch.allclose(out, cache.attend(q, k, v, batch))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(triton_backend, device, head_dim):
    q, k_cache, v_cache, index, keys, values = make_batch([5, 70], [40, 3], 2, 1, head_dim, torch.float16, device,
                                                          block_size=32, max_kv=96)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values)


@pytest.mark.parametrize("block_size", [None, 16])
def test_bfloat16_cpu_kernel(block_size):
    """bf16 on the CPU kernel (the interpreter's bf16 arithmetic is wrong: bf16 kernel tests run on GPUs)."""
    q, k_cache, v_cache, index, keys, values = make_batch(Q_LENS, EXTRA_KEYS, 4, 2, 64, torch.bfloat16, "cpu",
                                                          block_size)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    check_against_oracles(out, lse, q, k_cache, v_cache, index, keys, values)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_softmax_scale(backend, device):
    q, k_cache, v_cache, index, keys, values = make_batch([5, 70], [40, 3], 2, 1, 64, torch.float32, device, 16)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, softmax_scale=0.3, return_lse=True)
    ref, _ = chunked_attention_varlen_ref(q, k_cache, v_cache, **index, softmax_scale=0.3)
    torch_out, _ = chunked_attention_varlen_ref(q, k_cache, v_cache, **index, softmax_scale=0.3, upcast=False)
    assert_close_to_ref(out, ref, torch_out)
    torch.testing.assert_close(lse, lse_oracle(q, index, keys, values, softmax_scale=0.3), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (True, (20, -1)), (False, (30, 5))])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_equal_lengths_give_chunked_attentions_bits(backend, device, causal, window_size):
    """A batch of equal lengths over a contiguous cache is chunked_attention with bottom-right q_start, bit for
    bit: the same tiles and key loop (Triton), the same fused attention per sequence (CPU)."""
    batch, q_len, kv_len = 3, 97, 150
    q = torch.randn(batch, q_len, 4, 64, device=device)
    k, v = (torch.randn(batch, kv_len, 2, 64, device=device) for _ in range(2))
    cu_seqlens_q = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
    seqused_k = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    window = {"causal": causal, "window_size": window_size}
    out, lse = chunked_attention_varlen(q.flatten(0, 1), k, v, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
                                        **window, return_lse=True)
    dense_out, dense_lse = chunked_attention(q, k, v, **window, return_lse=True)
    assert torch.equal(out, dense_out.flatten(0, 1))
    assert torch.equal(lse, dense_lse.transpose(0, 1).flatten(1))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_paged_gives_the_contiguous_bits(backend, device):
    """The same keys through shuffled pages of 16 and 256 tokens as in a contiguous cache: the same bits."""
    q_lens, extra = [5, 70, 0, 33], [40, 3, 9, 100]
    q, k_cache, v_cache, index, _, _ = make_batch(q_lens, extra, 4, 2, 64, torch.float16, device, max_kv=140)
    dense = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    for block_size in (16, 256):
        torch.manual_seed(0)  # the same q and keys as the contiguous batch
        paged_q, paged_k, paged_v, paged_index, _, _ = make_batch(q_lens, extra, 4, 2, 64, torch.float16, device,
                                                                  block_size, max_kv=140)
        assert torch.equal(paged_q, q)
        paged = chunked_attention_varlen(paged_q, paged_k, paged_v, **paged_index, return_lse=True)
        assert torch.equal(paged[0], dense[0]) and torch.equal(paged[1], dense[1]), f"block_size {block_size}"


# (q_lens, extra keys): no sequences; sequences without queries (with and without keys)
EMPTY_CASES = [([], []), ([0, 0], [0, 17]), ([0, 3, 0], [0, 0, 0])]


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("q_lens,extra_keys", EMPTY_CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_sequences(backend, device, q_lens, extra_keys, block_size):
    q, k_cache, v_cache, index, keys, values = make_batch(q_lens, extra_keys, 2, 1, 64, torch.float32, device,
                                                          block_size, max_kv=32)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, sum(q_lens))
    torch.testing.assert_close(out, sdpa_oracle(q, index, keys, values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend, device, block_size):
    q, k_cache, v_cache, index, _, _ = make_batch([3, 0, 17], [2, 5, 20], 4, 2, 32, torch.float32, device,
                                                  block_size, max_kv=40)
    args = (q, k_cache, v_cache, index["cu_seqlens_q"], index["seqused_k"], index.get("block_table"))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention_varlen.default, (*args, True, 0.2))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention_varlen.default, (*args, False, 0.2))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention_varlen.default, (*args, True, 0.2, 3, -1))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention_varlen.default, (*args, False, 0.2, 2, 1))


def test_compiles_with_the_eager_result():
    """Under torch.compile (fullgraph) the op traces through its fake; the value checks, which would need the
    index tensors' values, are skipped there."""
    q, k_cache, v_cache, index, _, _ = make_batch([3, 0, 17], [2, 5, 20], 4, 2, 32, torch.float32, "cpu", 16,
                                                  max_kv=40)
    compiled = torch.compile(chunked_attention_varlen, backend="eager", fullgraph=True)
    for window_size in ((-1, -1), (4, -1)):
        eager = chunked_attention_varlen(q, k_cache, v_cache, **index, window_size=window_size)
        torch.testing.assert_close(compiled(q, k_cache, v_cache, **index, window_size=window_size), eager, atol=0,
                                   rtol=0)


# --- bad inputs ---
# Valid arguments: q lens [3, 0, 5], seqused_k [4, 2, 9], 4 query and 2 KV heads of 64; "dense": a (3, 12, 2, 64)
# cache; "paged": 4 pages of 16 and a (3, 2) block table with [0, 1], [2, 99], [3, -5] (past the used pages:
# never read). A change is a value or a callable of the valid arguments.
def _index(values):
    return torch.tensor(values, dtype=torch.int32)


def _valid_arguments(layout):
    q = torch.randn(8, 4, 64)
    args = {"q": q, "cu_seqlens_q": _index([0, 3, 3, 8]), "seqused_k": _index([4, 2, 9])}
    if layout == "dense":
        args["k_cache"], args["v_cache"] = torch.randn(3, 12, 2, 64), torch.randn(3, 12, 2, 64)
    else:
        args["k_cache"], args["v_cache"] = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
        args["block_table"] = _index([[0, 1], [2, 99], [3, -5]])
    return args


BAD_INPUTS = [  # (layout, changes, message fragment naming the argument)
    ("dense", {"q": lambda a: a["q"][None]}, "q must be 3-D"),
    ("dense", {"q": lambda a: a["q"].int()}, "q dtype"),
    ("dense", {"q": lambda a: a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)}, "q must have stride 1"),
    ("dense", {"k_cache": lambda a: a["k_cache"][0]}, "k_cache must be 4-D"),
    ("dense", {"k_cache": lambda a: a["k_cache"].half(), "v_cache": lambda a: a["v_cache"].half()}, "k_cache dtype"),
    ("dense", {"v_cache": lambda a: a["v_cache"][:, :11]}, "v_cache shape"),
    ("dense", {"v_cache": lambda a: a["v_cache"].to("meta")}, "v_cache device"),
    ("dense", {"q": lambda a: a["q"][:, :3]}, "n_heads"),
    ("dense", {name: lambda a, name=name: a[name][..., :48] for name in ("q", "k_cache", "v_cache")}, "head_dim"),
    ("dense", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].long()}, "cu_seqlens_q dtype must be int32"),
    ("dense", {"seqused_k": lambda a: a["seqused_k"].long()}, "seqused_k dtype must be int32"),
    ("paged", {"block_table": lambda a: a["block_table"].long()}, "block_table dtype must be int32"),
    ("dense", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"][None]}, "cu_seqlens_q must be 1-D"),
    ("dense", {"cu_seqlens_q": _index([])}, "cu_seqlens_q must have batch"),
    ("dense", {"cu_seqlens_q": _index([0, 3, 3, 5, 8])}, "seqused_k must have shape"),
    ("dense", {"seqused_k": _index([[4, 2, 9]])}, "seqused_k must be 1-D"),
    ("dense", {"seqused_k": _index([4, 2])}, "seqused_k must have shape"),
    ("dense", {"k_cache": lambda a: a["k_cache"][:2], "v_cache": lambda a: a["v_cache"][:2]}, "k_cache batch"),
    ("dense", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].to("meta")}, "cu_seqlens_q device"),
    ("paged", {"block_table": lambda a: a["block_table"].to("meta")}, "block_table device"),
    ("dense", {"cu_seqlens_q": _index([1, 3, 3, 8])}, "cu_seqlens_q must start at 0"),
    ("dense", {"cu_seqlens_q": _index([0, 3, 2, 8])}, r"non-decreasing, got cu_seqlens_q\[2\] = 2"),
    ("dense", {"cu_seqlens_q": _index([0, 3, 3, 7])}, r"cu_seqlens_q\[-1\] = 7 must equal q's total_q = 8"),
    ("dense", {"seqused_k": _index([4, -1, 9])}, r"seqused_k must be >= 0, got seqused_k\[1\]"),
    ("dense", {"seqused_k": _index([4, 2, 13])}, r"seqused_k\[2\] = 13 exceeds the cache's capacity 12 \(max_kv\)"),
    ("paged", {"seqused_k": _index([4, 2, 33])}, r"capacity 32 \(max_blocks_per_seq \* block_size\)"),
    ("dense", {"seqused_k": _index([2, 2, 9])}, r"sequence 0 has 3 queries but seqused_k\[0\] = 2"),
    ("paged", {"block_table": lambda a: a["block_table"][:2]}, "block_table batch"),
    ("paged", {"block_table": lambda a: a["block_table"][0]}, "block_table must be 2-D"),
    ("paged", {"block_table": _index([[0, 1], [4, 99], [3, -5]])}, r"block_table\[1, 0\] = 4 is outside"),
    ("paged", {"seqused_k": _index([4, 2, 20])}, r"block_table\[2, 1\] = -5 is outside"),
    ("paged", {"k_cache": torch.randn(4, 24, 2, 64), "v_cache": torch.randn(4, 24, 2, 64)}, "power of two"),
    ("paged", {"k_cache": torch.randn(8, 8, 2, 64), "v_cache": torch.randn(8, 8, 2, 64)}, r"in \[16, 256\]"),
    ("dense", {"softmax_scale": 0.0}, "softmax_scale"),
    ("dense", {"softmax_scale": float("inf")}, "softmax_scale"),
    ("dense", {"window_size": (-2, -1)}, "window_size"),
    ("paged", {"window_size": (0, -5)}, "window_size"),
    ("dense", {"window_size": (8,)}, "window_size"),
    ("dense", {"window_size": (8, 1.5)}, "window_size"),
    ("dense", {"window_size": (False, 0)}, "window_size"),
    ("dense", {"window_size": "8,0"}, "window_size"),
]


@pytest.mark.parametrize("layout,changes,match", BAD_INPUTS, ids=[match for *_, match in BAD_INPUTS])
def test_bad_inputs_raise(layout, changes, match):
    args = _valid_arguments(layout)
    chunked_attention_varlen(**args)  # valid as given
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    with pytest.raises(ValueError, match=match):
        chunked_attention_varlen(**args)


def test_bad_types_raise():
    args = _valid_arguments("dense")
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        chunked_attention_varlen(**{**args, "k_cache": args["k_cache"].tolist()})
    with pytest.raises(TypeError, match="cu_seqlens_q must be a torch.Tensor"):
        chunked_attention_varlen(**{**args, "cu_seqlens_q": [0, 3, 3, 8]})
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        chunked_attention_varlen(**{**_valid_arguments("paged"), "block_table": [[0, 1], [2, 0], [3, 0]]})


# --- GPU ---
# Few cases, bf16 only (fp16 runs in the interpreter): each new shape autotunes, compiling 7 configs, inside
# gpu_check.sh's pytest budget.
GPU_CASES = [  # (q lens, extra keys, n_heads, n_kv_heads, head_dim, block_size)
    ([4093, 1, 0, 517, 2600], [0, 4000, 64, 1000, 1493], 16, 2, 128, None),
    ([4093, 1, 0, 517, 2600], [0, 4000, 64, 1000, 1493], 16, 2, 128, 16),
    ([1031, 77, 9], [0, 2000, 1000], 8, 8, 64, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,extra_keys,n_heads,n_kv_heads,head_dim,block_size", GPU_CASES)
def test_gpu_large_vs_sdpa(q_lens, extra_keys, n_heads, n_kv_heads, head_dim, block_size):
    dtype = torch.bfloat16
    max_kv = max(n + extra for n, extra in zip(q_lens, extra_keys, strict=True))
    q, k_cache, v_cache, index, keys, values = make_batch(q_lens, extra_keys, n_heads, n_kv_heads, head_dim, dtype,
                                                          "cuda", block_size, max_kv)
    out, lse = chunked_attention_varlen(q, k_cache, v_cache, **index, return_lse=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # exact fp32 oracle, no TF32
        ref = sdpa_oracle(q, index, keys, values)
    assert_close_to_ref(out, ref, sdpa_oracle(q, index, keys, values, dtype=dtype), name="output vs SDPA")
    last = slice(q.shape[0] - 64, q.shape[0])  # the last 64 rows of the packed queries
    torch.testing.assert_close(lse[:, last], lse_oracle(q, index, keys, values)[:, last], atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_fp32_is_exact_not_tf32():
    q, k_cache, v_cache, index, keys, values = make_batch([300, 5], [477, 100], 4, 2, 128, torch.float32, "cuda",
                                                          block_size=16, max_kv=800)
    out = chunked_attention_varlen(q, k_cache, v_cache, **index)
    ref = sdpa_oracle(q.double(), index, [k.double() for k in keys], [v.double() for v in values],
                      dtype=torch.float64).float()
    assert (out - ref).abs().max().item() <= 1e-4
