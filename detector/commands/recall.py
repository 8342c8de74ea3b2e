"""Recall of a proposal file against a VOC-layout split's ground truth (difficult objects excluded).

    sppnet recall --data-root DIR --split test --proposals out/ss_test.npz [--out DIR]
    (in a checkout, the same: python tools/proposal_recall.py ...)

Prints recall@0.5, recall@0.7 and average recall (IoU 0.50:0.05:0.95) for the first 100, 300, 1000,
2000 and all proposals of each image; with --out also writes recall.json and recall.png (recall
against the number of proposals). Objects marked <difficult> are left out of the ground truth, as
the VOC devkit leaves them out of npos (``detector.eval.proposal_report``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detector.cli import run_tool
from detector.data.splits import FORMATS
from detector.eval.proposal_report import proposal_recall_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--split", required=True)
    ap.add_argument("--proposals", required=True, type=Path, help=".npz / .mat / .pkl")
    ap.add_argument("--out", type=Path, default=None, help="folder for recall.json and recall.png")
    ap.add_argument("--allow-extra", action="store_true", help="file may hold other images too")
    ap.add_argument("--format", choices=FORMATS, default="voc", help="the data set's layout: voc or coco")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        report = proposal_recall_report(args.data_root, args.split, args.proposals, out=args.out,
                                        allow_extra=args.allow_extra, format=args.format)
        print(report.text())

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
