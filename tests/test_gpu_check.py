"""bench/gpu_check.sh's plan, read from its --dry-run: the limits fit the budget, the files and tests it names
exist, and the GPU test files it names hold every GPU test and do not import transformers when pytest collects
them; and its runner, on stand-in plans (GPU_CHECK_PLAN): a step stopped by SIGINT then SIGKILL at its limit,
--step running one step, the interpreter, toolkit and Triton cache it picks."""

import ast
import itertools
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here runs the script or a Python child

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# Issue 19: the whole check, build included, in 8 minutes on an H100/H200 with an empty Triton cache, so that a
# 600 s device call keeps 2 minutes to spare; a rerun of one step in 3.
BUDGET_S = 480
STEP_MAX_S = 180
STEP = re.compile(r"^(\w+) +(\d+) +(.+)$")
PYTEST_STEPS = ("pytest_kernels", "pytest_comm", "nccl_init")
NCCL_INIT_TEST = "tests/test_comm_nccl.py::test_init_without_its_peers_gives_up_at_the_timeout"


# Execs argv[1:] with SIGINT at its default (what preexec_fn would do, without its hazards in a threaded parent).
RESET_SIGINT_AND_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                         "os.execvp(sys.argv[1], sys.argv[1:])")


def run_check(*args, env=None, timeout=60):
    """bash gpu_check.sh ARGS, bounded: its own session and SIGINT at its default (a background job inherits
    it ignored), the whole session killed if it outlives ``timeout``."""
    with subprocess.Popen([sys.executable, "-c", RESET_SIGINT_AND_EXEC, "bash", str(SCRIPT), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"gpu_check.sh ran past {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def plan_env(plan, **extra):
    """The environment for a stand-in plan: this interpreter as PYTHON (no probing for torch)."""
    return {**os.environ, "GPU_CHECK_PLAN": plan, "PYTHON": sys.executable, **extra}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          timeout=60, check=True)
    steps = [(m[1], int(m[2]), m[3]) for m in map(STEP.match, done.stdout.splitlines()) if m]
    return done.stdout, steps, out


NO_TORCH = "#!/bin/sh\nexit 1\n"  # an interpreter that cannot import torch (nor anything else)


@pytest.mark.parametrize("on_path, chosen", [
    ({"python": None, "python3": None}, "python3"),
    ({"python3": None}, "python3"),
    ({"python": None}, "python"),
    ({"python3": NO_TORCH, "python": None}, "python"),  # python3 first, but only if it imports torch
    ({"python3": NO_TORCH}, "python3"),  # none imports torch: python3 (the steps then fail and say why)
])
def test_the_interpreter_is_python3_else_the_first_that_imports_torch(tmp_path, monkeypatch, on_path, chosen):
    for name, script in on_path.items():
        if script is None:
            (tmp_path / name).symlink_to(sys.executable)
        else:
            (tmp_path / name).write_text(script)
            (tmp_path / name).chmod(0o755)
    monkeypatch.delenv("PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # the dry run needs nothing else: bash runs it from builtins
    done = subprocess.run(["/bin/bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, check=True)
    assert f"PYTHON={tmp_path / chosen}:" in done.stdout


@pytest.mark.parametrize("header", [True, False])
def test_cuda_home_is_the_toolkit_of_the_real_nvcc(tmp_path, monkeypatch, header):
    """nvcc on PATH is a symlink into a toolkit: CUDA_HOME is that toolkit when it has the runtime's header
    (else /usr/local/cuda, as for a wrapper script elsewhere)."""
    toolkit, bin_dir = tmp_path / "cuda-12.8", tmp_path / "bin"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    bin_dir.mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    if header:
        (toolkit / "include" / "cuda_runtime.h").write_text("")
    (bin_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHON", sys.executable)
    done = run_check("--dry-run", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    expected = toolkit if header else "/usr/local/cuda"
    assert f"CUDA_HOME={expected} (from " in done.stdout


def gpu_test_files(steps):
    """The test files the pytest steps name, each once."""
    commands = [command for name, _, command in steps if name in PYTEST_STEPS]
    return sorted({word.split("::")[0] for command in commands for word in command.split()
                   if word.startswith("tests/") and "::" not in word})


def test_limits_sum_to_at_most_the_budget_and_the_printed_total(dry_run):
    printed, steps, out = dry_run
    names = [name for name, _, _ in steps]
    assert {"install", "build_info", "compile_report", *PYTEST_STEPS, "bench_iso_prefill", "summary"} <= set(names)
    assert names[0] == "install" and names[-1] == "summary"
    assert len(names) == len(set(names))
    total = sum(limit for _, limit, _ in steps)
    assert total <= BUDGET_S
    assert f"total: {total} s of a {BUDGET_S} s budget" in printed
    assert not out.exists()  # a dry run prints and writes nothing


def _uses_gpu_marker(tree):
    """Whether a test module applies ``pytest.mark.gpu`` anywhere."""
    return any(isinstance(node, ast.Attribute) and node.attr == "gpu" and isinstance(node.value, ast.Attribute)
               and node.value.attr == "mark" for node in ast.walk(tree))


class _ImportsAtImportTime(ast.NodeVisitor):
    """Top-level package names that importing a module imports: import statements and pytest.importorskip
    calls outside function bodies (which run only when a test does)."""

    def __init__(self):
        self.names = set()

    def visit_FunctionDef(self, node):
        pass

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node):
        self.names |= {alias.name.split(".")[0] for alias in node.names}

    def visit_ImportFrom(self, node):
        self.names.add((node.module or "").split(".")[0])

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip" and node.args \
                and isinstance(node.args[0], ast.Constant):
            self.names.add(node.args[0].value.split(".")[0])
        self.generic_visit(node)


def imports_at_import_time(path):
    visitor = _ImportsAtImportTime()
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.names


def test_the_module_import_parser_sees_module_level_imports_only():
    source = ("import os.path\nfrom torch import nn\nhf = pytest.importorskip('transformers')\n"
              "class C:\n    import json\n    def m(self):\n        import numpy\n"
              "def f():\n    import safetensors\n")
    visitor = _ImportsAtImportTime()
    visitor.visit(ast.parse(source))
    assert visitor.names == {"os", "torch", "transformers", "json"}


def test_gpu_test_files_exist_and_are_every_file_with_gpu_tests(dry_run):
    _, steps, _ = dry_run
    listed = gpu_test_files(steps)
    assert listed and all((ROOT / name).is_file() for name in listed)
    with_gpu_tests = sorted(f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
                            if _uses_gpu_marker(ast.parse(path.read_text())))
    assert listed == with_gpu_tests


def test_gpu_test_files_do_not_import_transformers_at_module_level(dry_run):
    _, steps, _ = dry_run
    for name in [*gpu_test_files(steps), "tests/conftest.py", "tests/helpers.py"]:
        assert "transformers" not in imports_at_import_time(ROOT / name), name


def test_collecting_the_gpu_test_files_leaves_transformers_unimported(dry_run):
    """Through everything those files import, as pytest on the GPU machine would collect them."""
    _, steps, _ = dry_run
    arguments = ["--collect-only", "-q", "-p", "no:cacheprovider", *gpu_test_files(steps)]
    probe = (f"import sys, pytest\nstatus = pytest.main({arguments!r})\n"
             "print('transformers imported:', 'transformers' in sys.modules)\nsys.exit(int(status))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "transformers imported: False" in done.stdout


def test_summary_packs_the_plots_and_reports_steps_and_iso_points(tmp_path, monkeypatch):
    from test_bench_iso_prefill import fake_measured

    from bench import bench_iso_prefill, common, gpu_check_report

    reports = {"iso-auto": fake_measured([66.0], [100.0], chunks=3), "iso-2even": fake_measured([80.0], [100.0])}
    iso_rows = bench_iso_prefill.rows_for_point(4096, "pcie4", reports, {})
    common.append_rows(tmp_path / "iso_prefill.csv", iso_rows)
    common.append_rows(tmp_path / "chunked_attention.csv", [
        {"provider": provider, "mode": "chunk2", "metric": "tflops", "x_value": 4096, "p50": tflops}
        for provider, tflops in (("triton", 300.0), ("sdpa", 400.0))])
    common.append_rows(tmp_path / "gemm_signal.csv", [
        {"provider": provider, "mode": "o_proj tp8", "metric": "TFLOP/s", "x_value": 4096, "p50": tflops}
        for provider, tflops in (("torch.matmul", 500.0), ("gemm", 450.0), ("gemm_signal", 400.0))])
    for name in ("iso_prefill.png", "gemm_signal.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    monkeypatch.setenv("GPU_CHECK_STEPS", "install\tok\t31\t75\npytest_gpu\tTIMEOUT after 140s\t140\t140\n")
    gpu_check_report.pack_plots(tmp_path)
    gpu_check_report.summary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chunked_attention.csv", "gemm_signal.csv", "iso_prefill.csv", "plots.tar", "summary.txt"]
    with tarfile.open(tmp_path / "plots.tar") as tar:
        assert sorted(tar.getnames()) == ["gemm_signal.png", "iso_prefill.png"]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines[1] == "gpu: none (no CUDA device)"  # what gpu_check.sh's exit status 2 looks for
    assert lines[3].split() == ["pytest_gpu", "TIMEOUT", "after", "140s", "140", "s", "of", "140", "s"]
    assert lines[4].split() == ["attention", "chunk2", "S=4096", "triton", "300.0", "TFLOP/s", "vs", "sdpa",
                                "0.75x"]
    assert lines[5].split() == ["gemm", "o_proj", "tp8", "M=4096", "gemm_signal", "400.0", "TFLOP/s", "vs",
                                "cuBLAS:", "gemm", "0.90x,", "gemm_signal", "0.80x"]
    assert lines[6].startswith("iso pcie4      S=4096  serial 100.00 ms; no-comm 50.00 ms; iso-auto 66.00 ms "
                               "(3 chunks) R 34.0%")
    assert lines[6].endswith("; emulated link: no SM or memory contention; an upper bound")
    assert lines[7] == "clocks at the end (nvidia-smi):" and len(lines) > 8


def test_summary_reports_an_iso_point_cut_short(tmp_path, monkeypatch):
    """bench_iso_prefill writes a variant's rows as soon as it is measured: a step stopped during the second
    variant leaves the first one's rows, without the pooled serial and no-comm rows."""
    from test_bench_iso_prefill import fake_measured

    from bench import bench_iso_prefill, common, gpu_check_report

    first = bench_iso_prefill.variant_rows(4096, "pcie4", "iso-auto", fake_measured([66.0], [100.0], chunks=3), {})
    common.append_rows(tmp_path / "iso_prefill.csv", first)
    monkeypatch.delenv("GPU_CHECK_STEPS", raising=False)
    gpu_check_report.summary(tmp_path)
    (line,) = [line for line in (tmp_path / "summary.txt").read_text().splitlines() if line.startswith("iso ")]
    assert line.startswith("iso pcie4      S=4096  iso-auto 66.00 ms (3 chunks) R 34.0% eff 0.85; "
                           "iso-2even not measured; emulated link")


def test_a_step_is_killed_at_its_limit_and_the_next_step_still_runs(tmp_path):
    plan = ("ignores_int 7 trap '' INT; sleep 60; echo not; echo reached\n"
            "fails 7 exit 3\n"
            "after 7 echo ran in \"$OUT\"")
    done = run_check(tmp_path / "out dir", env=plan_env(plan))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "=== ignores_int: TIMEOUT after 7s (SIGKILL" in done.stdout and "\nnot\n" not in done.stdout
    assert "=== fails: FAILED (exit 3)" in done.stdout
    assert f"ran in {tmp_path / 'out dir'}" in done.stdout
    assert (tmp_path / "out dir" / "gpu_check.log").read_text().count("\n===") == 6


def test_sigint_comes_first_so_python_can_report_before_it_is_stopped(tmp_path):
    """A step at its limit gets SIGINT, not SIGKILL: a Python child's KeyboardInterrupt handler runs (as pytest's,
    which prints the failure summary and durations), and the step is reported as stopped by SIGINT."""
    child = tmp_path / "child.py"
    child.write_text("import time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\n"
                     "except KeyboardInterrupt:\n    print('KeyboardInterrupt handled: summary printed', flush=True)\n")
    done = run_check(tmp_path / "out", env=plan_env(f"sleeper 7 $PYTHON {child}\nnext 7 echo next ran"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "started\nKeyboardInterrupt handled: summary printed\n" in done.stdout
    assert "=== sleeper: TIMEOUT after 7s (stopped by SIGINT at 2s)" in done.stdout
    assert "next ran" in done.stdout


def test_step_reruns_exactly_one_step_and_appends_to_the_log(tmp_path):
    plan = "first 7 echo first ran\nsecond 500 echo second ran in $TEST_TIMEOUT_S\nthird 7 echo third ran"
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.log").write_text("the full run's log\n")
    done = run_check("--step", "second", out, env=plan_env(plan))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "second ran in 170" in done.stdout  # the limit is min(500, 180): TEST_TIMEOUT_S = 180 - 10
    assert "first ran" not in done.stdout and "third ran" not in done.stdout
    assert f"=== second (limit {STEP_MAX_S}s" in done.stdout
    log = (out / "gpu_check.log").read_text()
    assert log.startswith("the full run's log\n") and log.count("\n===") == 2
    missing = run_check("--step", "fourth", out, env=plan_env(plan))
    assert missing.returncode == 64 and "first second third" in missing.stderr


def test_the_dry_run_prints_the_rerun_command(dry_run):
    printed, steps, out = dry_run
    assert f"bash bench/gpu_check.sh --step NAME {out}" in printed
    assert "NAME one of: " + " ".join(name for name, _, _ in steps) in printed
    assert f"rerun one step (at most {STEP_MAX_S} s" in printed


def test_every_step_runs_with_the_shared_triton_cache_and_autotuning_printed(tmp_path):
    plan = "env 7 echo cache=$TRITON_CACHE_DIR compile=$ISO_KERNELS_COMPILE_CACHE autotune=$TRITON_PRINT_AUTOTUNING"
    env = plan_env(plan, HOME=str(tmp_path))
    env.pop("TRITON_CACHE_DIR", None)
    env.pop("ISO_KERNELS_COMPILE_CACHE", None)
    done = run_check(tmp_path / "out", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    cache = tmp_path / ".triton" / "cache"
    assert f"cache={cache} compile={cache} autotune=1" in done.stdout
    assert not str(cache).startswith(str(tmp_path / "out"))  # outside OUTDIR, which comes back 8 files at most


def _test_names(path):
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_file_and_test_the_plan_names_exists(dry_run):
    _, steps, _ = dry_run
    for name, _, command in steps:
        words = command.replace('"', " ").split()
        for word in words:
            path, _, test = word.partition("::")
            if re.fullmatch(r"(tests|bench)/[\w/]+\.py", path):
                assert (ROOT / path).is_file(), (name, path)
                if test:
                    assert test.split("[")[0] in _test_names(ROOT / path), (name, word)
        files = [ROOT / word for word in words if re.fullmatch(r"tests/\w+\.py", word)]
        for option, value in itertools.pairwise(words):
            if option == "-k":
                identifiers = set(re.findall(r"\w+", value)) - {"not", "and", "or"}
                known = set().union(*map(_test_names, files))
                assert all(any(i in test for test in known) for i in identifiers), (name, value)
            # `python -m iso_kernels`, `python -m tools.compile_report`: a module of the checkout (the script runs
            # from its root) must be there; -m pip, pytest and pytest's `-m gpu` name no folder of the checkout.
            if option == "-m" and (ROOT / value.split(".")[0]).is_dir():
                module = ROOT / value.replace(".", "/")
                assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), (name, value)


def test_pytest_steps_explain_failures_and_isolate_the_nccl_init_test(dry_run):
    _, steps, _ = dry_run
    commands = {name: command for name, _, command in steps}
    for name in PYTEST_STEPS:
        words = commands[name].split()
        for option in ("-v", "-rfEs", "--durations=15", "--timeout", "-o", "faulthandler_timeout=$FAULTHANDLER_S"):
            assert option in words, (name, option)
        assert words[words.index("-p") + 1] == "no:cacheprovider"
    assert commands["pytest_comm"].split()[-2:] == ["tests/test_comm_nccl.py", "tests/test_gpu_paths.py"]
    assert f"--deselect {NCCL_INIT_TEST}" in commands["pytest_comm"]
    assert commands["nccl_init"].split()[-1] == NCCL_INIT_TEST
    assert "timeout_method=thread" in commands["nccl_init"]  # a pytest-timeout that works without the GIL
    assert "tests/test_comm_nccl.py" not in commands["pytest_kernels"]


def test_a_limit_within_the_kill_grace_is_refused(tmp_path):
    done = run_check("--dry-run", tmp_path, env=plan_env("instant 5 true"))  # timeout 0 would mean no limit
    assert done.returncode == 64 and "kill grace" in done.stderr
