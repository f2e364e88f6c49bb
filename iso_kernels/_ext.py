"""Lazy loader of the native extension ``iso_kernels._C``.

Nothing here runs at ``import iso_kernels``. ``load()`` makes sure NCCL's library is in the process before it
imports ``_C``, because an editable install cannot rely on the RPATH written into ``_C``: a ``libnccl.so.2``
already loaded (torch's, typically) is used as it is, so no second copy of another version is mapped beside
it; otherwise ``NCCL_HOME``'s, else the ``nvidia-nccl-cu13``/``-cu12`` wheel's, is loaded with RTLD_GLOBAL.
When anything is missing, ``load()`` returns None and ``ext_reason()`` says why, so callers fall back to
torch.distributed.
"""

import ctypes
import functools
import importlib.util
import json
import os
from pathlib import Path

from . import envs

_BUILD_RECORD = Path(__file__).with_name("_build_record.json")
_nccl_preloaded = None  # what _preload_nccl chose, for build_info()
NCCL_SONAME = "libnccl.so.2"
ALREADY_LOADED = f"{NCCL_SONAME} already in the process"


def _nccl_library_candidates():
    home = envs.nccl_home()
    if home:
        yield home / "lib" / NCCL_SONAME
    try:
        spec = importlib.util.find_spec("nvidia.nccl")  # the nvidia-nccl-cu13 (or -cu12) wheel
    except ModuleNotFoundError:  # no "nvidia" namespace package at all
        spec = None
    if spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            yield Path(root) / "lib" / NCCL_SONAME


def _preload_nccl(open_library=ctypes.CDLL, exists=Path.exists):
    """Which NCCL ``_C`` will use: the loaded one, else the first candidate that exists, else None (the
    system loader may still find one). ``open_library``/``exists`` are seams for tests."""
    try:
        open_library(NCCL_SONAME, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        return ALREADY_LOADED
    except OSError:
        pass  # not loaded yet
    for candidate in _nccl_library_candidates():
        if exists(candidate):
            open_library(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return str(candidate)
    return None


@functools.cache
def _load():
    try:
        nccl_path = _preload_nccl()
    except OSError as exc:
        return None, f"could not load NCCL's library: {exc}"
    global _nccl_preloaded
    _nccl_preloaded = nccl_path
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

    Keys: ``ext`` ("built" / "skipped" / "unavailable"), ``reason``, ``nccl_preloaded`` (what ``load()``
    chose), and when ``_C`` loads, its own report (CUDA runtime compiled against, NCCL version compiled and
    loaded with the library's path and how it was found, CUDA archs, device count).
    """
    info = {"build": _build_record()}
    module = load()
    info["nccl_preloaded"] = _nccl_preloaded
    if module is None:
        info["ext"] = "skipped" if info["build"].get("ext") == "skipped" else "unavailable"
        info["reason"] = ext_reason()
        return info
    info["ext"] = "built"
    info["reason"] = None
    info.update(module.build_info())
    return info
