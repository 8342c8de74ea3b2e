"""Make comp4 result files by jittering a split's ground truth (to exercise ``sppnet eval``).

    sppnet jitter-comp4 --data-root DIR --split test --out RESULTS_DIR --seed 0
    (in a checkout, the same: python tools/jitter_gt_comp4.py ...)

Each GT box (difficult ones too) becomes a detection with its corners moved by Gaussian noise
(``--noise`` x box side), a fraction ``--miss`` is dropped, ``--dup`` get a second shifted copy and
``--fp`` random false boxes per image are added. Scores are rounded to 2 decimals so that ties
occur, as in real result files (``detector.eval.jitter``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detector.cli import run_tool
from detector.data.splits import FORMATS
from detector.eval.jitter import write_jittered_comp4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True, type=Path, help="folder for comp4_det_<split>_<class>.txt")
    ap.add_argument("--classes", nargs="+", default=None, help="default: every name in the split, sorted")
    ap.add_argument("--noise", type=float, default=0.08, help="corner noise, fraction of the box side")
    ap.add_argument("--miss", type=float, default=0.1, help="fraction of GT boxes dropped")
    ap.add_argument("--dup", type=float, default=0.05, help="fraction duplicated")
    ap.add_argument("--fp", type=float, default=1.0, help="mean random false boxes per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=FORMATS, default="voc", help="the data set's layout: voc or coco")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        paths, n = write_jittered_comp4(args.data_root, args.split, args.out, classes=args.classes, noise=args.noise,
                                        miss=args.miss, dup=args.dup, fp=args.fp, seed=args.seed, format=args.format)
        logging.info("wrote %d comp4 files to %s (%d detections)", len(paths), args.out, n)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
