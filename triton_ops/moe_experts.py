"""Routed experts of a mixture-of-experts block (SwiGLU experts) as two grouped GEMMs over the (token, slot)
pairs sorted by expert, one launch per projection.

The launcher sorts the ``tokens * top_k`` pairs by expert and pads each expert's segment to a multiple of
``BLOCK_M`` rows (vLLM's ``moe_align_block_size``): ``sorted_pairs`` lists the pairs block by block, padding
slots holding the sentinel ``num_pairs``, and ``block_expert`` names each block's expert. An expert that
receives no pair has no block. It is all torch ops on the device, with no host sync, so the grid is the bound
``num_pairs // BLOCK_M + min(experts, num_pairs)`` on the blocks any routing needs; programs past the used
blocks find the sentinel expert ``experts`` and return at once.

``_moe_experts_gate_up_kernel`` computes each block's rows of ``x`` against its expert's gate and up rows
(two accumulators sharing the x tile) and stores ``silu(gate) * up`` in x's dtype at the block's padded rows
of ``h``; ``_moe_experts_down_kernel`` computes ``h`` against the expert's down projection, scales each row by
its router weight and stores it at its pair's row of ``rows`` (tokens * top_k, hidden). The sum over the
top_k slots is ``torch.sum`` over that view (deterministic, fp32 accumulation), not atomic adds into an fp32
output, which would need a zeroed fp32 buffer, a cast afterwards, and an order that changes the low bits from
run to run. Inputs are validated by ``iso_kernels.ops.moe_experts``.
"""

import torch
import triton
import triton.language as tl

from . import _config
from .gemm_signal import _tile_coords, _torch_allows_tf32

# --- constants ---
# Rows per block, the unit each expert's segment is padded to, from the mean rows an expert receives (pairs /
# experts): an expert pads BLOCK_M / 2 rows on average, so 128-row tiles (the tensor cores' best) are taken from
# 512 mean rows on (padding <= 1/8 of the work), 64-row ones from 32, and 16 rows (tl.dot's least) below,
# where a block is mostly padding (decode, small batches). Mixtral-8x22B at 4096 tokens (8 experts, top 2):
# 1024 rows each -> 128; Qwen3-MoE (128 experts, top 8): 256 -> 64. Not yet timed on a GPU.
_BLOCK_M_BY_MEAN_ROWS = ((512, 128), (32, 64), (0, 16))
# fp32 runs exact (ieee) dots on the FMA units unless torch allows TF32: small tiles, one block size.
_BLOCK_M_FP32 = 32


def _configs(tiles):
    return [_config.config(BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
            for block_n, block_k, warps, stages in tiles]


# 16-bit candidates per BLOCK_M, best first; ``_keep`` keeps those that compile for the device without spills
# and within its shared memory (``_config.keep_fitting``). The gate/up kernel holds two BLOCK_M x BLOCK_N fp32
# accumulators and loads two weight tiles per step, so its BLOCK_N is half the down kernel's for the same
# registers and shared memory: 128 x 64 there is gemm_signal's 128 x 128. GROUP_M = 8 row blocks (mostly of one
# expert: an expert's blocks are consecutive) share each weight tile through L2.
_GATE_UP_16BIT = {
    128: _configs([(64, 64, 8, 3), (64, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)]),
    64: _configs([(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3)]),
    16: _configs([(64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3)]),
}
_DOWN_16BIT = {
    128: _configs([(128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 64, 4, 4)]),
    64: _configs([(128, 64, 4, 4), (256, 64, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4)]),
    16: _configs([(128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4)]),
}
# Per architecture and BLOCK_M, the 16-bit candidates never kept there, which launches do not compile
# (``_config.arch_candidates``), from ``tools.compile_report --all-candidates`` (main matrix and the 16-token
# cases of the full one, under Triton 3.6 and 3.9). On sm_80/89 the gate/up kernel's two accumulators spill at
# 128 x 128 on 8 warps (184 B frames), 128 x 64 on 4 warps (120-184 B) and 64 x 128 on 4 warps (48-64 B); on sm_89
# the down kernel's 64 x 256 on 4 warps spills 80-88 B (on sm_80 only under 3.6). sm_90 keeps every candidate
# (wgmma accumulators), and every 16-row candidate fits everywhere. Under 3.6 the down kernel's 128 x 256 also
# spills on sm_80/89 (32-40 B frames) where 3.9 keeps it; the launch's own pruning drops it there.
_NEVER_KEPT_GATE_UP = {
    **{(arch, 128): [_GATE_UP_16BIT[128][2], _GATE_UP_16BIT[128][3]] for arch in (80, 89)},
    **{(arch, 64): [_GATE_UP_16BIT[64][2]] for arch in (80, 89)},
}
_NEVER_KEPT_DOWN = {(89, 64): [_DOWN_16BIT[64][1]]}
# fp32: operand tiles sit in registers; the first that fits is taken untuned (a correctness path).
_GATE_UP_FP32 = _configs([(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)])
_DOWN_FP32 = _configs([(64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)])
# The interpreter's one config and block: 16-row blocks give the test shapes experts of several blocks, a
# ragged last block and padding; BLOCK_N = 32 leaves a ragged last column tile at inter 40 and hidden 72.
_INTERPRETER_BLOCK_M = 16
_INTERPRETER_CONFIG = _config.config(BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


def block_m_for(num_pairs, num_experts, dtype):
    """BLOCK_M of a compiled launch: the padding unit of each expert's segment (see ``_BLOCK_M_BY_MEAN_ROWS``).
    Interpreted launches take ``_INTERPRETER_BLOCK_M``."""
    if dtype == torch.float32:
        return _BLOCK_M_FP32
    mean_rows = num_pairs / max(num_experts, 1)
    return next(block_m for least, block_m in _BLOCK_M_BY_MEAN_ROWS if mean_rows >= least)


def _keep(kernel, by_block_m, never_kept, fp32_configs, named_args, kwargs):
    """The candidates of the launch's dtype and BLOCK_M that fit this device (``_config.keep_fitting``); fp32
    takes the first that fits."""
    arguments = _config.launch_arguments(named_args, kwargs)
    if arguments["w_ptr"].dtype == torch.float32:
        return _config.keep_fitting(kernel.fn, fp32_configs, arguments, first_fit=True)
    block_m = arguments["BLOCK_M"]
    return _config.keep_fitting(kernel.fn, _config.arch_candidates(by_block_m[block_m], never_kept, block_m),
                                arguments)


def _prune_gate_up(configs, named_args, **kwargs):
    return _keep(_moe_experts_gate_up_kernel, _GATE_UP_16BIT, _NEVER_KEPT_GATE_UP, _GATE_UP_FP32, named_args, kwargs)


def _prune_down(configs, named_args, **kwargs):
    return _keep(_moe_experts_down_kernel, _DOWN_16BIT, _NEVER_KEPT_DOWN, _DOWN_FP32, named_args, kwargs)


def _all(by_block_m, fp32_configs):
    return [cfg for configs in by_block_m.values() for cfg in configs] + fp32_configs


# --- kernels ---
@triton.jit
def _moe_block(sorted_pairs_ptr, block_expert_ptr, w_ptr, num_pairs, max_blocks, n_cols,
               stride_we, stride_wn, stride_wk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's block and columns: its expert (``num_experts`` past the used blocks), padded rows, pairs
    (the sentinel ``num_pairs`` on padding) and their mask, output columns and their mask, and the pointers of
    the first (BLOCK_K, BLOCK_N) tile of ``w[expert].T`` (w: (experts, n_cols, K), the Linear layout)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _tile_coords(pid, max_blocks, tl.cdiv(n_cols, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    return expert, offs_m, pairs, pairs < num_pairs, offs_n, offs_n < n_cols, offs_k, w_ptrs


def _tuned(by_block_m, fp32_configs, prune):
    """The autotuner of one kernel. Prompts come in any length: it tunes once per power-of-two bucket of the
    pair count, not per count (and per BLOCK_M, which the launch chooses)."""
    return _config.autotune(configs=_all(by_block_m, fp32_configs), key=["pairs_bucket", "hidden", "inter", "BLOCK_M"],
                            prune_configs_by={"early_config_prune": prune})


# The pair count and block bound change with every prompt length and routing: not specialized, so a new length
# reuses the compiled kernels (they only mask rows and count blocks; loads vectorize along hidden and inter).
_UNSPECIALIZED = ["num_pairs", "pairs_bucket", "max_blocks"]


@_tuned(_GATE_UP_16BIT, _GATE_UP_FP32, _prune_gate_up)
@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _moe_experts_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_pairs, pairs_bucket, max_blocks, num_experts, hidden, inter,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_hm,
    TOP_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- which block, expert and columns; blocks past the used ones return ---
    # w_gate_up[expert] is (2 * inter, hidden): its gate rows, then its up rows
    expert, offs_m, pairs, mask_m, offs_n, mask_n, offs_k, gate_ptrs = _moe_block(
        sorted_pairs_ptr, block_expert_ptr, w_ptr, num_pairs, max_blocks, inter, stride_we, stride_wn, stride_wk,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if expert >= num_experts:
        return
    up_ptrs = gate_ptrs + inter * stride_wn
    # pair p is slot p % TOP_K of token p // TOP_K: its row of x
    x_ptrs = x_ptr + (pairs // TOP_K)[:, None] * stride_xm + offs_k[None, :] * stride_xk

    # --- main loop over hidden: one x tile against both weight tiles ---
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(hidden, BLOCK_K)):
        k_left = hidden - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
        gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            gate = gate.to(tl.float32)
            up = up.to(tl.float32)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(a, up, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    # --- SwiGLU in fp32, stored at the block's padded rows (padding rows are not stored) ---
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@_tuned(_DOWN_16BIT, _DOWN_FP32, _prune_down)
@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _moe_experts_down_kernel(
    h_ptr, w_ptr, rows_ptr, weights_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_pairs, pairs_bucket, max_blocks, num_experts, hidden, inter,
    stride_hm, stride_we, stride_wn, stride_wk, stride_rm,
    INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- which block, expert and columns (w_down[expert] is (hidden, inter)); blocks past the used ones return ---
    expert, offs_m, pairs, mask_m, offs_n, mask_n, offs_k, w_ptrs = _moe_block(
        sorted_pairs_ptr, block_expert_ptr, w_ptr, num_pairs, max_blocks, hidden, stride_we, stride_wn, stride_wk,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if expert >= num_experts:
        return
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :]

    # --- main loop over inter ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(inter, BLOCK_K)):
        k_left = inter - k * BLOCK_K
        a = tl.load(h_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    # --- router weight in fp32, stored at each pair's row ---
    router = tl.load(weights_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)
    acc = acc * router[:, None]
    rows_ptrs = rows_ptr + pairs[:, None] * stride_rm + offs_n[None, :]
    tl.store(rows_ptrs, acc.to(rows_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --- launcher ---
def align_blocks(topk_ids, num_experts, block_m):
    """The pairs sorted by expert, each expert's segment padded to a multiple of ``block_m``, on the device
    and without a host sync. Returns ``(sorted_pairs, block_expert)``: sorted_pairs (max_blocks * block_m,)
    int32, block b's pairs at ``[b * block_m, (b + 1) * block_m)`` (pair p = token * top_k + slot; the
    sentinel ``num_pairs`` pads), in expert order, and within an expert in pair order; block_expert
    (max_blocks,) int32, block b's expert, or ``num_experts`` for the blocks past the used ones. max_blocks
    = ``num_pairs // block_m + min(num_experts, num_pairs)`` bounds the blocks of any routing: each expert
    that receives pairs adds at most one partial block. Ids outside [0, num_experts) are clamped into it, so
    that no index leaves its tensor (the op checks them before; unchecked, such a result is undefined)."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1).clamp(0, num_experts - 1)
    num_pairs = ids.numel()
    max_blocks = num_pairs // block_m + min(num_experts, num_pairs)
    sorted_ids, order = torch.sort(ids, stable=True)
    # segment e of the sorted pairs: [bounds[e], bounds[e + 1])
    bounds = torch.searchsorted(sorted_ids, torch.arange(num_experts + 1, device=device, dtype=ids.dtype))
    blocks = (bounds.diff() + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    block_expert = torch.searchsorted(block_end, torch.arange(max_blocks, device=device, dtype=block_end.dtype),
                                      right=True)
    # sorted pair j of expert e sits at padded row (block_end[e] - blocks[e]) * block_m + j - bounds[e]
    shift = (block_end - blocks) * block_m - bounds[:-1]
    padded_rows = torch.arange(num_pairs, device=device) + shift[sorted_ids]
    sorted_pairs = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_rows] = order.to(torch.int32)
    return sorted_pairs, block_expert.to(torch.int32)


def _dot_options(dtype, block_m):
    """fp32 follows torch.matmul's TF32 setting; bf16 dots run on fp32 operands when interpreting (the
    interpreter's bf16 arithmetic is wrong)."""
    return {"INPUT_PRECISION": "tf32" if dtype != torch.float32 or _torch_allows_tf32() else "ieee",
            "DOT_F32": _config.interpreting() and dtype == torch.bfloat16, "BLOCK_M": block_m}


def _grid(max_blocks, n_cols):
    return lambda meta: (max_blocks * triton.cdiv(n_cols, meta["BLOCK_N"]),)


def moe_experts_gate_up(x, w_gate_up, sorted_pairs, block_expert, top_k, block_m):
    """``silu(x @ gate_e.T) * (x @ up_e.T)`` of every block's pairs (``align_blocks``) -> h (max_blocks *
    block_m, inter) in x's dtype, row r holding the pair at ``sorted_pairs[r]`` (padding rows unwritten)."""
    num_pairs, hidden = x.shape[0] * top_k, x.shape[1]
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    max_blocks = block_expert.shape[0]
    h = torch.empty((max_blocks * block_m, inter), dtype=x.dtype, device=x.device)
    _config.launch_tuned(
        _moe_experts_gate_up_kernel, _grid(max_blocks, inter), _INTERPRETER_CONFIG,
        x, w_gate_up, h, sorted_pairs, block_expert,
        num_pairs, triton.next_power_of_2(num_pairs), max_blocks, num_experts, hidden, inter,
        x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), h.stride(0),
        TOP_K=top_k, **_dot_options(x.dtype, block_m),
    )
    return h


def moe_experts_down(h, w_down, topk_weights, sorted_pairs, block_expert, block_m):
    """``topk_weights[p] * h[r] @ down_e.T`` of every block's pairs -> rows (tokens * top_k, hidden) in h's
    dtype, pair p = token * top_k + slot at row p."""
    num_pairs, inter = topk_weights.numel(), h.shape[1]
    num_experts, hidden = w_down.shape[0], w_down.shape[1]
    max_blocks = block_expert.shape[0]
    rows = torch.empty((num_pairs, hidden), dtype=h.dtype, device=h.device)
    _config.launch_tuned(
        _moe_experts_down_kernel, _grid(max_blocks, hidden), _INTERPRETER_CONFIG,
        h, w_down, rows, topk_weights.reshape(-1), sorted_pairs, block_expert,
        num_pairs, triton.next_power_of_2(num_pairs), max_blocks, num_experts, hidden, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), rows.stride(0),
        **_dot_options(h.dtype, block_m),
    )
    return rows


def moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down):
    """``sum_s topk_weights[t, s] * swiglu_e(x[t])`` -> (tokens, hidden) in x's dtype. x: (tokens, hidden);
    topk_ids, topk_weights: (tokens, top_k); w_gate_up: (experts, 2 * inter, hidden); w_down: (experts, hidden,
    inter). Aligns the pairs, launches the gate/up kernel, then the down kernel, on the current stream, and sums
    each token's top_k rows."""
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    num_pairs = tokens * top_k
    if num_pairs == 0 or hidden == 0 or inter == 0:
        return torch.zeros((tokens, hidden), dtype=x.dtype, device=x.device)
    block_m = _INTERPRETER_BLOCK_M if _config.interpreting() else block_m_for(num_pairs, num_experts, x.dtype)
    sorted_pairs, block_expert = align_blocks(topk_ids, num_experts, block_m)
    h = moe_experts_gate_up(x, w_gate_up, sorted_pairs, block_expert, top_k, block_m)
    rows = moe_experts_down(h, w_down, topk_weights, sorted_pairs, block_expert, block_m)
    if top_k == 1:
        return rows
    return rows.view(tokens, top_k, hidden).sum(dim=1)
