"""Thin CMake driver for the native extension ``iso_kernels._C`` (the build itself is in CMakeLists.txt).

``ISO_KERNELS_BUILD_EXT``: ``auto`` (default) builds when ``$CUDA_HOME/bin/nvcc`` (``CUDA_HOME`` defaults to the
toolkit of the ``nvcc`` on PATH, else /usr/local/cuda) and NCCL's header exist and skips with one line otherwise;
``0`` skips; ``1`` makes a missing toolkit or NCCL an error. Once a build starts, its failure is always an error.
Without ``_C`` the package still imports and uses torch.distributed; ``iso_kernels/_build_record.json`` records
what happened and why.
Also read: ``ISO_KERNELS_CUDA_ARCHS`` (default 80;89;90), ``CUDA_HOME``, ``NCCL_HOME``, ``MAX_JOBS``.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_MODES = ("auto", "0", "1")
# A800/A100 (sm_80), RTX 4090 (sm_89), H100/H200 (sm_90).
DEFAULT_CUDA_ARCHS = "80;89;90"


def nccl_root():
    """NCCL_HOME, else the nvidia-nccl wheel's folder, else None."""
    if os.environ.get("NCCL_HOME"):
        return Path(os.environ["NCCL_HOME"])
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cuda_home():
    """CUDA_HOME, else the toolkit that holds the ``nvcc`` on PATH (a wrapper script elsewhere does not count:
    the folder must have the runtime's header), else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    toolkit = Path(nvcc).resolve().parents[1] if nvcc else None
    if toolkit and (toolkit / "include" / "cuda_runtime.h").is_file():
        return toolkit
    return Path("/usr/local/cuda")


def build_decision(mode, cuda_home, nccl):
    """Whether to build ``_C``: returns (build, reason). Raises ValueError for an unknown mode and
    RuntimeError when mode "1" demands a build that cannot happen. Pure: looks only at the given paths."""
    mode = (mode or "auto").strip().lower()
    if mode not in BUILD_MODES:
        raise ValueError(f"ISO_KERNELS_BUILD_EXT must be one of {BUILD_MODES}, got {mode!r}")
    if mode == "0":
        return False, "ISO_KERNELS_BUILD_EXT=0"
    missing = []
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    if not nvcc.is_file():
        missing.append(f"no nvcc at {nvcc} (set CUDA_HOME to the CUDA toolkit root)")
    if nccl is None or not (Path(nccl) / "include" / "nccl.h").is_file():
        missing.append(f"no nccl.h under {nccl} (set NCCL_HOME or pip install nvidia-nccl-cu13)")
    if missing and mode == "1":
        raise RuntimeError("ISO_KERNELS_BUILD_EXT=1 but " + "; ".join(missing))
    if missing:
        return False, "; ".join(missing)
    return True, f"nvcc at {nvcc}, NCCL at {nccl}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        self.cuda_home = cuda_home()
        self.nccl = nccl_root()
        build, reason = build_decision(os.environ.get("ISO_KERNELS_BUILD_EXT"), self.cuda_home, self.nccl)
        if not build:
            print(f"iso_kernels: skipping the native extension _C: {reason}", flush=True)
            self._remove_stale_modules()
            self._write_record({"ext": "skipped", "reason": reason})
            return
        self.archs = os.environ.get("ISO_KERNELS_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
        print(f"iso_kernels: building _C for sm {self.archs} ({reason})", flush=True)
        super().run()  # builds into build_lib, then copies into the source tree for editable installs
        self._write_record({"ext": "built", "reason": reason, "cuda_archs": self.archs,
                            "cuda_home": str(self.cuda_home), "nccl_root": str(self.nccl)})

    def build_extension(self, ext):
        import pybind11

        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        # A cache from an isolated build points at that build's deleted ninja/cmake: always reconfigure.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={self.cuda_home / 'bin' / 'nvcc'}",
            f"-DCMAKE_CUDA_ARCHITECTURES={self.archs}",
            f"-DNCCL_ROOT={self.nccl}",
        ]
        build = ["cmake", "--build", str(build_dir), "--target", "_C"]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)

    def _roots(self):
        """Where the package is assembled: the build tree (wheels) and, for editable installs, the source."""
        return {Path(self.build_lib)} | ({ROOT} if self.inplace else set())

    def _remove_stale_modules(self):
        """A _C left by an earlier build would contradict a "skipped" record (and ship in the wheel)."""
        for root in self._roots():
            for ext in self.extensions:
                (root / self.get_ext_filename(ext.name)).unlink(missing_ok=True)

    def _write_record(self, record):
        for root in self._roots():
            (root / "iso_kernels").mkdir(parents=True, exist_ok=True)
            (root / "iso_kernels" / "_build_record.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    # The packages are found by pyproject.toml's [tool.setuptools.packages.find], never listed here.
    setup(
        ext_modules=[CMakeExtension("iso_kernels._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
