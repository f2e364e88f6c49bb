"""Every environment variable the package reads at run time: one accessor each, read when called (so a test can
monkeypatch the environment, and a process can change it before the first use). The README's table lists them
with the build-time ones.

Read elsewhere, because they cannot import this module:
  * build time: ``ISO_KERNELS_BUILD_EXT``, ``ISO_KERNELS_CUDA_ARCHS``, ``CUDA_HOME``, ``NCCL_HOME``, ``MAX_JOBS``
    (``setup.py``, ``CMakeLists.txt``, ``install.sh`` and the shell scripts run before the package is importable);
  * ``NCCL_HOME`` also by ``_C``'s own NCCL loader (``csrc/nccl_lib.cpp``), in the same order as ``_ext``;
  * ``TRITON_INTERPRET`` by ``triton_ops``, which must not import ``iso_kernels``.
"""

import os
from pathlib import Path

CACHE_DIR_VAR = "ISO_KERNELS_CACHE_DIR"
COMPILE_CACHE_VAR = "ISO_KERNELS_COMPILE_CACHE"
COMPILE_MATRIX_VAR = "ISO_KERNELS_COMPILE_MATRIX"
COMM_TIMEOUT_VAR = "ISO_KERNELS_COMM_TIMEOUT_S"
DISABLE_NATIVE_COMM_VAR = "ISO_KERNELS_DISABLE_NATIVE_COMM"
NCCL_HOME_VAR = "NCCL_HOME"


def cache_dir() -> Path:
    """``ISO_KERNELS_CACHE_DIR``: preset checkpoints and the calibration file; default ``~/.cache/iso_kernels``."""
    return Path(os.environ.get(CACHE_DIR_VAR) or Path.home() / ".cache" / "iso_kernels")


def compile_cache_dir() -> Path:
    """``ISO_KERNELS_COMPILE_CACHE``: Triton's cache for the compile report (``python -m tools.compile_report``
    in a checkout); default ``~/.cache/iso_kernels/compile-report``."""
    return Path(os.environ.get(COMPILE_CACHE_VAR) or Path.home() / ".cache" / "iso_kernels" / "compile-report")


def compile_matrix() -> str:
    """``ISO_KERNELS_COMPILE_MATRIX``: the cases the compile checks (tests/test_compile_targets.py) compile:
    ``main`` (default; a Llama-70B-class bf16 prefill's shapes) or ``full`` (every dtype, head_dim and shape)."""
    return os.environ.get(COMPILE_MATRIX_VAR) or "main"


def comm_timeout_text() -> str | None:
    """``ISO_KERNELS_COMM_TIMEOUT_S``: the nccl-ext watchdog's bound in seconds, as written (None when unset or
    blank); ``comm.nccl_ext.comm_timeout_s`` checks it and supplies the default, 600 s."""
    return os.environ.get(COMM_TIMEOUT_VAR, "").strip() or None


def native_comm_disabled() -> bool:
    """``ISO_KERNELS_DISABLE_NATIVE_COMM``: anything but unset, empty or ``0`` keeps the nccl-ext communicator
    from starting ("auto" then uses torch.distributed)."""
    return os.environ.get(DISABLE_NATIVE_COMM_VAR, "0") not in ("", "0")


def nccl_home() -> Path | None:
    """``NCCL_HOME``: an NCCL install whose ``lib/libnccl.so.2`` is loaded unless a copy is already in the
    process; None when unset or empty."""
    home = os.environ.get(NCCL_HOME_VAR)
    return Path(home) if home else None
