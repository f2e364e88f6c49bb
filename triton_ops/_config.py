"""Autotune helpers: config building, the launch that chooses configs, and the pruner that keeps only configs
that fit the device.

Under the interpreter, ``@triton.autotune`` with two or more configs crashes (its benchmarking asks for a GPU
driver; Triton 3.6 benchmarks even a single pruned config), so ``launch_tuned`` decides at each launch:
interpreted kernels run their one interpreter config directly, compiled ones go through the autotuner.

On a GPU, ``keep_fitting`` compiles every candidate for the device the launch runs on (the autotuner would
compile each one to benchmark it anyway, and the compiled kernel stays in the JIT cache for that benchmark)
and drops the ones the device cannot run well: shared memory over the block's opt-in limit, or registers
spilled to local memory. Estimating either from the block shape misses what the compiler actually does —
at head_dim 128, 128x64 tiles at 4 warps spill 688 bytes per thread on sm_90 but none at 8 warps.
"""

import os

import triton
from triton.runtime.errors import OutOfResources, PTXASError

# Local memory per thread (the driver's CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, which Triton reports as n_spills
# words) that still counts as "no spilling". The driver shows only this stack frame, not ptxas' spill-store
# count, which runs up to 2.75x the frame (measured on these kernels, Triton 3.6/3.9, sm_80/89/90: frames of
# 8-40 bytes came with 4-44 bytes of spill stores, 48-56 bytes with 48-76, and one 32-byte frame with 88: the
# fp32 32x32 attention tile at head_dim 256 on sm_90): a 24-byte frame keeps spill stores within 64 bytes.
# Real spills here start at a few hundred bytes.
MAX_LOCAL_BYTES = 24


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backport_interpreter_loop_bounds():
    """Let Triton 3.6's interpreter take a loop bound computed from kernel arguments, as 3.9's does.

    The interpreter holds a scalar as a one-element array and converts a ``range`` bound with
    ``int(array)``, which NumPy 2.x refuses ("only 0-dimensional arrays can be converted to Python scalars"):
    ``range(tl.cdiv(K, BLOCK_K))`` raises TypeError. Triton 3.7+ squeezes the array first; this installs
    the same conversion for older versions. Compiled kernels are unaffected: there, such a ``range`` is an
    scf.for loop, which the software pipeliner needs (a ``while`` loop would work here but not be pipelined).
    """
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if not interpreting() or version >= (3, 7):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "squeezes_loop_bounds", False):
        return

    def patch_tensor_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezing_index.squeezes_loop_bounds = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing_index


def launch_tuned(tuned, grid, interpreter_config, *args, **kwargs):
    """Launch the autotuned kernel ``tuned``: on a GPU through its autotuner, which picks among its configs
    at the first launch of each key; under the interpreter with ``interpreter_config``, bypassing the
    autotuner, whose benchmarking needs a GPU driver."""
    if interpreting():
        return tuned.fn[grid](*args, **kwargs, **interpreter_config.all_kwargs())
    return tuned[grid](*args, **kwargs)


def config(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def launch_arguments(named_args, kwargs):
    """The kernel arguments of an ``early_config_prune`` call: the autotuner also passes its own
    ``grid`` and ``warmup`` keywords, which are not kernel arguments."""
    return {**named_args, **{k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}}


def fits_device(kernel, cfg, arguments) -> bool:
    """Compile ``kernel`` (a ``triton.jit`` function) with ``cfg`` for the current device and say whether it
    loads within the device's shared memory and spills at most ``MAX_LOCAL_BYTES`` per thread."""
    try:
        compiled = kernel.warmup(grid=(1,), **arguments, **cfg.all_kwargs())
        compiled._init_handles()  # loads the module: checks shared memory and reads the local-memory size
    except (OutOfResources, PTXASError):
        return False
    return compiled.n_spills * 4 <= MAX_LOCAL_BYTES


def keep_fitting(kernel, candidates, arguments, *, first_fit=False):
    """The candidates that fit the device (only the first one with ``first_fit``), in order; the last
    candidate when none does, so a launch still runs (the compile checks flag that case)."""
    kept = []
    for cfg in candidates:
        if fits_device(kernel, cfg, arguments):
            kept.append(cfg)
            if first_fit:
                break
    return kept or [candidates[-1]]
