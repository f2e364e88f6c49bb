"""Triton kernels of iso-kernels, one op per file (constants, ``@triton.jit`` kernels, launcher).

Internal: users call ``iso_kernels.ops``. Set ``TRITON_INTERPRET=1`` before importing this package to run
the kernels on CPU tensors.
"""

from ._config import backport_interpreter_loop_bounds

backport_interpreter_loop_bounds()
