"""iso-kernels: overlap tensor-parallel all-reduce with computation inside one sequence (ISO).

Importing this package never touches CUDA or the native extension; both load on first use.
"""

__version__ = "0.1.0"

from ._ext import build_info  # noqa: E402

__all__ = ["build_info", "__version__"]
