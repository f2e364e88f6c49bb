"""merge_attention_states: the Triton kernel (interpreted on CPU) combines two partial attentions over disjoint
key ranges into SDPA over the whole range; empty ranges (LSE -inf); strided inputs; opcheck; bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from iso_kernels.ops import merge_attention_states
from iso_kernels.reference import chunked_attention_ref, merge_attention_states_ref

from helpers import assert_close_to_ref

# (q_len, kv_len, split, n_heads, head_dim): keys [0, split) and [split, kv_len); head_dim need not be a power
# of two here, and split 0 / kv_len leaves one range empty.
CASES = [
    (1, 17, 5, 2, 64),
    (97, 200, 64, 4, 128),
    (200, 97, 0, 2, 80),
    (33, 130, 130, 3, 16),
]
DTYPES = [torch.float32, torch.float16]


def partial_states(q, k, v, split, dtype):
    """fp32 attention of q over keys [0, split) and [split, kv_len), outputs rounded to ``dtype``."""
    out_a, lse_a = chunked_attention_ref(q, k[:, :split], v[:, :split], causal=False)
    out_b, lse_b = chunked_attention_ref(q, k[:, split:], v[:, split:], causal=False)
    return out_a.to(dtype), lse_a, out_b.to(dtype), lse_b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len,kv_len,split,n_heads,head_dim", CASES)
def test_merge_matches_full_attention(triton_backend, device, q_len, kv_len, split, n_heads, head_dim, dtype):
    q = torch.randn(2, q_len, n_heads, head_dim, device=device)
    k = torch.randn(2, kv_len, n_heads, head_dim, device=device)
    v = torch.randn(2, kv_len, n_heads, head_dim, device=device)
    states = partial_states(q, k, v, split, dtype)
    out, lse = merge_attention_states(*states)
    assert out.dtype == dtype and lse.dtype == torch.float32

    full = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch_out, torch_lse = merge_attention_states_ref(*states)
    assert_close_to_ref(out, full, torch_out, name="merged output")
    full_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5, dim=-1)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch_lse, atol=1e-6, rtol=1e-6)


def test_empty_ranges(triton_backend, device):
    """Rows with one empty range return the other state exactly; rows with both empty return 0 and -inf."""
    batch, q_len, n_heads, head_dim = 2, 37, 3, 64
    out_a, out_b = (torch.randn(batch, q_len, n_heads, head_dim, device=device) for _ in range(2))
    lse_a, lse_b = (torch.randn(batch, n_heads, q_len, device=device) for _ in range(2))
    a_empty = torch.arange(q_len, device=device) % 3 == 0
    b_empty = torch.arange(q_len, device=device) % 2 == 0
    lse_a[..., a_empty] = float("-inf")
    lse_b[..., b_empty] = float("-inf")
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)

    only_a, only_b, neither = ~a_empty & b_empty, a_empty & ~b_empty, a_empty & b_empty
    assert torch.equal(out[:, only_a], out_a[:, only_a]) and torch.equal(lse[..., only_a], lse_a[..., only_a])
    assert torch.equal(out[:, only_b], out_b[:, only_b]) and torch.equal(lse[..., only_b], lse_b[..., only_b])
    assert torch.equal(out[:, neither], torch.zeros_like(out[:, neither]))
    assert torch.isneginf(lse[..., neither]).all()
    both = ~a_empty & ~b_empty
    ref, ref_lse = merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[:, both], ref[:, both], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)


def test_strided_inputs(triton_backend, device):
    """Head-major outputs and query-major LSEs, seen through transposes, give the same bits."""
    batch, q_len, n_heads, head_dim = 2, 45, 4, 32
    out_a = torch.randn(batch, n_heads, q_len, head_dim, device=device).transpose(1, 2)
    out_b = torch.randn(batch, n_heads, q_len, head_dim, device=device).transpose(1, 2)
    lse_a = torch.randn(batch, q_len, n_heads, device=device).transpose(1, 2)
    lse_b = torch.randn(q_len, batch, n_heads, device=device).permute(1, 2, 0)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    dense_out, dense_lse = merge_attention_states(out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(),
                                                  lse_b.contiguous())
    assert torch.equal(out, dense_out) and torch.equal(lse, dense_lse)
    ref, ref_lse = merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_opcheck(backend, device):
    out_a, out_b = (torch.randn(1, 9, 2, 32, device=device) for _ in range(2))
    lse_a, lse_b = (torch.randn(1, 2, 9, device=device) for _ in range(2))
    torch.library.opcheck(torch.ops.iso_kernels.merge_attention_states.default, (out_a, lse_a, out_b, lse_b))


# (argument -> a builder of its bad value, the error message fragment that names the argument); the valid
# arguments are out_a, out_b (1, 9, 2, 32) fp32 and lse_a, lse_b (1, 2, 9) fp32.
BAD_INPUTS = [
    ({"out_a": lambda: torch.randn(9, 2, 32)}, "out_a must be 4-D"),
    ({"out_b": lambda: torch.randn(1, 9, 2, 16)}, "out_b shape"),
    ({"out_b": lambda: torch.randn(1, 9, 2, 32, dtype=torch.float16)}, "out_b dtype"),
    ({"lse_a": lambda: torch.randn(1, 9, 2)}, "lse_a shape"),
    ({"lse_b": lambda: torch.randn(1, 2, 9, dtype=torch.float16)}, "lse_b dtype"),
    ({"lse_b": lambda: torch.randn(1, 2, 9, device="meta")}, "lse_b device"),
    ({"out_a": lambda: torch.randn(1, 9, 2, 64)[..., ::2]}, "out_a must have stride 1"),
    ({"out_a": lambda: torch.ones(1, 9, 2, 32, dtype=torch.int32)}, "out_a dtype"),
]


@pytest.mark.parametrize("changes,match", BAD_INPUTS, ids=[match for _, match in BAD_INPUTS])
def test_bad_inputs_raise(changes, match):
    args = {"out_a": torch.randn(1, 9, 2, 32), "lse_a": torch.randn(1, 2, 9),
            "out_b": torch.randn(1, 9, 2, 32), "lse_b": torch.randn(1, 2, 9)}
    args.update({name: build() for name, build in changes.items()})
    with pytest.raises(ValueError, match=match):
        merge_attention_states(**args)


# --- GPU ---
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_merge_large(dtype):
    q = torch.randn(2, 3001, 16, 128, device="cuda")
    k = torch.randn(2, 4093, 16, 128, device="cuda")
    v = torch.randn(2, 4093, 16, 128, device="cuda")
    states = partial_states(q, k, v, 1500, dtype)
    out, lse = merge_attention_states(*states)
    full = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert_close_to_ref(out, full, merge_attention_states_ref(*states)[0], name="merged output")
    torch.testing.assert_close(lse, merge_attention_states_ref(*states)[1], atol=1e-5, rtol=1e-5)
