"""Triton kernels of iso-kernels, one op per file (constants, ``@triton.jit`` kernels, launcher).

Internal: users call ``iso_kernels.ops``. Set ``TRITON_INTERPRET=1`` before importing this package to run
the kernels on CPU tensors.
"""

from .chunked_attention import chunked_attention_fwd
from .fused_norm import add_rms_norm
from .gemm_signal import gemm_signal
from .merge_states import merge_states

__all__ = ["add_rms_norm", "chunked_attention_fwd", "gemm_signal", "merge_states"]
