"""Autotune config factories. Under the interpreter, ``@triton.autotune`` with two or more configs crashes
(its benchmarking asks for a GPU driver), so each factory returns a single config there."""

import triton

from iso_kernels._env import interpreting  # noqa: F401  (re-exported for the kernel launchers)


def configs(gpu_configs, interpreter_config):
    """``gpu_configs`` on a GPU; ``[interpreter_config]`` under the interpreter."""
    return [interpreter_config] if interpreting() else list(gpu_configs)


def config(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)
