"""bench/gpu_check.sh's plan, read from its --dry-run: the limits fit issue 8's budget, and the GPU test files
it names exist, hold every GPU test and do not import transformers when pytest collects them."""

import ast
import re
import subprocess
import tarfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Issue 8: the whole check, build included, in 9 minutes on an H200 with an empty Triton cache.
BUDGET_S = 540
STEP = re.compile(r"^(\w+) +(\d+) +(.+)$")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=30, check=True)
    steps = [(m[1], int(m[2]), m[3]) for m in map(STEP.match, done.stdout.splitlines()) if m]
    return done.stdout, steps, out


@pytest.mark.parametrize("on_path, chosen", [(("python", "python3"), "python"), (("python3",), "python3")])
def test_python3_is_used_when_python_is_absent(tmp_path, monkeypatch, on_path, chosen):
    for name in on_path:
        (tmp_path / name).symlink_to(sys.executable)
    monkeypatch.delenv("PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # the dry run needs nothing else: bash runs it from builtins
    done = subprocess.run(["/bin/bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=30, check=True)
    assert f"PYTHON={tmp_path / chosen}:" in done.stdout


def gpu_test_files(steps):
    (command,) = [command for name, _, command in steps if name == "pytest_gpu"]
    return sorted(word for word in command.split() if word.startswith("tests/"))


def test_limits_sum_to_at_most_the_budget_and_the_printed_total(dry_run):
    printed, steps, out = dry_run
    names = [name for name, _, _ in steps]
    assert {"install", "compile_report", "pytest_gpu", "bench_iso_prefill", "summary"} <= set(names)
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
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "transformers imported: False" in done.stdout


def test_summary_packs_the_plots_and_reports_steps_and_iso_points(tmp_path, monkeypatch):
    from bench import bench_iso_prefill, common, gpu_check_report
    from test_bench_iso_prefill import fake_measured

    reports = {"iso-auto": fake_measured([66.0], [100.0], chunks=3), "iso-2even": fake_measured([80.0], [100.0])}
    iso_rows = bench_iso_prefill.rows_for_point(4096, "pcie4", reports, {})
    common.append_rows(tmp_path / "iso_prefill.csv", iso_rows)
    common.append_rows(tmp_path / "chunked_attention.csv", [
        dict(provider=provider, mode="chunk2", metric="tflops", x_value=4096, p50=tflops)
        for provider, tflops in (("triton", 300.0), ("sdpa", 400.0))])
    common.append_rows(tmp_path / "gemm_signal.csv", [
        dict(provider=provider, mode="o_proj tp8", metric="TFLOP/s", x_value=4096, p50=tflops)
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
    assert lines[4].split() == "attention chunk2  S=4096 triton 300.0 TFLOP/s vs sdpa 0.75x".split()
    assert lines[5].split() == ("gemm o_proj tp8 M=4096 gemm_signal 400.0 TFLOP/s vs cuBLAS: gemm 0.90x, "
                                "gemm_signal 0.80x").split()
    assert lines[6].startswith("iso pcie4      S=4096  serial 100.00 ms; no-comm 50.00 ms; iso-auto 66.00 ms "
                               "(3 chunks) R 34.0%")


def test_a_step_is_killed_at_its_limit_and_the_next_step_still_runs(tmp_path, monkeypatch):
    plan = ("ignores_term 7 trap '' TERM; sleep 60; echo not; echo reached\n"
            "fails 7 exit 3\n"
            "after 7 echo ran in \"$OUT\"")
    monkeypatch.setenv("GPU_CHECK_PLAN", plan)
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out dir")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "=== ignores_term: TIMEOUT after 7s" in done.stdout and "\nnot\n" not in done.stdout
    assert "=== fails: FAILED (exit 3)" in done.stdout
    assert f"ran in {tmp_path / 'out dir'}" in done.stdout
    assert (tmp_path / "out dir" / "gpu_check.log").read_text().count("\n===") == 6


def test_a_limit_within_the_kill_grace_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_PLAN", "instant 5 true")  # timeout 0 would mean no limit at all
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 64 and "kill grace" in done.stderr
