"""Public ops. Each module holds, in flash-attention's order: the registered custom op
``iso_kernels::<op>`` with its kernels per device and its fake, then the documented public function that
states tensor shapes. The dispatcher picks the kernel by the tensors' device: CUDA runs the Triton launcher
of ``triton_ops.<op>`` (the function ``custom_op`` decorates), CPU the fastest correct torch path."""

from .add_rms_norm import _add_rms_norm, _rms_norm, add_rms_norm, rms_norm
from .chunked_attention import _chunked_attention, chunked_attention
from .chunked_attention_varlen import _chunked_attention_varlen, chunked_attention_varlen
from .gemm_signal import _gemm_signal, gemm_signal, signal_targets
from .merge_attention_states import _merge_attention_states, merge_attention_states
from .moe_experts import _moe_experts, moe_experts

# Every custom op, for tests that run the Triton kernels on CPU tensors: with an op's CPU kernel disabled
# (``op.set_kernel_enabled("cpu", False)``) the dispatcher runs the function ``custom_op`` decorated.
CUSTOM_OPS = (_add_rms_norm, _chunked_attention, _chunked_attention_varlen, _gemm_signal, _merge_attention_states,
              _moe_experts, _rms_norm)

__all__ = ["CUSTOM_OPS", "add_rms_norm", "chunked_attention", "chunked_attention_varlen", "gemm_signal",
           "merge_attention_states", "moe_experts", "rms_norm", "signal_targets"]
