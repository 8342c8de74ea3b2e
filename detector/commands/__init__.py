"""The ``sppnet`` command: one subcommand per tool, each a module here with ``main(argv) -> int``.

    sppnet --help                  the subcommands, one line each
    sppnet COMMAND --help          a subcommand's own options
    sppnet train --config digits_zf5
    python -m detector.commands …  the same without the console script

Each module is a thin argument parser that calls one library function (``detector.engine``,
``detector.eval``, ``detector.bench`` …) inside :func:`detector.cli.run_tool`, so a user error ends
with one ``error: ...`` line and exit code 2. ``tools/<tool>.py`` are two-line wrappers around the
same ``main``. A subcommand is imported only when it runs, so ``sppnet --help`` starts without
torch, and a subcommand whose module is not in this installation is listed as such and refused
with one line instead of breaking the others.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Sequence

from detector import __version__
from detector.config import packaged_configs

__all__ = ["COMMANDS", "Command", "available", "main"]


@dataclass(frozen=True)
class Command:
    name: str  # what the user types: sppnet <name>
    module: str  # detector.commands.<module>
    summary: str  # the line of ``sppnet --help``
    tool: str | None = None  # tools/<tool>.py, the script form of the same main()


COMMANDS: tuple[Command, ...] = (
    Command("make-digits", "make_digits", "build the embedded digits data set (VOC layout, nothing downloaded)",
            "make_dataset"),
    Command("train", "train", "train a detector from a config: proposals -> ... -> model.pt (cached, resumable)",
            "train_detector"),
    Command("test", "test", "test a trained detector on a split or the held-out images: VOC mAP, COCO AP, timing",
            "test_net"),
    Command("predict", "predict", "detect objects in an image, a folder or a glob; annotated PNGs and one JSON/CSV",
            "predict"),
    Command("demo", "demo", "draw detections beside the ground truth for several test images, in one picture",
            "demo"),
    Command("eval", "eval", "score devkit comp4 result files on a VOC or COCO split (VOC AP per class, COCO AP)",
            "eval_detections"),
    Command("errors", "errors",
            "where the false positives of comp4 result files come from, by cause, with the AP each costs",
            "error_analysis"),
    Command("proposals", "proposals",
            "selective-search proposals for a VOC or COCO split -> .npz (parallel, resumable)",
            "compute_proposals"),
    Command("recall", "recall", "recall of a proposal file against a split's ground truth (table, JSON, plot)",
            "proposal_recall"),
    Command("classifier", "classifier", "pre-train the trunk as an SPP classifier on crops (paper Table 2 modes)",
            "train_classifier"),
    Command("benchmark", "benchmark", "speed figures into BENCHMARKS.md (SPP layer, detection, R-CNN, memory, GPU)",
            "benchmark"),
    Command("compare-rcnn", "compare_rcnn", "SPP-net vs R-CNN timing on a checkpoint or a random ZF-5",
            "compare_rcnn"),
    Command("export", "export", "export the detector after proposals (image + boxes -> detections)", "export"),
    Command("convert", "convert", "convert a data set between VOC and COCO-json layouts", "convert"),
    Command("reproduce-voc07", "reproduce",
            "the paper's VOC 2007 experiment: train, test at 1 and 5 scales, R-CNN timing, Table 6 rows",
            "reproduce_voc07"),
    Command("train-peer", "train_peer",
            "train a torchvision peer detector from scratch in a time budget, scored like the project's",
            "train_peer"),
    Command("compare-runs", "compare_runs", "where two training runs part: their stage fingerprints side by side"),
    Command("jitter-comp4", "jitter_comp4", "comp4 files from jittered ground truth (to exercise `sppnet eval`)",
            "jitter_gt_comp4"),
)
_BY_NAME = {c.name: c for c in COMMANDS}


def available(command: Command) -> bool:
    """Whether ``detector.commands.<module>`` is present in this installation (it is not imported)."""
    return importlib.util.find_spec(f"{__name__}.{command.module}") is not None


def _parser() -> argparse.ArgumentParser:
    width = max(len(c.name) for c in COMMANDS)
    table = "\n".join(f"  {c.name:<{width}}  {c.summary}" + ("" if available(c) else "  [not in this version]")
                      for c in COMMANDS)
    p = argparse.ArgumentParser(
        prog="sppnet", usage="sppnet COMMAND [ARGS ...]  (sppnet COMMAND --help for its options)",
        description="SPP-net object detection (He et al. 2014): train, test and run detectors.",
        epilog=f"commands:\n{table}\n\n--config takes a path or the name of a packaged config "
               f"({', '.join(packaged_configs())}).\nA user error ends with one line 'error: ...' and exit code 2.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sppnet {__version__}")
    p.add_argument("command", metavar="COMMAND", choices=list(_BY_NAME), help=argparse.SUPPRESS)
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sppnet COMMAND ARGS...``: the command's ``main(ARGS)``, with ``sppnet COMMAND`` as its
    program name (its usage line, and the command line it records next to its outputs).

    Returns:
        the command's exit code; 2 for a command that is not in this installation.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:  # a bare `sppnet` shows what there is
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    command = _BY_NAME[args.command]
    if not available(command):
        print(f"error: 'sppnet {command.name}' is not available in this version of sppnet "
              f"({__name__}.{command.module} is not installed)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{command.module}")
    saved = sys.argv
    sys.argv = [f"sppnet {command.name}", *args.args]  # argparse's prog, and the recorded command line
    try:
        return int(module.main(list(args.args)) or 0)
    finally:
        sys.argv = saved
