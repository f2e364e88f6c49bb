"""chunked_attention: the Triton kernel (interpreted on CPU) and the CPU kernel (torch's fused attention)
against the fp32 reference and against torch SDPA with an explicit bottom-right / q_start mask; the ISO chunk
split; the prefix + diagonal merge; empty ranges; sliding windows against SDPA with a band mask built here, and
the key blocks outside a window never read; opcheck; bad inputs."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from iso_kernels.ops import chunked_attention, merge_attention_states
from iso_kernels.reference import chunked_attention_ref, merge_attention_states_ref

from helpers import ATOL, assert_close_to_ref, assert_comparison_can_fail, window_mask

# (q_len, kv_len, q_start): None = bottom-right default; block sizes are 64 x 32 under the interpreter.
CASES = [
    (1, 1, None),
    (1, 97, None),  # one decode-like query at the end of the keys
    (17, 17, None),
    (97, 200, None),  # chunk 2: bottom-right
    (200, 200, None),  # chunk == whole sequence
    (17, 97, 40),  # a chunk in the middle
    (64, 200, 50),  # KV longer than the chunk needs: keys past q_start + q_len masked
    (97, 200, 0),
]
HEADS = [(2, 2), (8, 2), (8, 1)]  # (n_heads, n_kv_heads): GQA ratios 1, 4, 8
DTYPES = [torch.float32, torch.float16]
HEAD_DIMS = [16, 32, 128, 256]
NONCAUSAL_CASES = [(1, 97), (97, 200), (200, 17)]
SPLITS = [1, 64, 97, 199]  # chunk 1 length of a 200-token prompt
# (q_len, kv_len, q_start, causal, window_size): None = bottom-right. Windows narrower than a key block (32 under
# the interpreter), spanning several, as wide as the keys and wider, left-only, both sides and right-only without
# causal, a chunk in the middle of a longer cache, and one decode-like query.
WINDOW_CASES = [
    (97, 200, None, True, (5, -1)),
    (97, 200, None, True, (70, 0)),
    (130, 130, None, True, (129, -1)),
    (130, 130, None, True, (300, -1)),
    (64, 200, 50, True, (33, 2)),  # a right side is moot with causal
    (97, 200, None, False, (20, 7)),
    (17, 200, None, False, (40, -1)),
    (97, 200, 30, False, (-1, 45)),
    (1, 97, None, True, (10, -1)),
]
# Queries per call of the CPU kernel's windowed path in the window tests (its default, 256, exceeds every q_len
# here): pieces that are not block multiples, each over its own keys.
CPU_WINDOW_PIECE = 40
# The module (``iso_kernels.ops.chunked_attention`` is also the name of its public function there).
OP_MODULE = importlib.import_module("iso_kernels.ops.chunked_attention")
BATCH = 2
# Each op's CPU kernel ("torch") and its Triton kernel ("triton", interpreted on CPU): the `backend` fixture.
BACKENDS = ["torch", "triton"]


def make_qkv(q_len, kv_len, n_heads, n_kv_heads, head_dim, dtype, device, batch=BATCH):
    q = torch.randn(batch, q_len, n_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_len, n_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_len, n_kv_heads, head_dim, dtype=dtype, device=device)
    return q, k, v


def sdpa_oracle(q, k, v, q_start=None, causal=True, dtype=torch.float32):
    """torch SDPA in ``dtype`` with the mask spelled out: causal_lower_right for the default q_start, else a
    boolean mask "key <= q_start + i"."""
    q_len, kv_len = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    qh = q.to(dtype).transpose(1, 2)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    mask = None
    if causal and (q_start is None or q_start == kv_len - q_len):
        mask = causal_lower_right(q_len, kv_len)
    elif causal:
        keys = torch.arange(kv_len, device=q.device)
        mask = keys[None, :] <= (torch.arange(q_len, device=q.device)[:, None] + q_start)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2)


def check_against_oracles(out, lse, q, k, v, q_start=None, causal=True):
    ref, ref_lse = chunked_attention_ref(q, k, v, q_start=q_start, causal=causal)
    torch_out, _ = chunked_attention_ref(q, k, v, q_start=q_start, causal=causal, upcast=False)
    assert_close_to_ref(out, ref, torch_out, name="output vs reference")
    assert_close_to_ref(out, sdpa_oracle(q, k, v, q_start, causal), sdpa_oracle(q, k, v, q_start, causal, q.dtype),
                        name="output vs SDPA")
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv_heads", HEADS)
@pytest.mark.parametrize("q_len,kv_len,q_start", CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_causal_matches_reference_and_sdpa(backend, device, q_len, kv_len, q_start, n_heads, n_kv_heads,
                                           dtype):
    q, k, v = make_qkv(q_len, kv_len, n_heads, n_kv_heads, 64, dtype, device, batch=1 if n_heads > 2 else BATCH)
    out, lse = chunked_attention(q, k, v, q_start=q_start, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[0], n_heads, q_len)
    check_against_oracles(out, lse, q, k, v, q_start)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(triton_backend, device, head_dim):
    q, k, v = make_qkv(97, 130, 2, 1, head_dim, torch.float16, device, batch=1)
    out, lse = chunked_attention(q, k, v, return_lse=True)
    check_against_oracles(out, lse, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len,kv_len", NONCAUSAL_CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_noncausal(backend, device, q_len, kv_len, dtype):
    q, k, v = make_qkv(q_len, kv_len, 4, 2, 64, dtype, device)
    out, lse = chunked_attention(q, k, v, causal=False, return_lse=True)
    check_against_oracles(out, lse, q, k, v, causal=False)


def masked_sdpa(q, k, v, mask, dtype=torch.float32):
    """torch SDPA in ``dtype`` with a boolean (q_len, kv_len) mask; (batch, q_len, n_heads, head_dim)."""
    group = q.shape[2] // k.shape[2]
    qh = q.to(dtype).transpose(1, 2)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.to(q.device)).transpose(1, 2)


def masked_lse(q, k, mask):
    """logsumexp of each query's fp32 scores over the keys ``mask`` shows it: (batch, n_heads, q_len)."""
    group = q.shape[2] // k.shape[2]
    scores = (q.float().transpose(1, 2) @ k.float().transpose(1, 2).repeat_interleave(group, dim=1).transpose(2, 3)
              * q.shape[-1] ** -0.5)
    return torch.logsumexp(scores.masked_fill(~mask.to(q.device), float("-inf")), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len,kv_len,q_start,causal,window_size", WINDOW_CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_window_matches_sdpa_with_a_band_mask(backend, device, q_len, kv_len, q_start, causal, window_size, dtype,
                                              monkeypatch):
    monkeypatch.setattr(OP_MODULE, "_CPU_WINDOW_PIECE", CPU_WINDOW_PIECE)
    q, k, v = make_qkv(q_len, kv_len, 4, 2, 64, dtype, device)
    out, lse = chunked_attention(q, k, v, q_start=q_start, causal=causal, window_size=window_size,
                                 return_lse=True)
    mask = window_mask(q_len, kv_len, q_start, causal, window_size)
    assert mask.any(dim=1).all(), "every query sees at least the key at its own position"
    sdpa, torch_out = masked_sdpa(q, k, v, mask), masked_sdpa(q, k, v, mask, dtype)
    assert_close_to_ref(out, sdpa, torch_out, name="output vs SDPA")
    torch.testing.assert_close(lse, masked_lse(q, k, mask), atol=1e-4, rtol=1e-5)
    ref, ref_lse = chunked_attention_ref(q, k, v, q_start=q_start, causal=causal, window_size=window_size)
    assert_close_to_ref(ref, sdpa, torch_out, name="reference vs SDPA")  # the reference (the empty-input path)
    torch.testing.assert_close(ref_lse, lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_window_reaching_every_key_is_no_window(backend, device, causal):
    """A side of kv_len or more bounds nothing (flash-attn's rule): the same bits as no window."""
    q, k, v = make_qkv(97, 150, 2, 1, 64, torch.float16, device)
    q_start = None if causal else 0  # without causal the window places the queries: at 0 here, as without one
    plain = chunked_attention(q, k, v, causal=causal, return_lse=True)
    wide = chunked_attention(q, k, v, q_start=q_start, causal=causal, window_size=(150, 150 + 97), return_lse=True)
    assert torch.equal(plain[0], wide[0]) and torch.equal(plain[1], wide[1])


# (q_len, kv_len, q_start, causal, window_size): one tile of queries (BLOCK_M = 64 under the interpreter) whose
# windows start inside a key block (BLOCK_N = 32) and, without causal, end inside one.
SKIP_CASES = [(40, 300, 200, True, (50, -1)), (40, 300, 200, False, (21, 7))]


def _unseen_blocks(q_len, kv_len, q_start, causal, window_size, block_n):
    """(first, end): the keys the tile's rows reach, widened to whole key blocks; the blocks outside it hold no
    key any row sees, so the kernel must not load them."""
    left, right = window_size
    first = max(q_start - left, 0)
    last = min(q_start + q_len - 1 + (0 if causal or right < 0 else right), kv_len - 1)
    return first // block_n * block_n, min(-(-(last + 1) // block_n) * block_n, kv_len)


@pytest.mark.parametrize("q_len,kv_len,q_start,causal,window_size", SKIP_CASES)
def test_triton_window_never_loads_the_key_blocks_outside_it(triton_backend, device, q_len, kv_len, q_start, causal,
                                                             window_size):
    """NaN in every key block no row of the tile reaches: a kernel that loaded such a block and only masked its
    scores would multiply the NaN values by probability 0 and return NaN, so a finite, correct output shows the
    blocks were skipped. NaN in one masked key of a block that is loaded does come through (the check can fail)."""
    from triton_ops.chunked_attention import _INTERPRETER_CONFIG

    block_n = _INTERPRETER_CONFIG.kwargs["BLOCK_N"]
    q, k, v = make_qkv(q_len, kv_len, 2, 1, 64, torch.float32, device)
    mask = window_mask(q_len, kv_len, q_start, causal, window_size)
    expected = masked_sdpa(q, k, v, mask)
    first, end = _unseen_blocks(q_len, kv_len, q_start, causal, window_size, block_n)
    assert 0 < first and (causal or end < kv_len), "the case must leave blocks to skip"
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for t in (poisoned_k, poisoned_v):
        t[:, :first] = float("nan")
        t[:, end:] = float("nan")
    out = chunked_attention(q, poisoned_k, poisoned_v, q_start=q_start, causal=causal, window_size=window_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    assert not mask[:, first].any(), "the first key loaded must be one no row sees"
    poisoned_v[:, first] = float("nan")
    assert torch.isnan(chunked_attention(q, poisoned_k, poisoned_v, q_start=q_start, causal=causal,
                                         window_size=window_size)).any()


@pytest.mark.parametrize("q_len,kv_len,q_start,causal,window_size", SKIP_CASES)
def test_cpu_window_never_reads_the_keys_outside_it(q_len, kv_len, q_start, causal, window_size):
    """The CPU kernel passes torch's fused attention only the keys a window reaches: NaN in every other key leaves
    the output finite, though the same keys under a mask alone turn it NaN."""
    q, k, v = make_qkv(q_len, kv_len, 2, 1, 64, torch.float32, "cpu")
    mask = window_mask(q_len, kv_len, q_start, causal, window_size)
    expected = masked_sdpa(q, k, v, mask)
    unseen = ~mask.any(dim=0)
    k[:, unseen], v[:, unseen] = float("nan"), float("nan")
    out = chunked_attention(q, k, v, q_start=q_start, causal=causal, window_size=window_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.isnan(masked_sdpa(q, k, v, mask)).any()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_softmax_scale(backend, device):
    q, k, v = make_qkv(97, 200, 2, 1, 64, torch.float32, device)
    out, lse = chunked_attention(q, k, v, softmax_scale=0.3, return_lse=True)
    ref, ref_lse = chunked_attention_ref(q, k, v, softmax_scale=0.3)
    assert_close_to_ref(out, ref, chunked_attention_ref(q, k, v, softmax_scale=0.3, upcast=False)[0])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bottom_right_not_top_left(backend, device):
    """Fails if the mask were aligned top-left (SDPA is_causal=True) instead of bottom-right."""
    q, k, v = make_qkv(64, 200, 2, 2, 64, torch.float32, device)
    out = chunked_attention(q, k, v)
    lower_right = sdpa_oracle(q, k, v)
    top_left = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    assert (lower_right - top_left).abs().max().item() > 0.1, "the two alignments must differ for this shape"
    torch.testing.assert_close(out, lower_right, atol=1e-5, rtol=1e-5)
    assert (out - top_left).abs().max().item() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_two_chunks_reproduce_full_causal(backend, device, split, dtype):
    seq_len, max_len = 200, 256
    q, k, v = make_qkv(seq_len, seq_len, 4, 2, 64, dtype, device)
    chunk1 = chunked_attention(q[:, :split], k[:, :split], v[:, :split], q_start=0)
    chunk2 = chunked_attention(q[:, split:], k, v, q_start=split)
    split_out = torch.cat([chunk1, chunk2], dim=1)
    full_sdpa = sdpa_oracle(q, k, v)  # square: bottom-right == top-left, plain causal attention
    torch_out, _ = chunked_attention_ref(q, k, v, upcast=False)
    assert_close_to_ref(split_out, full_sdpa, torch_out, name="chunk 1 + chunk 2")
    assert torch.equal(chunked_attention(q[:, split:], k, v), chunk2), "default q_start must be kv_len - q_len"

    # Chunk 2 over a KV cache longer than the prompt: as a [:, :seq_len] view, and whole with keys masked.
    cache_k = torch.randn(BATCH, max_len, 2, 64, dtype=dtype, device=device)
    cache_v = torch.randn(BATCH, max_len, 2, 64, dtype=dtype, device=device)
    cache_k[:, :seq_len], cache_v[:, :seq_len] = k, v
    view_out = chunked_attention(q[:, split:], cache_k[:, :seq_len], cache_v[:, :seq_len])
    torch.testing.assert_close(view_out, chunk2, atol=0, rtol=0)
    whole_out = chunked_attention(q[:, split:], cache_k, cache_v, q_start=split)
    assert_close_to_ref(whole_out, full_sdpa[:, split:], torch_out[:, split:], name="chunk 2 over a longer cache")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [0, *SPLITS])
def test_prefix_plus_diagonal_merge(triton_backend, device, split, dtype):
    """Chunk 2 as a non-causal pass over chunk 1's keys + a causal pass over its own keys, merged by LSE."""
    seq_len = 200
    q, k, v = make_qkv(seq_len, seq_len, 4, 2, 64, dtype, device)
    q2 = q[:, split:]
    prefix, prefix_lse = chunked_attention(q2, k[:, :split], v[:, :split], causal=False, return_lse=True)
    diag, diag_lse = chunked_attention(q2, k[:, split:], v[:, split:], return_lse=True)
    out, lse = merge_attention_states(prefix, prefix_lse, diag, diag_lse)

    _, ref_lse = chunked_attention_ref(q, k, v)
    parts = [chunked_attention_ref(q2, k[:, :split], v[:, :split], causal=False, upcast=False),
             chunked_attention_ref(q2, k[:, split:], v[:, split:], upcast=False)]
    torch_out, _ = merge_attention_states_ref(*parts[0], *parts[1])
    assert_close_to_ref(out, sdpa_oracle(q, k, v)[:, split:], torch_out, name="merged chunk 2")
    torch.testing.assert_close(lse, ref_lse[:, :, split:], atol=1e-4, rtol=1e-5)


def test_strided_views(triton_backend, device):
    """q from a fused qkv projection, k/v as views of a longer cache, batch-major via transpose: same bits."""
    batch, seq_len, max_len, n_heads, n_kv_heads, head_dim = 2, 97, 160, 4, 2, 64
    qkv = torch.randn(batch, seq_len, n_heads + 2 * n_kv_heads, head_dim, device=device)
    q = qkv[:, :, :n_heads]
    cache_k = torch.randn(max_len, batch, n_kv_heads, head_dim, device=device).transpose(0, 1)
    cache_v = torch.randn(batch, max_len, n_kv_heads, head_dim, device=device)
    k, v = cache_k[:, :seq_len], cache_v[:, :seq_len]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = chunked_attention(q, k, v, return_lse=True)
    dense_out, dense_lse = chunked_attention(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
    assert torch.equal(out, dense_out) and torch.equal(lse, dense_lse)
    check_against_oracles(out, lse, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_query_chunk(backend, device):
    q, k, v = make_qkv(0, 17, 2, 2, 64, torch.float32, device)
    out, lse = chunked_attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (BATCH, 2, 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_key_range(backend, device):
    """Non-causal over no keys: output 0 and LSE -inf, what merge_attention_states takes as "no keys"."""
    q, k, v = make_qkv(17, 0, 2, 2, 64, torch.float32, device)
    out, lse = chunked_attention(q, k, v, causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all() and lse.shape == (BATCH, 2, 17)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend, device):
    q, k, v = make_qkv(17, 40, 4, 2, 32, torch.float32, device, batch=1)
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention.default, (q, k, v, 10, True, 0.2))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention.default, (q, k, v, 0, False, 0.2))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention.default, (q, k, v, 10, True, 0.2, 5, -1))
    torch.library.opcheck(torch.ops.iso_kernels.chunked_attention.default, (q, k, v, 23, False, 0.2, 4, 2))


# (changes to valid arguments q (1, 17, 4, 64), k, v (1, 40, 2, 64); a callable gets the valid arguments, the
# error message fragment that names the argument)
BAD_INPUTS = [
    ({"q": lambda a: a["q"][0]}, "q must be 4-D"),
    ({"k": lambda a: a["k"][:, :, :, :32]}, "v shape"),
    ({"v": lambda a: a["v"][:, :39]}, "v shape"),
    ({"k": lambda a: a["k"].half()}, "k dtype"),
    ({"v": lambda a: a["v"].to("meta")}, "v device"),
    ({"q": lambda a: a["q"].int()}, "q dtype"),
    ({"q": lambda a: a["q"][:, :, :3]}, "n_heads"),
    ({name: lambda a, name=name: a[name][..., :48] for name in "qkv"}, "head_dim"),
    ({"q": lambda a: a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)}, "q must have stride 1"),
    ({name: lambda a, name=name: torch.cat([a[name], a[name]]) for name in "kv"}, "k batch"),
    ({"q_start": -1}, "q_start"),
    ({"q_start": 24}, "q_start"),
    ({"q": lambda a: torch.randn(1, 41, 4, 64)}, "q_start"),
    ({"q_start": 0, "causal": False}, "q_start"),
    ({"softmax_scale": 0.0}, "softmax_scale"),
    ({"softmax_scale": -0.1}, "softmax_scale"),
    ({"softmax_scale": float("nan")}, "softmax_scale"),
    ({"window_size": (-2, 0)}, "window_size"),
    ({"window_size": (4, -3)}, "window_size"),
    ({"window_size": (4,)}, "window_size"),
    ({"window_size": (4, 0, 1)}, "window_size"),
    ({"window_size": (4.0, 0)}, "window_size"),
    ({"window_size": (True, 0)}, "window_size"),
    ({"window_size": 4}, "window_size"),
    ({"window_size": None}, "window_size"),
    ({"causal": False, "window_size": (3, 3), "q": lambda a: torch.randn(1, 41, 4, 64)}, "q_start"),
    ({"causal": False, "window_size": (3, 3), "q_start": 24}, "q_start"),
]


@pytest.mark.parametrize("changes,match", BAD_INPUTS, ids=[match for _, match in BAD_INPUTS])
def test_bad_inputs_raise(changes, match):
    q, k, v = make_qkv(17, 40, 4, 2, 64, torch.float32, "cpu", batch=1)
    args = {"q": q, "k": k, "v": v}
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    with pytest.raises(ValueError, match=match):
        chunked_attention(**args)


def test_bad_types_raise():
    q, k, v = make_qkv(17, 40, 4, 2, 64, torch.float32, "cpu", batch=1)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        chunked_attention(q, k.tolist(), v)
    with pytest.raises(TypeError, match="q_start must be an int"):
        chunked_attention(q, k, v, q_start=1.5)


def test_candidates_per_architecture(monkeypatch):
    """A launch compiles the 16-bit candidates less those listed as never kept on its architecture (for every
    head_dim, or for its own), in order; all of them on an unlisted architecture, with the lists off
    (tools.compile_report --all-candidates), or where the list would leave none."""
    from triton_ops import _config
    from triton_ops.chunked_attention import _CONFIGS_16BIT, _NEVER_KEPT_16BIT

    def candidates(arch, head_dim, never_kept=_NEVER_KEPT_16BIT):
        monkeypatch.setattr(_config, "device_arch", lambda: arch)
        return _config.arch_candidates(_CONFIGS_16BIT, never_kept, head_dim)

    assert all(cfg in _CONFIGS_16BIT for listed in _NEVER_KEPT_16BIT.values() for cfg in listed)
    for (arch, listed_head_dim), dropped in _NEVER_KEPT_16BIT.items():
        for head_dim in (64, 128) if listed_head_dim is None else (listed_head_dim,):
            assert candidates(arch, head_dim) == [cfg for cfg in _CONFIGS_16BIT if cfg not in dropped]
    assert candidates(90, 128, {(89, None): _CONFIGS_16BIT[:1]}) == _CONFIGS_16BIT
    assert candidates(89, 64, {(89, 128): _CONFIGS_16BIT[:1]}) == _CONFIGS_16BIT
    assert candidates(89, 64, {(89, None): _CONFIGS_16BIT[:1], (89, 64): _CONFIGS_16BIT[1:2]}) == _CONFIGS_16BIT[2:]
    assert candidates(89, 64, {(89, None): _CONFIGS_16BIT}) == _CONFIGS_16BIT
    monkeypatch.setattr(_config, "PER_ARCH_CANDIDATES", False)
    assert candidates(89, 64, {(89, None): _CONFIGS_16BIT[:1]}) == _CONFIGS_16BIT


# --- GPU ---
GPU_SHAPES = [  # (batch, q_len, kv_len, n_heads, n_kv_heads, head_dim)
    (1, 4093, 4093, 16, 2, 128),  # 4k tokens, square: SDPA flash with is_causal
    (1, 2600, 4093, 16, 2, 128),  # ISO chunk 2 over the keys of both chunks
    (2, 1031, 1031, 8, 8, 64),
    (1, 517, 1000, 4, 1, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,q_len,kv_len,n_heads,n_kv_heads,head_dim", GPU_SHAPES)
def test_gpu_shapes_leave_the_comparison_able_to_fail(batch, q_len, kv_len, n_heads, n_kv_heads, head_dim, dtype):
    """On CPU, at the GPU test's shapes and dtypes: the tolerance that test allows (2x torch's own error +
    atol) stays under half the reference's largest value, so a correct kernel can pass and zeros cannot.
    Two heads stand for all (more heads only add samples; torch's error is far below atol here)."""
    q, k, v = make_qkv(q_len, kv_len, 2, 1, head_dim, dtype, "cpu", batch=1)
    ref = sdpa_oracle(q, k, v, dtype=torch.float32)
    torch_out = sdpa_oracle(q, k, v, dtype=dtype)
    bound = 2 * (torch_out.double() - ref.double()).abs().max().item() + ATOL[dtype]
    assert_comparison_can_fail(ref, bound)
    assert (torch.zeros_like(ref) - ref).abs().max().item() > bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,q_len,kv_len,n_heads,n_kv_heads,head_dim", GPU_SHAPES)
def test_gpu_large_vs_sdpa(batch, q_len, kv_len, n_heads, n_kv_heads, head_dim, dtype):
    q, k, v = make_qkv(q_len, kv_len, n_heads, n_kv_heads, head_dim, dtype, "cuda", batch=batch)
    out, lse = chunked_attention(q, k, v, return_lse=True)
    group = n_heads // n_kv_heads
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    mask = {"is_causal": True} if q_len == kv_len else {"attn_mask": causal_lower_right(q_len, kv_len)}
    sdpa = F.scaled_dot_product_attention(qh, kh, vh, **mask).transpose(1, 2)
    with sdpa_kernel(SDPBackend.MATH):  # exact fp32 oracle, no TF32
        ref = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), **mask).transpose(1, 2)
    assert_close_to_ref(out, ref, sdpa, name="output vs SDPA")
    _, ref_lse = chunked_attention_ref(q[:, -64:], k, v, q_start=kv_len - 64)
    torch.testing.assert_close(lse[:, :, -64:], ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_window_vs_sdpa():
    """A local layer of 1024 keys back (Gemma 3's) on chunk 2 of a 4k prompt, bf16: the windowed kernel (blocks
    skipped at the left, masked bands, a new autotune key) against SDPA with the band mask."""
    q_len, kv_len, window_size = 2600, 4093, (1024, -1)
    q, k, v = make_qkv(q_len, kv_len, 16, 2, 128, torch.bfloat16, "cuda", batch=1)
    out, lse = chunked_attention(q, k, v, window_size=window_size, return_lse=True)
    mask = window_mask(q_len, kv_len, None, True, window_size)
    with sdpa_kernel(SDPBackend.MATH):  # exact fp32 oracle, no TF32
        ref = masked_sdpa(q, k, v, mask)
    assert_close_to_ref(out, ref, masked_sdpa(q, k, v, mask, torch.bfloat16), name="output vs SDPA")
    torch.testing.assert_close(lse[:, :, -64:], masked_lse(q[:, -64:], k, mask[-64:]), atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_fp32_is_exact_not_tf32():
    q, k, v = make_qkv(300, 777, 4, 2, 128, torch.float32, "cuda")
    out = chunked_attention(q, k, v)
    ref = sdpa_oracle(q.double(), k.double(), v.double(), dtype=torch.float64).float()
    assert (out - ref).abs().max().item() <= 10 * ATOL[torch.float32]
