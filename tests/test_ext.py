"""The native extension on any machine: it imports (also with no NCCL on the loader path), reports what it
was built for, makes NCCL ids without a GPU, rejects bad arguments with ValueError and turns the missing
driver into RuntimeError. And the build's pure "should we build" decision."""

import ctypes
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iso_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
BAD_COMM_ARGS = [  # (unique_id length, world_size, rank, device, stream, timeout_ns, word in the message)
    (1, 2, 0, 0, 1, 10**9, "unique_id"),
    (127, 2, 0, 0, 1, 10**9, "unique_id"),
    (128, 0, 0, 0, 1, 10**9, "world_size"),
    (128, 2, 2, 0, 1, 10**9, "rank"),
    (128, 2, -1, 0, 1, 10**9, "rank"),
    (128, 2, 0, -1, 1, 10**9, "device"),
    (128, 2, 0, 0, 0, 10**9, "stream"),
    (128, 2, 0, 0, 1, 0, "timeout_ns"),
]
# NCCL entry points _C needs (ncclCommInitRankConfig with ncclConfig_t.blocking, ncclCommFinalize): 2.14.
NCCL_MIN_VERSION = 21400


@pytest.fixture(scope="module")
def no_driver(native):
    if native.build_info()["driver"] != 0:
        pytest.skip("a CUDA driver is present; these cases check the no-driver errors")


def test_build_info_matches_the_build(native):
    info = native.build_info()
    assert info["cuda_compiled"] >= 12000 and info["cuda_runtime"] > 0
    assert info["nccl_compiled"] > 20000
    # The loaded NCCL may be older than the header (torch's copy, loaded first): what matters is that it has
    # every entry point _C resolves and the same major version.
    assert info["nccl_loaded"] >= NCCL_MIN_VERSION, info
    assert info["nccl_loaded"] // 10000 == info["nccl_compiled"] // 10000, info
    assert Path(info["nccl_library"]).name == "libnccl.so.2"
    assert info["nccl_found_by"] in ("already loaded", "NCCL_HOME", "loader path", "nvidia-nccl wheel")
    record = _ext._build_record()
    expected = sorted(int(arch) * 10 for arch in record["cuda_archs"].split(";"))
    assert sorted(int(arch) for arch in info["archs"].split(",")) == expected
    if "ISO_KERNELS_CUDA_ARCHS" not in os.environ:  # the default build: A100/A800, RTX 4090, H100/H200
        assert expected == [800, 890, 900]
    if info["driver"] == 0:
        assert info["device_count"] == 0
    assert info["device_count"] == native.device_count()


def test_package_build_info_merges_native_report(native):
    import iso_kernels

    info = iso_kernels.build_info()
    assert info["ext"] == "built" and info["reason"] is None
    assert info["build"]["ext"] == "built"
    assert info["nccl_loaded"] == native.build_info()["nccl_loaded"]


def test_nccl_unique_ids_are_fresh_bytes(native):
    first, second = native.nccl_unique_id(), native.nccl_unique_id()
    assert isinstance(first, bytes) and len(first) == native.NCCL_UNIQUE_ID_BYTES == 128
    assert first != second


@pytest.mark.parametrize("id_len, world_size, rank, device, stream, timeout_ns, word", BAD_COMM_ARGS)
def test_overlap_comm_rejects_bad_arguments(native, id_len, world_size, rank, device, stream, timeout_ns, word):
    unique_id = native.nccl_unique_id()[:id_len].ljust(id_len, b"\0")
    with pytest.raises(ValueError, match=word):
        native.OverlapComm(unique_id, world_size, rank, device, stream, timeout_ns)


def test_stream_sleep_rejects_negative_time(native):
    with pytest.raises(ValueError, match="nanoseconds"):
        native.stream_sleep(0, -1)


def test_overlap_comm_without_driver_raises_runtime_error(native, no_driver):
    with pytest.raises(RuntimeError, match="driver"):
        native.OverlapComm(native.nccl_unique_id(), 1, 0, 0, 1, 10**9)


def test_stream_sleep_without_driver_raises_runtime_error(native, no_driver):
    with pytest.raises(RuntimeError, match="stream_sleep_kernel.*driver"):
        native.stream_sleep(0, 1000)


def test_stream_priority_range_without_driver_raises_runtime_error(native, no_driver):
    with pytest.raises(RuntimeError, match="driver"):
        native.stream_priority_range(0)


def test_module_keeps_its_symbols(native):
    """Not stripped (pybind11 strips Release modules unless NO_EXTRAS): compute-sanitizer, Nsight and gdb
    can name _C's functions."""
    data = Path(native.__file__).read_bytes()
    assert b".symtab" in data and b"poll_for_test" in data


@pytest.mark.slow
def test_nccl_already_in_the_process_is_used_before_nccl_home(native, tmp_path):
    """A libnccl.so.2 mapped before _C (torch's, here the wheel's loaded by ctypes) is the one _C uses, even
    with NCCL_HOME naming another: its copy is never tried (a broken file would make dlopen fail loudly)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libnccl.so.2").write_text("not a shared object")
    wheel = native.build_info()["nccl_library"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    env["NCCL_HOME"] = str(tmp_path)
    script = (f"import ctypes; ctypes.CDLL({wheel!r}, mode=ctypes.RTLD_GLOBAL)\n"
              "import iso_kernels._C as c; info = c.build_info()\n"
              "print(info['nccl_found_by'], info['nccl_library'], sep='|')")
    done = _run_python(script, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"already loaded|{wheel}"


def _run_python(script, env, *args):
    return subprocess.run([sys.executable, *args, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.slow
def test_raw_import_finds_nccl_without_loader_path(native):
    """`import iso_kernels._C` alone (no _ext preload, no LD_LIBRARY_PATH) imports and reaches NCCL."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "NCCL_HOME")}
    script = ("import iso_kernels._C as c; "
              "assert 'libnccl' not in open('/proc/self/maps').read(), 'NCCL mapped at import'; "
              "print(len(c.nccl_unique_id()), c.build_info()['nccl_loaded'])")
    done = _run_python(script, env)
    assert done.returncode == 0, done.stderr
    length, loaded = done.stdout.split()
    assert int(length) == 128 and int(loaded) == native.build_info()["nccl_loaded"]


@pytest.mark.slow
def test_missing_nccl_is_a_runtime_error_not_an_import_error(native):
    """Without site-packages (python -S) no NCCL is reachable: _C still imports and explains itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "NCCL_HOME")}
    script = ("import iso_kernels._C as c\n"
              "if c.build_info()['nccl_loaded']:\n    print('system NCCL:', c.build_info()['nccl_library'])\n"
              "try:\n    c.nccl_unique_id()\nexcept RuntimeError as e:\n    print(e)\n")
    done = _run_python(script, env, "-S")
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot import the package without site-packages here: {done.stderr.splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("system NCCL:"):
        pytest.skip(f"libnccl.so.2 is on the system loader path ({done.stdout.split()[-1]})")
    assert "cannot load NCCL's libnccl.so.2" in done.stdout and "NCCL_HOME" in done.stdout


def test_preload_uses_the_nccl_already_loaded_first(monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_HOME", str(tmp_path))
    opened = []

    def loaded_already(name, mode):
        opened.append((name, mode))  # succeeds: the soname is in the process

    assert _ext._preload_nccl(loaded_already, exists=lambda path: True) == _ext.ALREADY_LOADED
    assert opened == [(_ext.NCCL_SONAME, os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)]


def test_preload_falls_back_to_nccl_home_then_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_HOME", str(tmp_path))
    home = str(tmp_path / "lib" / _ext.NCCL_SONAME)
    opened = []

    def nothing_loaded_yet(name, mode):
        opened.append(name)
        if mode & os.RTLD_NOLOAD:
            raise OSError(f"{name}: not loaded")

    assert _ext._preload_nccl(nothing_loaded_yet, exists=lambda path: True) == home
    assert opened == [_ext.NCCL_SONAME, home]
    opened.clear()
    wheel = _ext._preload_nccl(nothing_loaded_yet, exists=lambda path: str(path) != home)
    assert opened == [_ext.NCCL_SONAME, wheel] and "nvidia" in wheel


# --- the watchdog's polling loop (csrc/watchdog.h), driven by a Python step ---
def _counting_step(answers):
    """A step that gives `answers` in turn, then keeps the last; counts its calls."""
    calls = []

    def step():
        calls.append(time.perf_counter())
        return answers[min(len(calls), len(answers)) - 1]

    return step, calls


@pytest.mark.slow
def test_poll_returns_when_the_step_finishes(native):
    step, calls = _counting_step([False, False, False, True])
    assert native._poll_for_test(step, 60.0) == "done"
    assert len(calls) == 4


@pytest.mark.slow
def test_poll_reports_the_steps_failure_at_once(native):
    step, calls = _counting_step([False, "NCCL asynchronous error: remote process exited"])
    assert native._poll_for_test(step, 60.0) == "failed: NCCL asynchronous error: remote process exited"
    assert len(calls) == 2


@pytest.mark.slow
def test_poll_gives_up_at_the_deadline_having_polled_throughout(native):
    timeout_s = 0.3
    step, calls = _counting_step([False])
    start = time.perf_counter()
    assert native._poll_for_test(step, timeout_s) == "timed out"
    assert time.perf_counter() - start >= timeout_s
    assert calls[-1] - start >= timeout_s, "the last poll must come at or after the deadline"
    assert len(calls) >= 3, "the loop must keep polling until the deadline, not sleep through it"
    with pytest.raises(ValueError, match="timeout_s"):
        native._poll_for_test(step, 0.0)


# --- the build decision (setup.py), without building ---
def _load_setup():
    spec = importlib.util.spec_from_file_location("iso_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


@pytest.fixture
def toolchain(tmp_path):
    cuda, nccl = tmp_path / "cuda", tmp_path / "nccl"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (nccl / "include").mkdir(parents=True)
    (nccl / "include" / "nccl.h").write_text("")
    return cuda, nccl, tmp_path / "missing"


@pytest.mark.parametrize("mode", [None, "auto", "1", " AUTO "])
def test_builds_when_toolkit_and_nccl_exist(toolchain, mode):
    cuda, nccl, _ = toolchain
    build, reason = _load_setup().build_decision(mode, cuda, nccl)
    assert build and str(cuda) in reason and str(nccl) in reason


def test_mode_0_skips_even_with_a_toolkit(toolchain):
    cuda, nccl, _ = toolchain
    assert _load_setup().build_decision("0", cuda, nccl) == (False, "ISO_KERNELS_BUILD_EXT=0")


def test_auto_skips_with_a_reason_when_something_is_missing(toolchain):
    cuda, nccl, missing = toolchain
    decide = _load_setup().build_decision
    build, reason = decide("auto", missing, nccl)
    assert not build and "nvcc" in reason and "CUDA_HOME" in reason
    build, reason = decide("auto", cuda, None)
    assert not build and "NCCL_HOME" in reason
    build, reason = decide("auto", cuda, missing)
    assert not build and "nccl.h" in reason


def test_mode_1_makes_a_missing_toolkit_an_error(toolchain):
    cuda, nccl, missing = toolchain
    decide = _load_setup().build_decision
    with pytest.raises(RuntimeError, match="nvcc"):
        decide("1", missing, nccl)
    with pytest.raises(RuntimeError, match="nccl"):
        decide("1", cuda, None)


def test_unknown_mode_is_refused(toolchain):
    cuda, nccl, _ = toolchain
    with pytest.raises(ValueError, match="ISO_KERNELS_BUILD_EXT"):
        _load_setup().build_decision("yes", cuda, nccl)
