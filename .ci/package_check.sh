#!/usr/bin/env bash
# Installs iso-kernels the ways users do and runs it from outside the checkout (issue 18):
#   wheel  `python -m build` (an sdist, then a wheel built from that sdist, both with build isolation: the build
#          requirements come from the registry, as for `pip install .`), installed with its dependencies resolved;
#   sdist  `pip install --no-build-isolation --no-deps iso_kernels-*.tar.gz` (the GPU image's way, no registry).
# Each goes into a fresh virtual environment whose only other packages are the run-time dependencies, shared by a
# .pth file from one environment cached across runs (torch's wheel is installed once, not per artifact). From a
# folder outside the checkout it then: imports every module the checkout has (.ci/check_installed.py), runs the
# prefill on llama-tiny at TP 2 and checks that its report says the logits agree, and runs `iso-kernels plan`.
# A failure prints one line, "CI packaging: <artifact>: <step> failed", and exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SOURCE=$PWD
fail() { echo "CI packaging: $1: $2 failed"; exit 1; }
timed() {  # timed ARTIFACT STEP COMMAND...: run, say how long it took; on failure its output's tail, then one line
  local artifact=$1 step=$2 start=$SECONDS log
  shift 2
  log=$work/log.txt
  if ! "$@" > "$log" 2>&1; then tail -n 40 "$log"; fail "$artifact" "$step"; fi
  echo "CI packaging: $artifact: $step ok ($((SECONDS - start)) s)"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/iso-kernels-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Never the user's calibration or checkpoint cache: a fresh install starts from nothing.
export ISO_KERNELS_CACHE_DIR=$work/cache

# --- the run-time dependencies, once per machine (what `pip install <wheel>` would resolve) ---
deps=${ISO_KERNELS_CI_DEPS_VENV:-$HOME/.cache/iso_kernels/ci/package-deps}
deps_ready() { "$deps/bin/python" -c "import torch, triton, safetensors, numpy, tqdm, build, pybind11, setuptools, nvidia.nccl" 2>/dev/null; }
make_deps() {
  rm -rf "$deps" && "$PYTHON" -m venv "$deps" &&
    "$deps/bin/python" -m pip install torch==2.13.0 &&
    # The build requirements too: the sdist is built without isolation, against these.
    "$deps/bin/python" -m pip install triton safetensors numpy tqdm build setuptools wheel pybind11 \
      cmake ninja nvidia-nccl-cu13
}
deps_ready || timed deps "dependency environment" make_deps
deps_site=$("$deps/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

fresh_venv() {  # fresh_venv NAME: a venv with no package of its own that sees the dependencies
  "$PYTHON" -m venv --without-pip "$work/$1" &&
    echo "$deps_site" > "$("$work/$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/ci_deps.pth"
}

# --- the artifacts, from the clean checkout ---
timed sdist+wheel "python -m build" "$deps/bin/python" -m build --outdir "$work/dist" "$SOURCE"
wheel=$(ls "$work"/dist/*.whl) && sdist=$(ls "$work"/dist/*.tar.gz) || fail sdist+wheel "finding the artifacts"

check() {  # check ARTIFACT INSTALL-ARGS...
  local artifact=$1 venv=$work/venv-$1
  shift
  timed "$artifact" "fresh venv" fresh_venv "venv-$artifact"
  timed "$artifact" "pip install" "$deps/bin/python" -m pip --python "$venv/bin/python" install "$@"
  mkdir -p "$work/outside-$artifact" && cd "$work/outside-$artifact" || fail "$artifact" "leaving the checkout"
  timed "$artifact" "import every module" "$venv/bin/python" "$SOURCE/.ci/check_installed.py" "$SOURCE"
  timed "$artifact" "prefill llama-tiny tp 2" "$venv/bin/python" -m iso_kernels prefill --model llama-tiny --tp 2 \
    --seq-len 200 --split 0.5 --repeats 2 --json report.json
  timed "$artifact" "logits agree" "$venv/bin/python" -c \
    "import json, sys; r = json.load(open('report.json')); sys.exit(not (r['agree'] and r['iso_equals_serial_same_chunks']))"
  timed "$artifact" "iso-kernels plan" "$venv/bin/iso-kernels" plan
  cd "$SOURCE" || exit 1
}
check wheel "$wheel"
check sdist --no-build-isolation --no-deps "$sdist"
