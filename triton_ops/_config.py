"""Autotune helpers: config building, the launch that chooses configs, and the pruner that keeps only configs
that fit the device.

Under the interpreter, ``@triton.autotune`` with two or more configs crashes (its benchmarking asks for a GPU
driver; Triton 3.6 benchmarks even a single pruned config), so ``launch_tuned`` decides at each launch:
interpreted kernels run their one interpreter config directly, compiled ones go through the autotuner.

On a GPU, ``keep_fitting`` compiles every candidate for the device the launch runs on (the autotuner would
compile each one to benchmark it anyway, and the compiled kernel stays in the JIT cache for that benchmark)
and drops the ones the device cannot run well: shared memory over the block's opt-in limit, or registers
spilled to local memory. Estimating either from the block shape misses what the compiler actually does —
at head_dim 128, 128x64 tiles at 4 warps spill 688 bytes per thread on sm_90 but none at 8 warps. Each op's
candidates are listed per architecture (``device_arch``), leaving out what the committed compile reports show
that architecture never keeps, so ``keep_fitting`` compiles fewer.

``autotune`` is ``triton.autotune`` with this package's tuning: a short benchmark per config and the results
cached on disk, so a spawned rank, or the next process, reuses a key's choice instead of timing it again.
"""

import inspect
import os
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime.errors import OutOfResources, PTXASError

# Local memory per thread (the driver's CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, which Triton reports as n_spills
# words) that still counts as "no spilling". The driver shows only this stack frame, not ptxas' spill-store
# count, which runs up to 2.75x the frame (measured on these kernels, Triton 3.6/3.9, sm_80/89/90: frames of
# 8-40 bytes came with 4-44 bytes of spill stores, 48-56 bytes with 48-76, and one 32-byte frame with 88: the
# fp32 32x32 attention tile at head_dim 256 on sm_90): a 24-byte frame keeps spill stores within 64 bytes.
# Real spills here start at a few hundred bytes.
MAX_LOCAL_BYTES = 24
# Autotuning's timing of each config, in ms: Triton's default (25 ms warmup, 100 ms timed) takes ~125 ms per
# config and key, ~0.9 s for a key of 7 candidates. The tuned kernels run 0.05-5 ms at the shapes that are
# tuned, so 10 ms still times 2-200 runs after a 5 ms warmup (do_bench also runs each config 6 times first to
# estimate it): enough to rank configs whose medians differ by more than the run-to-run noise.
BENCH_WARMUP_MS = 5
BENCH_REP_MS = 10
# Whether launches leave out the candidates that an op lists as never kept on their architecture
# (``arch_candidates``); ``python -m tools.compile_report --all-candidates`` turns it off, to compile those too
# and show whether the lists still hold.
PER_ARCH_CANDIDATES = True
# Threads that compile one key's candidates at once (``compile_all``): most of a Triton compile runs outside the
# GIL (the MLIR and LLVM passes, ptxas as a subprocess), so a key's 6-7 candidates compile in about the time of
# the slowest on a machine with as many cores (the 7 16-bit attention candidates at head_dim 128 for sm_90,
# Triton 3.9, 2-core CPU machine: 8.5 s one by one, 4.8 s on 2 threads). ``tools/compile_report.py`` sets 1:
# it captures each compile's ptxas log through the process's stdout. ``ISO_KERNELS_COMPILE_THREADS=1`` compiles one
# candidate at a time: the parallel path rests on Triton's private async-compile mode (in 3.6 and 3.9), which no
# GPU has run here yet.
COMPILE_THREADS_VAR = "ISO_KERNELS_COMPILE_THREADS"


def _compile_threads() -> int:
    text = os.environ.get(COMPILE_THREADS_VAR, "").strip()
    if not text:
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{COMPILE_THREADS_VAR} must be a whole number >= 1, got {text!r}")
    return int(text)


COMPILE_THREADS = _compile_threads()


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


def short_bench(kernel_call, quantiles=None):
    """The autotuner's benchmark: the active driver's (``triton.testing.do_bench`` on a GPU, a single no-op
    launch under ``tools/compile_report.py``'s compile-only driver) with ``BENCH_WARMUP_MS`` and
    ``BENCH_REP_MS``."""
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles, warmup=BENCH_WARMUP_MS,
                                           rep=BENCH_REP_MS)


def autotune(configs, key, **kwargs):
    """``triton.autotune`` for every launcher here: ``short_bench`` as its benchmark, and its results cached on
    disk (``cache_results``, in Triton's cache directory, keyed by the kernel's source, the target, the tuning
    key and the configs left after pruning) where this Triton takes those arguments (3.6 and 3.9 do)."""
    accepted = inspect.signature(triton.autotune).parameters
    if "do_bench" in accepted:
        kwargs.setdefault("do_bench", short_bench)
    if "cache_results" in accepted:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)


def device_arch():
    """The compute capability (10 * major + minor) the current launch compiles for, asked at launch, never at
    import: the active Triton driver's target, which is ``torch.cuda.get_device_capability()`` of the current
    device on a GPU and the chosen architecture under ``tools/compile_report.py``'s compile-only driver.
    None for a target that is not CUDA."""
    from triton.runtime import driver

    arch = driver.active.get_current_target().arch
    return arch if isinstance(arch, int) else None


def arch_candidates(candidates, never_kept, variant=None):
    """``candidates`` less those ``never_kept`` lists for this launch's architecture (``device_arch``): under
    ``(arch, None)`` for every launch, under ``(arch, variant)`` for launches of that variant (a head_dim, say).
    All of them with ``PER_ARCH_CANDIDATES`` off, or where nothing would be left."""
    if not PER_ARCH_CANDIDATES:
        return candidates
    arch = device_arch()
    dropped = never_kept.get((arch, None), []) + never_kept.get((arch, variant), [])
    return [cfg for cfg in candidates if cfg not in dropped] or candidates


def config(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def launch_arguments(named_args, kwargs):
    """The kernel arguments of an ``early_config_prune`` call: the autotuner also passes its own
    ``grid`` and ``warmup`` keywords, which are not kernel arguments."""
    return {**named_args, **{k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}}


def _compiled(compile_call):
    """What ``compile_call`` compiles (a kernel, or under Triton's async compile mode a future of one), or
    None when ptxas or the device's limits refuse it."""
    try:
        return compile_call()
    except (OutOfResources, PTXASError):
        return None


def _fits(compiled) -> bool:
    if compiled is None:
        return False
    try:
        compiled._init_handles()  # loads the module: checks shared memory and reads the local-memory size
    except (OutOfResources, PTXASError):
        return False
    return compiled.n_spills * 4 <= MAX_LOCAL_BYTES


def fits_device(kernel, cfg, arguments) -> bool:
    """Compile ``kernel`` (a ``triton.jit`` function) with ``cfg`` for the current device and say whether it
    loads within the device's shared memory and spills at most ``MAX_LOCAL_BYTES`` per thread."""
    return _fits(_compiled(lambda: kernel.warmup(grid=(1,), **arguments, **cfg.all_kwargs())))


def compile_all(kernel, candidates, arguments):
    """``kernel`` compiled for the current device with each of ``candidates`` (None where that fails), on up
    to ``COMPILE_THREADS`` threads through Triton's async compile mode (one by one where this Triton has none,
    or where one is active already). Each compiled kernel lands in the kernel's cache as a plain compile's
    would."""
    threads = min(COMPILE_THREADS, len(candidates))
    try:
        from triton.runtime._async_compile import AsyncCompileMode, FutureKernel, active_mode
    except ImportError:
        threads = 1
    if threads < 2 or active_mode.get() is not None:
        return [_compiled(lambda cfg=cfg: kernel.warmup(grid=(1,), **arguments, **cfg.all_kwargs()))
                for cfg in candidates]
    with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool, ignore_errors=True):
        # A future for each config not compiled yet (a cached one comes back as it is), then their results,
        # before the mode ends: a failed compile is None here, and nothing is left for the mode's exit to raise.
        started = [_compiled(lambda cfg=cfg: kernel.warmup(grid=(1,), **arguments, **cfg.all_kwargs()))
                   for cfg in candidates]
        return [_compiled(compiled.result) if isinstance(compiled, FutureKernel) else compiled
                for compiled in started]


def keep_fitting(kernel, candidates, arguments, *, first_fit=False):
    """The candidates that fit the device (only the first one with ``first_fit``, compiling no further), in
    order; the last candidate when none does, so a launch still runs (the compile checks flag that case)."""
    if first_fit:
        fitting = next((cfg for cfg in candidates if fits_device(kernel, cfg, arguments)), None)
        return [fitting if fitting is not None else candidates[-1]]
    kept = [cfg for cfg, compiled in zip(candidates, compile_all(kernel, candidates, arguments), strict=True)
            if _fits(compiled)]
    return kept or [candidates[-1]]
