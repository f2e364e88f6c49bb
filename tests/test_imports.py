"""The package's modules import one another one way: the graph of every import inside ``iso_kernels`` (module
level or inside a function) has no cycle; and the planning layer loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "iso_kernels"


def _modules():
    """Dotted name -> path of every Python module of the package (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


NATIVE = f"{PACKAGE}._C"  # the compiled extension (it may not be built): a module that imports nothing


def _imports(name, path, modules):
    """The package's modules that ``name`` imports: ``from .x import y`` counts ``.x.y`` when that is a module,
    else ``.x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                module = f"{base}.{alias.name}"
                found.add(module if module in modules or module == NATIVE else base)
    return {target for target in found if target in modules and target != name}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}  # module -> "open" while on the current path, "done" after

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["iso_kernels.schedule"] >= {"iso_kernels.comm", "iso_kernels.paged_cache"}, "the graph lost its edges"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_planning_and_the_tables_load_no_torch():
    """The planner is numpy only: an engine or a script that plans, and the ``plan`` and ``simulate`` tables,
    never pay for importing torch (iso_kernels.planning's docstring promises it)."""
    code = ("import sys; import iso_kernels.planning, iso_kernels.tables.decision, iso_kernels.tables.paper, "
            "iso_kernels.models; loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')); "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    # the check itself fails where torch is loaded
    failing = subprocess.run([sys.executable, "-c", "import torch; " + code], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert failing.returncode != 0 and "torch" in failing.stderr
