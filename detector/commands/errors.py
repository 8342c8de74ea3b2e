"""Where a detector's false positives come from, from its devkit comp4 result files on a split.

    sppnet errors --data-root DIR --split test --results RESULTS_DIR [--out DIR] [--gallery 8]

Each false positive (the devkit's verdict at IoU 0.5) is put down to one cause: a duplicate of a
found object, a loose box on an object of its class (IoU 0.1-0.5), confusion with an object of
another class, or background (IoU < 0.1 with everything; counted apart where the box reaches
the image's frame). Prints, per class, the verdicts of its n_gt best-scored detections, the objects
no detection finds (with --proposals, how many of them no proposal reaches either), and the AP each
cause costs (the AP with that cause's false positives removed).
Writes errors.json, errors.png (the same as bars), confusion.png (which class each class's boxes sit
on) and false_positives.png (the highest-scored false
positives of each class, cropped, with the annotated objects in green) into --out (default: the
results folder). ``sppnet test`` writes comp4 files into <output_dir>/test_<split>/results.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detector.cli import command_line, run_tool
from detector.data.splits import FORMATS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path, help="VOC-layout (or COCO) folder")
    ap.add_argument("--split", required=True, help="ImageSets/Main/<split>.txt")
    ap.add_argument("--results", required=True, type=Path, help="folder of comp4_det_<split>_<class>.txt")
    ap.add_argument("--out", type=Path, default=None, help="folder for errors.json/png (default RESULTS)")
    ap.add_argument("--metric", choices=("07", "area"), default="07",
                    help="07: VOC 2007 11-point AP (default); area: VOC 2010+ area AP")
    ap.add_argument("--classes", nargs="+", default=None,
                    help="class names in id order (default: every name in the split, sorted)")
    ap.add_argument("--border-px", type=float, default=2.0,
                    help="a background false positive this close to an image edge counts as at the frame")
    ap.add_argument("--proposals", type=Path, default=None,
                    help="the proposal file the detector scored (.npz/.mat/.pkl): also count the missed objects "
                         "no proposal reaches at IoU 0.5")
    ap.add_argument("--gallery", type=int, default=8,
                    help="false positives per class in false_positives.png (0: no picture)")
    ap.add_argument("--format", choices=FORMATS, default="voc", help="the data set's layout: voc or coco")
    args = ap.parse_args(argv)
    if args.gallery < 0:
        ap.error(f"--gallery must be >= 0, got {args.gallery}")
    if not args.border_px >= 0:
        ap.error(f"--border-px must be >= 0, got {args.border_px}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        from detector.eval.error_files import error_report_from_files

        text = error_report_from_files(args.data_root, args.split, args.results, out=args.out,
                                       metric=args.metric, classes=args.classes, border_px=args.border_px,
                                       gallery=args.gallery, proposals=args.proposals,
                                       format=args.format, argv=command_line(argv))
        print(text)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
