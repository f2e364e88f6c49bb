"""Public ops. Each module holds, in flash-attention's order: the registered custom op
``iso_kernels::<op>`` with its fake, then the documented public function that states tensor shapes.
CUDA tensors run the Triton kernels of ``triton_ops``; CPU tensors run ``iso_kernels.reference``
(see ``iso_kernels._env`` for ``ISO_KERNELS_BACKEND``)."""

from .attention import chunked_attention, merge_attention_states
from .gemm_signal import gemm_signal, signal_targets
from .norm import add_rms_norm, rms_norm

__all__ = ["add_rms_norm", "chunked_attention", "gemm_signal", "merge_attention_states", "rms_norm",
           "signal_targets"]
