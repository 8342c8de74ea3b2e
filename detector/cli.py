"""What every command-line tool shares: ``--config``/``--set``/``--device``, the recorded command
line and one error style.

A command (``detector/commands/<name>.py``, run as ``sppnet <name>`` or ``python tools/<tool>.py``)
parses its arguments and calls the library once inside :func:`run_tool`; a user error (a bad config
value, a missing or broken file, data that cannot be read) then ends it with one line ``error: ...``
that names the file or key, and exit code 2, never a traceback. A malformed argument is argparse's
``usage`` line plus ``<prog>: error: ...``, also exit code 2. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable, Sequence

from detector.config import Config, ConfigError, load_config

__all__ = ["add_config_args", "add_device_arg", "command_line", "config_from_args", "run_tool", "user_errors"]

log = logging.getLogger("sppnet")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user's input cannot be used" (named in the message)."""
    from detector.artifacts import ArtifactError
    from detector.backbones import WeightsError
    from detector.bench.scale import ScaleError
    from detector.checkpoint import CheckpointError
    from detector.classifier import ClassifierCheckpointError
    from detector.data.digits_build import DatasetExistsError
    from detector.data.records import DataError
    from detector.eval.comp4 import ResultsFileError
    from proposals.imageio import ImageError
    from proposals.store import ProposalFileError

    return (ConfigError, DataError, CheckpointError, ClassifierCheckpointError, WeightsError, ImageError,
            ProposalFileError, ArtifactError, DatasetExistsError, ResultsFileError, ScaleError, FileNotFoundError)


DEVICES = "cpu, cuda, cuda:N, or auto (CUDA when available, else the CPU)"


def _device(value: str) -> str:
    """argparse type of ``--device``: the spelling ``Config.device`` accepts."""
    if re.fullmatch(r"cpu|cuda|cuda:\d+|auto", value) is None:
        raise argparse.ArgumentTypeError(f"{value!r}: expected {DEVICES}")
    return value


def add_device_arg(p: argparse.ArgumentParser, default: str | None, what: str = "") -> None:
    """``--device``: cpu, cuda, cuda:N or auto; ``default`` None means the config's ``device``.

    The command resolves "auto" (and refuses a CUDA device on a machine without one) with
    :func:`detector.engine.run.resolve_device`, as the engine does for a config's ``device``.
    """
    where = "overrides the config's device" if default is None else f"default {default}"
    p.add_argument("--device", type=_device, default=default,
                   help=f"{what or 'where the model runs'}: {DEVICES}; {where}")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE|NAME``, ``--set key=value ...`` and ``--device`` (which overrides ``device``)."""
    p.add_argument("--config", required=True,
                   help="YAML file of overrides, or the name of a packaged config (e.g. digits_zf5)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides, e.g. finetune.iters=500 features.test_scales=[688]")
    add_device_arg(p, None)


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config``, ``--set`` and ``--device``, its ``device`` resolved ("auto" ->
    cuda or cpu).

    Raises:
        ConfigError: naming the file or key; a CUDA device asked for on a machine without one.
    """
    import dataclasses

    from detector.engine.run import resolve_device

    device = getattr(args, "device", None)
    cfg = load_config(args.config, [*args.overrides, *([f"device={device}"] if device else [])])
    return dataclasses.replace(cfg, device=resolve_device(cfg.device))


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """The command as the user ran it, to record next to the outputs.

    ``["sppnet train", "--config", ...]`` under the ``sppnet`` command (its dispatcher names the
    program so), ``["python", "tools/train_detector.py", ...]`` for a script.

    Args:
        argv: the arguments ``main`` was given (None: ``sys.argv[1:]``).
    """
    prog = sys.argv[0]
    args = sys.argv[1:] if argv is None else list(argv)
    return [*(["python", prog] if prog.endswith(".py") else [prog]), *args]


def run_tool(fn: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's body; a user error becomes ``error: <message>`` on stderr and exit code 2.

    Returns:
        the body's exit code (0 when it returns None), or 2.
    """
    from detector import distributed

    try:
        return int(fn() or 0)
    except user_errors() as e:
        msg = str(e).strip() or type(e).__name__
        rank = distributed.current()
        print(f"error: {msg}" + (f" (rank {rank.rank} of {rank.world})" if rank.active else ""), file=sys.stderr)
        return 2
    finally:
        distributed.finish()
