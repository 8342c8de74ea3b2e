"""Every tools/*.py is thin (house rule): argparse, one library call, print.

Checked on the source with ``ast``: ``main`` is at most 45 lines, no tool imports an underscore
name from the library (``detector`` or ``proposals``), and ``sys.exit`` / ``exit`` / ``raise
SystemExit`` appear only in the ``if __name__ == "__main__":`` guard (user errors go through
``detector.cli.run_tool`` and end with one ``error:`` line and exit code 2).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))
MAX_MAIN_LINES = 45
LIBRARY = ("detector", "proposals")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _exits(node: ast.AST) -> list[int]:
    """Line numbers of sys.exit(...), exit(...), quit(...) and raise SystemExit under ``node``."""
    lines = []
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if (isinstance(f, ast.Attribute) and f.attr == "exit" and isinstance(f.value, ast.Name)
                    and f.value.id == "sys") or (isinstance(f, ast.Name) and f.id in ("exit", "quit")):
                lines.append(n.lineno)
        elif isinstance(n, ast.Raise) and n.exc is not None:
            exc = n.exc.func if isinstance(n.exc, ast.Call) else n.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                lines.append(n.lineno)
    return lines


def test_there_are_tools():
    assert len(TOOLS) >= 10


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_main_is_short(path: Path):
    mains = [n for n in _tree(path).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(mains) == 1, f"{path.name}: no top-level main()"
    n = mains[0].end_lineno - mains[0].lineno + 1
    assert n <= MAX_MAIN_LINES, f"{path.name}: main() is {n} lines (at most {MAX_MAIN_LINES}); move the flow into the library"


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_no_private_library_names(path: Path):
    bad = []
    for n in ast.walk(_tree(path)):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in LIBRARY:
            parts = n.module.split(".")
            bad += [f"line {n.lineno}: from {n.module} import {a.name}" for a in n.names
                    if a.name.startswith("_") or any(p.startswith("_") for p in parts)]
        elif isinstance(n, ast.Import):
            bad += [f"line {n.lineno}: import {a.name}" for a in n.names
                    if a.name.split(".")[0] in LIBRARY and any(p.startswith("_") for p in a.name.split("."))]
        elif (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
              and isinstance(n.value, ast.Name) and n.value.id in LIBRARY):
            bad.append(f"line {n.lineno}: {n.value.id}.{n.attr}")
    assert not bad, f"{path.name} uses private library names: {bad}"


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_sys_exit_only_in_the_main_guard(path: Path):
    tree = _tree(path)
    outside = [ln for node in tree.body if not _is_main_guard(node) for ln in _exits(node)]
    assert not outside, f"{path.name}: sys.exit / SystemExit outside the __main__ guard at lines {outside}"
