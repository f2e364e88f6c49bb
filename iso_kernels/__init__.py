"""iso-kernels: overlap tensor-parallel all-reduce with computation inside one sequence (ISO).

Importing this package never touches CUDA or the native extension; both load on first use.
"""

from ._ext import build_info

__version__ = "0.1.0"
__all__ = ["Plan", "__version__", "build_info", "plan"]


def __getattr__(name):
    """``plan`` and ``Plan`` (``iso_kernels.planning``: the cost model, numpy) load on first use."""
    if name in ("plan", "Plan"):
        from . import planning

        return getattr(planning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
