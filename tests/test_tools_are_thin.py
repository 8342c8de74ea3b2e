"""Every command is thin (house rule): argparse, one library call, print.

The commands are ``detector/commands/<name>.py`` (``sppnet <name>``). Checked on the source with
``ast``: ``main`` is at most 45 lines, no command imports an underscore name from the library
(``detector`` or ``proposals``), and ``sys.exit`` / ``exit`` / ``raise SystemExit`` appear only in
the ``if __name__ == "__main__":`` guard (user errors go through ``detector.cli.run_tool`` and end
with one ``error:`` line and exit code 2). Every ``tools/*.py`` is a wrapper: it imports ``main``
from its command module and calls it in the guard, nothing else.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted((REPO / "tools").glob("*.py"))
COMMANDS = sorted(p for p in (REPO / "detector" / "commands").glob("*.py") if not p.name.startswith("__"))
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
    assert len(COMMANDS) >= len(TOOLS)


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_tool_is_a_wrapper_of_a_command(path: Path):
    """A docstring, ``import sys``, ``from detector.commands.<m> import main`` and the guard."""
    body = [n for n in _tree(path).body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))]
    imports = [n for n in body if isinstance(n, ast.ImportFrom)]
    assert len(imports) == 1 and imports[0].module.startswith("detector.commands.") \
        and [a.name for a in imports[0].names] == ["main"], f"{path.name}: imports {[ast.unparse(n) for n in imports]}"
    assert (REPO / (imports[0].module.replace(".", "/") + ".py")).is_file(), f"{path.name}: no {imports[0].module}"
    rest = [n for n in body if n not in imports and not (isinstance(n, ast.Import) and
                                                          [a.name for a in n.names] == ["sys"])]
    assert len(rest) == 1 and _is_main_guard(rest[0]), f"{path.name}: more than a wrapper"
    assert ast.unparse(rest[0].body[0]) == "sys.exit(main())", f"{path.name}: the guard must call sys.exit(main())"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_main_is_short(path: Path):
    mains = [n for n in _tree(path).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(mains) == 1, f"{path.name}: no top-level main()"
    n = mains[0].end_lineno - mains[0].lineno + 1
    assert n <= MAX_MAIN_LINES, f"{path.name}: main() is {n} lines (at most {MAX_MAIN_LINES}); move the flow into the library"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
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


@pytest.mark.parametrize("path", TOOLS + COMMANDS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sys_exit_only_in_the_main_guard(path: Path):
    tree = _tree(path)
    outside = [ln for node in tree.body if not _is_main_guard(node) for ln in _exits(node)]
    assert not outside, f"{path.name}: sys.exit / SystemExit outside the __main__ guard at lines {outside}"
