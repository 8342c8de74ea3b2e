"""Train an SPP-net detector on a VOC-layout data set from a YAML config.

    sppnet train --config digits_zf5 [--set key=value ...] [--device cpu|cuda|auto] [--stop-after STAGE]
    (in a checkout, the same: python tools/train_detector.py ...)

Stages (``detector.engine.train``), each loaded when its output is valid for the current settings
and inputs, and resumed after an interruption: proposals -> pretrain -> cache -> finetune -> stats
-> svm -> bbox -> model. Everything is written under ``output_dir``: ``model.pt``,
``train_log.txt``, ``resolved_config.yaml`` (with the command line), ``fingerprints.json`` (each
stage's identity) and each stage's cached files. A bad config value or unreadable data ends the
command with one ``error:`` line and exit code 2, before any stage runs where it can be seen then.
"""
from __future__ import annotations

import argparse
import sys

from detector import distributed
from detector.cli import add_config_args, command_line, config_from_args, run_tool
from detector.engine import TRAIN_STAGES, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--stop-after", choices=TRAIN_STAGES[:-1], help="stop after this stage (its output is kept)")
    args = p.parse_args(argv)

    def body() -> None:
        path = train(config_from_args(args), stop_after=args.stop_after, argv=command_line(argv))
        if distributed.current().main:
            print(f"checkpoint: {path}" if path.name == "model.pt" else f"stopped after {args.stop_after}: {path}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
