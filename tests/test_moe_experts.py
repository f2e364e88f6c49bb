"""moe_experts: the Triton kernels (interpreted on CPU) and the CPU kernel against an oracle written here (each
expert dense over every token, no sorting) and the sorted-tokens reference; experts that receive no token;
the block alignment exactly and without host reads; tensor-parallel shards summing to the whole; torch.compile
through the fake; opcheck; bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from iso_kernels import ops
from iso_kernels.ops import moe_experts
from iso_kernels.reference import moe_experts_ref
from triton_ops.moe_experts import align_blocks, block_m_for

from helpers import assert_close_to_ref

# (tokens, hidden, inter, experts, top_k, experts routed none). The interpreter's blocks are 16 rows and its
# column tiles 32, so no size here is a multiple; experts 0 and the last, or the middle ones, receive nothing.
SHAPES = [
    (37, 72, 40, 5, 2, (3,)),
    (1, 48, 24, 4, 2, ()),  # one token: two experts of four get a row each, two get none
    (53, 40, 56, 8, 3, (0, 7)),
    (29, 72, 24, 3, 1, (1,)),  # top 1: the slots' sum is the rows themselves
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
# (tokens * top_k, experts, block_m): exact checks of the alignment, no interpreter involved.
ALIGN_CASES = [(74, 5, 16), (1, 8, 16), (300, 8, 64), (1000, 128, 64), (17, 3, 128), (64, 4, 16)]


def make_inputs(tokens, hidden, inter, experts, top_k, dtype, device, unused=(), weights_dtype=torch.float32):
    """Router over random logits with ``unused`` experts masked out, Mixtral-style (softmax, top-k,
    renormalised); expert weights scaled so that each product stays of order one."""
    logits = torch.randn(tokens, experts)
    logits[:, list(unused)] = float("-inf")
    topk_weights, topk_ids = logits.softmax(-1).topk(top_k, dim=-1)
    topk_weights /= topk_weights.sum(-1, keepdim=True)
    x = torch.randn(tokens, hidden).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter) / inter ** 0.5).to(dtype)
    tensors = x, topk_ids, topk_weights.to(weights_dtype), w_gate_up, w_down
    return tuple(t.to(device) for t in tensors)


def oracle(x, topk_ids, topk_weights, w_gate_up, w_down):
    """Independent of the reference: every expert runs densely over all tokens (fp32 torch.matmul, F.silu) and
    is weighted by each token's router weight for it (zero where the token did not choose it)."""
    inter = w_down.shape[2]
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(w_gate_up.shape[0]):
        weight = (topk_weights.float() * (topk_ids == expert)).sum(dim=1)
        gate = torch.matmul(xf, w_gate_up[expert, :inter].float().T)
        up = torch.matmul(xf, w_gate_up[expert, inter:].float().T)
        out += weight[:, None] * torch.matmul(F.silu(gate) * up, w_down[expert].float().T)
    return out


def check_moe(out, inputs, *, name="moe_experts"):
    """The tolerance rule against the oracle and against the fp32 reference; the reference in the inputs'
    dtype sets the allowed error."""
    assert out.dtype == inputs[0].dtype
    torch_out = moe_experts_ref(*inputs, upcast=False)
    assert_close_to_ref(out, oracle(*inputs), torch_out, name=f"{name} vs oracle")
    assert_close_to_ref(out, moe_experts_ref(*inputs), torch_out, name=f"{name} vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k,unused", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_oracle_and_reference(backend, tokens, hidden, inter, experts, top_k, unused, dtype, device):
    inputs = make_inputs(tokens, hidden, inter, experts, top_k, dtype, device, unused)
    assert not any((inputs[1] == e).any() for e in unused)
    check_moe(moe_experts(*inputs), inputs)


def test_reference_matches_oracle():
    """The reference (the CPU kernel) in fp32 agrees with the oracle to fp32 round-off."""
    inputs = make_inputs(37, 72, 40, 5, 2, torch.float32, "cpu", unused=(0, 4))
    torch.testing.assert_close(moe_experts_ref(*inputs), oracle(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_router_weights_in_x_dtype_and_strided_inputs(backend, device):
    """Router weights in x's dtype; x with a row stride past hidden, weights as transposed views (any strides),
    int32 ids."""
    x, topk_ids, topk_weights, w_gate_up, w_down = make_inputs(37, 72, 40, 5, 2, torch.float16, device, (2,),
                                                               weights_dtype=torch.float16)
    x = torch.cat([x, x], dim=1)[:, :72]
    w_gate_up = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    w_down = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    inputs = x, topk_ids.int(), topk_weights, w_gate_up, w_down
    assert not x.is_contiguous() and not w_gate_up.is_contiguous() and not w_down.is_contiguous()
    check_moe(moe_experts(*inputs), inputs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("tokens,top_k", [(0, 2), (5, 0)])
def test_no_pairs(backend, tokens, top_k, device):
    """No tokens, or no slots: zeros of x's shape."""
    _, _, _, w_gate_up, w_down = make_inputs(1, 24, 16, 3, 2, torch.float32, device)
    x = torch.randn(tokens, 24, device=device)
    ids = torch.zeros(tokens, top_k, dtype=torch.int64, device=device)
    out = moe_experts(x, ids, ids.float(), w_gate_up, w_down)
    assert torch.equal(out, torch.zeros(tokens, 24, device=device))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tensor_parallel_shards_sum_to_the_whole(backend, device):
    """Two ranks, each with every expert's gate and up rows [r * inter/2, (r + 1) * inter/2) and the same
    columns of down: their partial outputs sum (the all-reduce) to the unsharded output."""
    x, topk_ids, topk_weights, w_gate_up, w_down = make_inputs(37, 72, 40, 5, 2, torch.float32, device, (3,))
    inter = w_down.shape[2]
    whole = moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down)
    parts = []
    for cols in (slice(0, inter // 2), slice(inter // 2, inter)):
        shard_gate_up = torch.cat([w_gate_up[:, :inter][:, cols], w_gate_up[:, inter:][:, cols]], dim=1)
        parts.append(moe_experts(x, topk_ids, topk_weights, shard_gate_up, w_down[:, :, cols].contiguous()))
    torch.testing.assert_close(parts[0] + parts[1], whole, atol=1e-5, rtol=1e-5)
    assert (parts[0] - whole).abs().max() > 0.1  # each shard alone is a partial sum


@pytest.mark.parametrize("num_pairs,experts,block_m", ALIGN_CASES)
def test_align_blocks(num_pairs, experts, block_m):
    """Each used block holds pairs of its expert only, in pair order, padded at its expert's end; every pair
    once; ceil(count / block_m) blocks per expert, none for an expert without pairs; the blocks past them
    (up to the bound) name no expert and hold only padding."""
    ids = torch.randint(0, experts, (num_pairs,))
    ids[ids == experts // 2] = 0  # one expert at least receives nothing
    sorted_pairs, block_expert = align_blocks(ids[:, None], experts, block_m)
    counts = torch.bincount(ids, minlength=experts).tolist()
    used = sum(-(-n // block_m) for n in counts)
    assert block_expert.shape[0] == num_pairs // block_m + min(experts, num_pairs)
    assert block_expert.dtype == sorted_pairs.dtype == torch.int32
    expected_experts = [e for e, n in enumerate(counts) for _ in range(-(-n // block_m))]
    assert block_expert[:used].tolist() == expected_experts
    assert (block_expert[used:] == experts).all()
    blocks = sorted_pairs.view(-1, block_m).tolist()
    for expert in range(experts):
        rows = [p for b, e in enumerate(expected_experts) if e == expert for p in blocks[b]]
        pairs = (ids == expert).nonzero().flatten().tolist()
        assert rows == pairs + [num_pairs] * (len(rows) - len(pairs))
    assert all(p == num_pairs for block in blocks[used:] for p in block)


def test_alignment_reads_nothing_back(monkeypatch):
    """The launcher's alignment stays on the device: no host read (on CUDA a sync) however the ids route, so
    the op can run inside a captured CUDA graph; with check_ids=False the public function adds none either."""
    from test_host_syncs import counting_host_reads

    ids = torch.randint(0, 8, (300, 2))
    with counting_host_reads(monkeypatch) as reads:
        align_blocks(ids, 8, 64)
    assert not reads.reads
    with counting_host_reads(monkeypatch) as checked:
        moe_experts(*make_inputs(16, 24, 8, 4, 2, torch.float32, "cpu"))
    with counting_host_reads(monkeypatch) as vouched:
        moe_experts(*make_inputs(16, 24, 8, 4, 2, torch.float32, "cpu"), check_ids=False)
    assert checked.reads and not vouched.reads


def test_block_m_rule():
    """BLOCK_M from the mean rows per expert: Mixtral-like prefill 128, Qwen3-MoE-like 64, decode 16; fp32 32."""
    assert block_m_for(4096 * 2, 8, torch.bfloat16) == 128
    assert block_m_for(4096 * 8, 128, torch.float16) == 64
    assert block_m_for(16 * 2, 8, torch.bfloat16) == 16
    assert block_m_for(4096 * 2, 8, torch.float32) == 32


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend, device):
    """Schema, fake, autograd registration and AOT dispatch."""
    for dtype in (torch.float32, torch.float16):
        inputs = make_inputs(21, 40, 24, 4, 2, dtype, device, (1,))
        torch.library.opcheck(torch.ops.iso_kernels.moe_experts.default, inputs)


def test_compiles_through_the_fake():
    """torch.compile(fullgraph=True) traces the op through its fake (the id check, which reads values, is
    skipped while tracing) and runs the CPU kernel: the eager output."""
    inputs = make_inputs(37, 72, 40, 5, 2, torch.float32, "cpu", (3,))
    compiled = torch.compile(lambda *args: ops.moe_experts(*args) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), 2 * moe_experts(*inputs))


def test_bad_inputs(device):
    x, ids, weights, w_gate_up, w_down = make_inputs(16, 24, 8, 4, 2, torch.float32, device)
    cases = [
        ((x[None], ids, weights, w_gate_up, w_down), "x"),
        ((x.double(), ids, weights, w_gate_up.double(), w_down.double()), "x"),
        ((x, ids[:, 0], weights, w_gate_up, w_down), "topk_ids"),
        ((x, ids[:8], weights[:8], w_gate_up, w_down), "topk_ids"),
        ((x, ids.float(), weights, w_gate_up, w_down), "topk_ids"),
        ((x, ids, weights[:, :1], w_gate_up, w_down), "topk_weights"),
        ((x, ids, weights.long(), w_gate_up, w_down), "topk_weights"),
        ((x, ids, weights, w_gate_up[0], w_down), "w_gate_up"),
        ((x, ids, weights, w_gate_up[:, :15], w_down), "w_gate_up"),
        ((x, ids, weights, w_gate_up[:, :, :20], w_down), "w_gate_up"),
        ((x, ids, weights, w_gate_up[:0], w_down[:0]), "w_gate_up"),
        ((x, ids, weights, w_gate_up.half(), w_down), "w_gate_up"),
        ((x, ids, weights, w_gate_up, w_down[:3]), "w_down"),
        ((x, ids, weights, w_gate_up, w_down[:, :, :4]), "w_down"),
        ((x, ids, weights, w_gate_up, w_down.half()), "w_down"),
        ((x, ids, weights, w_gate_up, w_down.to("meta")), "w_down"),
        ((x, ids.to("meta"), weights, w_gate_up, w_down), "topk_ids"),
    ]
    moe_experts(x, ids, weights, w_gate_up, w_down)  # the cases differ from this in one thing
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            moe_experts(*args)
    with pytest.raises(TypeError, match="x"):
        moe_experts(x.tolist(), ids, weights, w_gate_up, w_down)
    with pytest.raises(TypeError, match="topk_weights"):
        moe_experts(x, ids, None, w_gate_up, w_down)


@pytest.mark.parametrize("bad_id", [-1, 4, 100])
def test_ids_outside_the_experts(bad_id, device):
    x, ids, weights, w_gate_up, w_down = make_inputs(16, 24, 8, 4, 2, torch.float32, device)
    ids[11, 1] = bad_id
    with pytest.raises(ValueError, match=rf"topk_ids\[11, 1\] = {bad_id} is outside \[0, experts = 4\)"):
        moe_experts(x, ids, weights, w_gate_up, w_down)


def test_unchecked_ids_stay_inside_the_tensors(triton_backend, device):
    """With check_ids=False an out-of-range id gives an undefined row, but the kernels index nothing outside
    their tensors (the alignment clamps the ids), and the other tokens are right."""
    inputs = list(make_inputs(16, 24, 8, 4, 2, torch.float32, device))
    expected = moe_experts(*inputs)
    inputs[1] = inputs[1].clone()
    inputs[1][3, 0] = 1000
    out = moe_experts(*inputs, check_ids=False)
    others = torch.arange(16, device=device) != 3
    torch.testing.assert_close(out[others], expected[others])


# --- GPU: bf16 at the per-rank shapes of Mixtral-8x22B and Qwen3-235B-A22B at TP 8 ---
GPU_CASES = [  # (tokens, hidden, inter, experts, top_k)
    (4093, 6144, 16384 // 8, 8, 2),
    (4093, 4096, 1536 // 8, 128, 8),
    (7, 4096, 1536 // 8, 128, 8),  # 16-row blocks
]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", GPU_CASES)
def test_gpu_shapes(tokens, hidden, inter, experts, top_k):
    inputs = make_inputs(tokens, hidden, inter, experts, top_k, torch.bfloat16, "cuda", (experts - 1,))
    out = moe_experts(*inputs)
    torch_out = moe_experts_ref(*inputs, upcast=False)
    assert_close_to_ref(out, moe_experts_ref(*inputs), torch_out, name="moe_experts vs reference")
