"""The ``sppnet`` command (detector/commands/__init__.py): every subcommand is listed and reachable,
each tool is the same command, a missing subcommand module is refused in one line, ``--device``
overrides the config, and user errors end with one ``error:`` line and exit code 2."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector import commands
from detector.cli import command_line
from detector.commands import COMMANDS, Command, available, main

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted((REPO / "tools").glob("*.py"))


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_help_lists_every_subcommand():
    """``python -m detector.commands --help`` (what ``sppnet --help`` runs) names each subcommand with
    its line, and starts without importing torch."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "detector.commands", "--help"],
                       capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert r.returncode == 0, r.stderr
    listed = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    for c in COMMANDS:
        assert c.name in listed and c.summary in listed[c.name], c.name
    wanted = {"train", "test", "eval", "proposals", "recall", "benchmark", "make-digits", "classifier", "demo",
              "predict", "export", "convert"}
    assert wanted <= {c.name for c in COMMANDS}
    assert "digits_zf5" in r.stdout  # the packaged configs are named
    assert " torch" not in r.stderr.replace("torchvision", ""), "sppnet --help imported torch"


def test_every_tool_is_a_subcommand():
    """Each tools/<tool>.py wraps the module of the subcommand that names it as its tool."""
    by_tool = {c.tool: c for c in COMMANDS if c.tool}
    assert sorted(by_tool) == sorted(p.stem for p in TOOLS)
    for path in TOOLS:
        imported = [n.module for n in ast.parse(path.read_text()).body if isinstance(n, ast.ImportFrom)]
        assert imported == [f"detector.commands.{by_tool[path.stem].module}"], path.name


@pytest.mark.parametrize("command", [c for c in COMMANDS if available(c)], ids=lambda c: c.name)
def test_subcommand_help(command: Command, capsys):
    """``sppnet <sub> --help`` is the subcommand's own help, under the program name ``sppnet <sub>``."""
    with pytest.raises(SystemExit) as e:
        main([command.name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sppnet {command.name} "), out[:200]
    assert sys.argv[0] != f"sppnet {command.name}"  # the dispatcher puts sys.argv back


def test_bare_sppnet_shows_the_help(capsys):
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_missing_subcommand_module_is_refused_in_one_line(monkeypatch, capsys):
    """A subcommand whose module is not in this installation (e.g. another branch's, not merged yet)
    is listed as such, and running it is one ``error:`` line and exit code 2."""
    ghost = Command("ghost", "no_such_module", "a command of a later version")
    monkeypatch.setattr(commands, "COMMANDS", (*COMMANDS, ghost))
    monkeypatch.setattr(commands, "_BY_NAME", {**commands._BY_NAME, "ghost": ghost})
    assert not available(ghost)
    assert main([]) == 0
    assert "[not in this version]" in next(ln for ln in capsys.readouterr().out.splitlines() if "ghost" in ln)
    assert main(["ghost", "--anything"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: 'sppnet ghost' is not available") \
        and "detector.commands.no_such_module" in err[0]


def test_config_by_name_and_missing_config(tmp_path, monkeypatch, capsys):
    """``--config`` takes a packaged name from any folder; a missing one is one line naming it."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "no_such_config"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: config file not found: no_such_config") \
        and "digits_zf5" in err[0], err


def test_device_overrides_the_config(monkeypatch):
    """``--device`` wins over the config file and ``--set device=...``; "auto" is resolved."""
    import argparse

    from detector.cli import add_config_args, config_from_args

    p = argparse.ArgumentParser()
    add_config_args(p)
    assert config_from_args(p.parse_args(["--config", "digits_zf5"])).device == "cpu"
    args = p.parse_args(["--config", "digits_zf5", "--set", "device=cuda", "--device", "cpu"])
    assert config_from_args(args).device == "cpu"
    assert config_from_args(p.parse_args(["--config", "digits_zf5", "--device", "auto"])).device == \
        ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("sub", ["train", "test", "classifier"])
def test_bad_device_is_a_usage_error(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--config", "digits_zf5", "--device", "gpu"])
    assert e.value.code == 2
    assert "argument --device: 'gpu': expected cpu, cuda, cuda:N, or auto" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["train", "--config", "digits_zf5", "--device", "cuda"],
                                  ["test", "--config", "digits_zf5", "--device", "cuda:1"],
                                  ["demo", "--checkpoint", "x.pt", "img.png", "--device", "cuda"]])
def test_cuda_without_cuda_is_one_error_line(argv, capsys):
    assert main(argv) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: device: 'cuda") and "no CUDA device" in err[0], err


@pytest.mark.parametrize("sub", ["train", "test", "classifier", "demo", "benchmark", "compare-rcnn"])
def test_model_commands_take_device(sub, capsys):
    with pytest.raises(SystemExit):
        main([sub, "--help"])
    assert "--device DEVICE" in capsys.readouterr().out


def test_recorded_command_line(monkeypatch):
    """What a command writes next to its outputs is the command as typed."""
    monkeypatch.setattr(sys, "argv", ["sppnet train", "--config", "x"])
    assert command_line(["--config", "x"]) == ["sppnet train", "--config", "x"]
    monkeypatch.setattr(sys, "argv", ["tools/train_detector.py", "--config", "x"])
    assert command_line() == ["python", "tools/train_detector.py", "--config", "x"]
