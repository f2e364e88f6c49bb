#!/usr/bin/env bash
# Sets up iso-kernels from source on a fresh machine, CPU-only or CUDA, then installs it in editable mode.
# - torch: kept if importable; else the CUDA build where nvidia-smi sees a GPU, else the CPU wheel 2.13.0
#   (an unpinned torch on a CPU machine would pull a multi-GB CUDA build).
# - Other requirements are installed only when missing, so an offline GPU image that has them all works.
# - The native extension (CMake + nvcc + NCCL) builds when a CUDA toolkit is found; see README "Build".
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip_install torch; else pip_install torch==2.13.0; fi
fi

# module -> pip requirement. Required ones must import; build tools may instead be binaries on PATH; optional
# ones (tests, plots, the Hugging Face oracle) are installed when a registry is reachable, else only warned about.
have_module() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
missing=()
for pair in triton:triton setuptools:setuptools wheel:wheel pybind11:pybind11 safetensors:safetensors \
            numpy:numpy tqdm:tqdm nvidia.nccl:nvidia-nccl-cu13; do
  [ "${pair%%:*}" = nvidia.nccl ] && [ -n "${NCCL_HOME:-}" ] && continue  # NCCL from NCCL_HOME instead
  have_module "${pair%%:*}" || missing+=("${pair#*:}")
done
for tool in cmake ninja; do
  have_module "$tool" || command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then pip_install "${missing[@]}"; fi

optional=()
for pair in pytest:pytest pytest_timeout:pytest-timeout matplotlib:matplotlib transformers:transformers; do
  have_module "${pair%%:*}" || optional+=("${pair#*:}")
done
if [ ${#optional[@]} -gt 0 ] && ! pip_install "${optional[@]}"; then
  echo "install.sh: could not install ${optional[*]} (no package registry?); tests or plots that need them skip or fail" >&2
fi

# No build isolation: the build must see the installed pybind11/NCCL, and must not resolve its own torch.
pip_install --no-build-isolation --no-deps -e .
"$PYTHON" -c "import iso_kernels, json; info = iso_kernels.build_info(); print('iso_kernels: native extension', info['ext'], '-', info.get('reason') or 'ok')"
