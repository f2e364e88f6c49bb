"""Run from outside the checkout in an environment where iso-kernels was installed from a wheel or an sdist:
``python check_installed.py SOURCE``. Imports every module of the installed ``iso_kernels`` and ``triton_ops``
(found by walking the installed packages) and fails when the checkout has a module the installation lacks, when a
module is imported from the checkout, when ``py.typed`` is missing, or when the native extension is absent on a
machine with the CUDA compiler."""

import importlib
import importlib.machinery
import importlib.util
import pkgutil
import shutil
import sys
from pathlib import Path

PACKAGES = ("iso_kernels", "triton_ops")
NATIVE = "iso_kernels._C"


def source_modules(source):
    """Dotted names of the checkout's Python modules under PACKAGES."""
    names = set()
    for package in PACKAGES:
        for path in (source / package).rglob("*.py"):
            parts = list(path.relative_to(source).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.add(".".join(parts))
    return names


def installed_modules():
    """Dotted name -> module of everything the installed packages hold, each imported (a ``__main__`` is only
    found: importing it would run the command line)."""
    modules = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        modules[package] = root
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.", onerror=_raise):
            is_script = info.name.endswith(".__main__")
            name = info.name
            modules[name] = importlib.util.find_spec(name) if is_script else importlib.import_module(name)
    return modules


def _raise(name):
    raise ImportError(f"could not import {name} while walking the installed packages")


def has_cuda_compiler():
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()


def main():
    source = Path(sys.argv[1]).resolve()
    installed = installed_modules()
    problems = [f"missing from the installation: {name}" for name in sorted(source_modules(source) - set(installed))]
    for name, module in installed.items():
        where = Path(module.origin if isinstance(module, importlib.machinery.ModuleSpec) else module.__file__).resolve()
        if where.is_relative_to(source):
            problems.append(f"{name} was imported from the checkout ({where})")
    package_dir = Path(installed["iso_kernels"].__file__).parent
    if not (package_dir / "py.typed").is_file():
        problems.append(f"no py.typed in {package_dir}")
    import iso_kernels

    info = iso_kernels.build_info()
    if has_cuda_compiler() and (info["ext"] != "built" or NATIVE not in installed):
        problems.append(f"the CUDA compiler is here but the native extension is {info['ext']}: {info['reason']}")
    for problem in problems:
        print(problem)
    print(f"{len(installed)} modules imported from {package_dir}; native extension: {info['ext']}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
