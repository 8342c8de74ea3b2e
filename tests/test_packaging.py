"""pyproject.toml installs what the project is: every package under detector/ and proposals/, the
configs as package data, the ``sppnet`` console command, a LICENSE, bounded dependency ranges.

Building a wheel or installing into a fresh venv is too slow for the suite (torch alone is GBs); this
reads the file and asks setuptools' own package discovery what the build would include.
"""
from __future__ import annotations

import fnmatch
import importlib
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
setuptools = pytest.importorskip("setuptools")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ST = PYPROJECT["tool"]["setuptools"]


def _discovered() -> set[str]:
    """The packages the build takes: setuptools' discovery with pyproject's ``find`` options."""
    find = ST["packages"]["find"]
    finder = setuptools.find_namespace_packages if find.get("namespaces", True) else setuptools.find_packages
    return set(finder(where=str(REPO / find.get("where", ["."])[0]), include=find["include"],
                      exclude=find.get("exclude", ())))


def _source_dirs() -> set[str]:
    """Every folder under detector/ and proposals/ holding Python files or package data."""
    out = set()
    for top in ("detector", "proposals"):
        for d in [REPO / top, *(p for p in (REPO / top).rglob("*") if p.is_dir())]:
            if d.name == "__pycache__":
                continue
            if any(d.glob("*.py")) or any(d.glob("*.yaml")):
                out.add(".".join(d.relative_to(REPO).parts))
    return out


def test_project_metadata():
    p = PYPROJECT["project"]
    assert p["name"] == "sppnet"
    assert p["requires-python"] == ">=3.10"
    assert p["license"] == "MIT" and p["license-files"] == ["LICENSE"]
    assert "MIT License" in (REPO / "LICENSE").read_text() and "the sppnet authors" in (REPO / "LICENSE").read_text()
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert not (REPO / "setup.py").exists(), "one build description: pyproject.toml"


def test_dependencies_are_bounded_ranges():
    p = PYPROJECT["project"]
    deps = p["dependencies"] + p["optional-dependencies"]["test"] + [
        d for d in p["optional-dependencies"]["dev"] if not d.startswith("sppnet[")]
    for d in deps:
        assert re.search(r">=\s*[\d.]+", d) and re.search(r"<\s*[\d.]+", d), f"{d}: needs a lower and an upper bound"
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in p["dependencies"]}
    assert {"torch", "torchvision", "opencv-contrib-python-headless", "pyyaml", "pycocotools"} <= names
    assert "opencv-python" not in names  # it shadows the contrib modules (cv2.ximgproc)


def test_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {re.split(r"[<>=]", d)[0] for d in extras["test"]} == {"pytest", "pytest-xdist", "hypothesis"}
    assert "sppnet[test]" in extras["dev"] and any(d.startswith("ruff") for d in extras["dev"])


def test_every_package_is_found():
    """Each folder of code (and the configs folder) is a package the build includes, so a new
    subpackage cannot be left out of an installed copy."""
    found = _discovered()
    missing = _source_dirs() - found
    assert not missing, f"not in the build: {sorted(missing)}"
    assert {"detector", "detector.commands", "detector.configs", "detector.engine", "detector.data",
            "detector.eval", "detector.bench", "proposals"} <= found
    assert not {p for p in found if not p.startswith(("detector", "proposals"))}


def test_configs_are_package_data():
    data = ST["package-data"]
    shipped = sorted(p.name for p in (REPO / "detector" / "configs").glob("*.yaml"))
    assert len(shipped) >= 4
    patterns = data.get("detector.configs", [])
    assert all(any(fnmatch.fnmatch(n, pat) for pat in patterns) for n in shipped), (patterns, shipped)


def test_console_command():
    target = PYPROJECT["project"]["scripts"]["sppnet"]
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert target == "detector.commands:main"


def test_version_has_one_source():
    import detector

    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert ST["dynamic"]["version"] == {"attr": "detector.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", detector.__version__)


def test_makefile_installs_from_pyproject():
    mk = (REPO / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): pyproject\.toml$", mk, re.MULTILINE)
    assert "pip_install,--resume-retries 20 -e '.[test]')" in mk and "torch==" in mk
    # every pip step is retried and its failure fails the target (not swallowed by a pipe)
    assert "PIPESTATUS[0]" in mk and "exit 1" in mk


def test_readme_stands_alone():
    """A clone has no ../shared: the README names no path outside the repository, tells how to
    install, and shows every sppnet subcommand."""
    from detector.commands import COMMANDS

    text = (REPO / "README.md").read_text()
    assert "../" not in text
    assert "pip install ." in text and 'pip install -e ".[dev]"' in text
    assert "make demo" in text and "make test" in text
    missing = [c.name for c in COMMANDS if f"`sppnet {c.name}" not in text]
    assert not missing, f"README lacks sppnet {missing}"
