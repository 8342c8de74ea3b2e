"""What every command-line tool shares: the ``--config``/``--set`` arguments and one error style.

A tool parses its arguments and calls the library once inside :func:`run_tool`; a user error (a bad
config value, a missing or broken file, data that cannot be read) then ends the tool with one line
``error: ...`` that names the file or key, and exit code 2, never a traceback. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from detector.config import Config, ConfigError, load_config

__all__ = ["add_config_args", "config_from_args", "run_tool", "user_errors"]

log = logging.getLogger("sppnet")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user's input cannot be used" (named in the message)."""
    from detector.artifacts import ArtifactError
    from detector.backbones import WeightsError
    from detector.checkpoint import CheckpointError
    from detector.classifier import ClassifierCheckpointError
    from detector.data.digits_build import DatasetExistsError
    from detector.data.records import DataError
    from detector.eval.comp4 import ResultsFileError
    from proposals.imageio import ImageError
    from proposals.store import ProposalFileError

    return (ConfigError, DataError, CheckpointError, ClassifierCheckpointError, WeightsError, ImageError,
            ProposalFileError, ArtifactError, DatasetExistsError, ResultsFileError, FileNotFoundError)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set key=value ...``."""
    p.add_argument("--config", required=True, help="YAML file of overrides (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides, e.g. finetune.iters=500 features.test_scales=[688]")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config`` and ``--set`` (raises ConfigError naming the file or key)."""
    return load_config(args.config, args.overrides)


def run_tool(fn: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's body; a user error becomes ``error: <message>`` on stderr and exit code 2.

    Returns:
        the body's exit code (0 when it returns None), or 2.
    """
    try:
        return int(fn() or 0)
    except user_errors() as e:
        msg = str(e).strip() or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
