"""The shape of the house: modules readable in one sitting, imports flowing one way.

Checked on the source text (ast), so a change that breaks a rule fails here with the
file and the name, not in review."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
MODULES = sorted(PACKAGE.rglob("*.py"))
BENCHMARKS = sorted((PACKAGE.parent / "benchmarks").glob("*.py"))  # read the same way: short too
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
NO_TORCH = ("store", "report", "plots", "checks", "plan", "paths", "datasets", "layouts", "images", "sources", "layer_codes",
            "errors")


def name(path):
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imported(path):
    """Top-level names of every module `path` imports (absolute ones, and relative ones as pipeline.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("pipeline" if node.level else node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", MODULES + BENCHMARKS, ids=name)
def test_modules_and_functions_are_short(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES, f"{name(path)}.{node.name}"


def test_only_the_store_imports_h5py():
    assert [name(p) for p in MODULES if "h5py" in imported(p)] == [
        name(p) for p in MODULES if name(p).startswith("pipeline.store") and "h5py" in imported(p)] != []


@pytest.mark.parametrize("module", NO_TORCH)
def test_modules_without_torch(module):
    """Reading caches, listing data and making reports stays fast: importing these loads no torch."""
    code = f"import sys, pipeline.{module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent).returncode == 0, module


def test_nothing_but_main_imports_the_cli():
    users = [name(p) for p in MODULES for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[-1] == "cli"]
    assert users == ["pipeline.__main__"]
