"""Dispatch by device, across every custom op: the CPU and CUDA kernels are registered with torch.library,
the test-only override sends CPU tensors to the Triton launcher, a plain CPU process (neither a GPU nor the
interpreter) imports the ops and runs their CPU kernels without importing a kernel module, and the model
compiles whole (fullgraph) with the eager logits. Each op's opcheck is in its own test file."""

import os
import subprocess
import sys

import pytest
import torch

import triton_ops.add_rms_norm
import triton_ops.chunked_attention
import triton_ops.chunked_attention_varlen
import triton_ops.gemm_signal
import triton_ops.merge_attention_states
import triton_ops.moe_experts
from iso_kernels import checkpoint, ops

# (custom op, the Triton launcher its CUDA kernel calls, a call of the public function on CPU tensors)
x, w, res = torch.randn(20, 64), torch.randn(12, 64), torch.randn(20, 64)
q, lse = torch.randn(1, 5, 2, 64), torch.randn(1, 2, 5)
cu_seqlens_q, seqused_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([4, 3], dtype=torch.int32)
topk_ids = torch.randint(0, 3, (20, 2))
CALLS = [
    ("add_rms_norm", triton_ops.add_rms_norm, "add_rms_norm", lambda: ops.add_rms_norm(x, res, w[0], 1e-6)),
    ("rms_norm", triton_ops.add_rms_norm, "add_rms_norm", lambda: ops.rms_norm(x, w[0], 1e-6)),
    ("chunked_attention", triton_ops.chunked_attention, "chunked_attention_fwd",
     lambda: ops.chunked_attention(q, q, q)),
    ("chunked_attention_varlen", triton_ops.chunked_attention_varlen, "chunked_attention_varlen_fwd",
     lambda: ops.chunked_attention_varlen(q[0], q.expand(2, 5, 2, 64), q.expand(2, 5, 2, 64),
                                          cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k)),
    ("gemm_signal", triton_ops.gemm_signal, "gemm_signal", lambda: ops.gemm_signal(x, w)),
    ("merge_attention_states", triton_ops.merge_attention_states, "merge_attention_states",
     lambda: ops.merge_attention_states(q, lse, q, lse)),
    ("moe_experts", triton_ops.moe_experts, "moe_experts",
     lambda: ops.moe_experts(x, topk_ids, topk_ids.float(), w.expand(3, 12, 64), w[:6].T.expand(3, 64, 6))),
]


class _LauncherCalled(Exception):
    pass


def test_every_custom_op_has_cpu_and_cuda_kernels():
    names = {op._qualname for op in ops.CUSTOM_OPS}
    assert names == {f"iso_kernels::{name}" for name, *_ in CALLS}
    for name in names:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"


@pytest.mark.parametrize("name,module,launcher,call", CALLS, ids=[c[0] for c in CALLS])
def test_cpu_tensors_reach_the_launcher_only_under_the_override(name, module, launcher, call, monkeypatch,
                                                               request):
    def launched(*args, **kwargs):
        raise _LauncherCalled(name)

    monkeypatch.setattr(module, launcher, launched)
    call()  # the CPU kernel
    request.getfixturevalue("triton_backend")
    with pytest.raises(_LauncherCalled):
        call()


@pytest.mark.slow
def test_compiled_model_matches_eager(tmp_path):
    """torch.compile(model, fullgraph=True) traces the ops through their fakes and runs their CPU kernels: the
    eager logits; and gemm_signal's counters, which the op mutates, hold their targets after a compiled call."""
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    model = checkpoint.load_checkpoint(folder)
    model.setup_caches(2, 37)
    tokens = torch.randint(0, 512, (2, 37))
    with torch.no_grad():
        eager = model(tokens)
        compiled = torch.compile(model, fullgraph=True)(tokens)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)

    signal = torch.zeros(2, dtype=torch.int32)
    out = torch.compile(lambda a, b, s: ops.gemm_signal(a, b, s, rows_per_signal=16), fullgraph=True)(x, w, signal)
    torch.testing.assert_close(out, x @ w.T)
    assert signal.tolist() == [16 * 12, 4 * 12]


@pytest.mark.slow
def test_ops_run_without_gpu_or_interpreter():
    """A plain CPU process (no TRITON_INTERPRET, no CUDA) imports the ops and runs their CPU kernels."""
    script = (
        "import torch, iso_kernels.ops as ops\n"
        "x, w = torch.randn(20, 8), torch.randn(12, 8)\n"
        "s = torch.full((2,), 9, dtype=torch.int32)\n"
        "assert torch.allclose(ops.gemm_signal(x, w, s, rows_per_signal=16), x @ w.T, atol=1e-5)\n"
        "assert s.tolist() == [16 * 12, 4 * 12], s\n"
        "w8 = torch.rand(8) + 0.5\n"
        "def rms(h): return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w8\n"
        "out, res = ops.add_rms_norm(x, x, w8, 1e-6)\n"
        "assert torch.equal(res, x + x)\n"
        "assert torch.allclose(out, rms(x + x), atol=1e-5)\n"
        "assert torch.allclose(ops.rms_norm(x, w8, 1e-6), rms(x), atol=1e-5)\n"
        "q = torch.randn(1, 7, 2, 16)\n"
        "out, lse = ops.chunked_attention(q, q, q, return_lse=True)\n"
        "sdpa = torch.nn.functional.scaled_dot_product_attention(*[q.transpose(1, 2)] * 3, is_causal=True)\n"
        "assert torch.allclose(out, sdpa.transpose(1, 2), atol=1e-5)\n"
        "cu, used = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([3, 7], dtype=torch.int32)\n"
        "kv = torch.cat([q, q]).expand(2, 7, 2, 16)\n"
        "varlen = ops.chunked_attention_varlen(q[0], kv, kv, cu_seqlens_q=cu, seqused_k=used)\n"
        "assert torch.allclose(varlen[3:], out[0, 3:], atol=1e-6), 'the second sequence: the last 4 queries of 7'\n"
        "merged, _ = ops.merge_attention_states(out, lse, out, lse)\n"
        "assert torch.allclose(merged, out, atol=1e-6)\n"
        "ids, gate_up, down = torch.tensor([[1, 0]] * 20), torch.randn(2, 24, 8), torch.randn(2, 8, 12)\n"
        "moe = ops.moe_experts(x, ids, torch.full((20, 2), 0.5), gate_up, down)\n"
        "def expert(e): g, u = (x @ gate_up[e].T).chunk(2, -1); return (torch.nn.functional.silu(g) * u) @ down[e].T\n"
        "assert torch.allclose(moe, (expert(0) + expert(1)) / 2, atol=1e-4)\n"
        "import sys; assert not [m for m in sys.modules if m.startswith('triton_ops')], 'a kernel was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert result.returncode == 0, result.stderr
