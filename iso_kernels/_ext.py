"""Lazy loader of the native extension ``iso_kernels._C``.

Nothing here runs at ``import iso_kernels``. ``load()`` preloads NCCL's library from the
``nvidia-nccl-cu13``/``-cu12`` wheel (or ``NCCL_HOME``) with RTLD_GLOBAL, as torch does, because an
editable install cannot rely on the RPATH written into ``_C``; then it imports ``_C``. When anything is
missing, ``load()`` returns None and ``ext_reason()`` says why, so callers fall back to torch.distributed.
"""

import ctypes
import functools
import importlib.util
import json
import os
from pathlib import Path

_BUILD_RECORD = Path(__file__).with_name("_build_record.json")


def _nccl_library_candidates():
    home = os.environ.get("NCCL_HOME")
    if home:
        yield Path(home) / "lib" / "libnccl.so.2"
    for package in ("nvidia.nccl",):
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            spec = None
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                yield Path(root) / "lib" / "libnccl.so.2"


def _preload_nccl():
    for candidate in _nccl_library_candidates():
        if candidate.exists():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return str(candidate)
    return None  # the system loader may still find libnccl.so.2


@functools.lru_cache(maxsize=None)
def _load():
    try:
        nccl_path = _preload_nccl()
    except OSError as exc:
        return None, f"could not load NCCL's library: {exc}"
    try:
        from . import _C
    except ImportError as exc:
        record = _build_record()
        why = record.get("reason") if record.get("ext") == "skipped" else None
        return None, why or f"iso_kernels._C is not importable: {exc} (nccl: {nccl_path or 'system loader'})"
    return _C, None


def load():
    """The ``_C`` module, or None when it is unavailable (``ext_reason()`` says why)."""
    return _load()[0]


def ext_reason():
    """Why ``_C`` is unavailable, or None when it loaded."""
    return _load()[1]


def _build_record():
    try:
        return json.loads(_BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return {}


def build_info():
    """What was compiled and why anything was skipped.

    Keys: ``ext`` ("built" / "skipped" / "unavailable"), ``reason``, and when ``_C`` loads, its own report
    (CUDA runtime compiled against, NCCL version compiled and loaded, CUDA archs, device count).
    """
    info = {"build": _build_record()}
    module = load()
    if module is None:
        info["ext"] = "skipped" if info["build"].get("ext") == "skipped" else "unavailable"
        info["reason"] = ext_reason()
        return info
    info["ext"] = "built"
    info["reason"] = None
    info.update(module.build_info())
    return info
