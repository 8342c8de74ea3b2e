"""Score devkit comp4 result files on a VOC-layout split (exact VOC 2007 semantics) plus COCO AP.

    sppnet eval --data-root DIR --split test --results RESULTS_DIR [--metric 07|area]
    (in a checkout, the same: python tools/eval_detections.py ...)

Prints the per-class table (class, #gt, #det, recall, AP), the COCO figures (AP, AP50, AP75) and
ends with ``mAP: 0.xxxxxx``. Writes the same as JSON (default RESULTS_DIR/eval.json) and the PR
curves (RESULTS_DIR/pr_curves.png). Ground truth is read as annotated (``raw_boxes=True``), as the
devkit scores it (``detector.eval.score_files``). A missing folder, a malformed result line or a
detection on an image outside the split ends with one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detector.cli import command_line, run_tool
from detector.data.splits import FORMATS
from detector.eval.score_files import score_comp4_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path, help="VOC-layout folder")
    ap.add_argument("--split", required=True, help="ImageSets/Main/<split>.txt")
    ap.add_argument("--results", required=True, type=Path, help="folder of comp4_det_<split>_<class>.txt")
    ap.add_argument("--metric", choices=("07", "area"), default="07",
                    help="07: VOC 2007 11-point AP (default); area: VOC 2010+ area AP")
    ap.add_argument("--classes", nargs="+", default=None,
                    help="class names in id order (default: every name in the split, sorted)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default RESULTS/eval.json)")
    ap.add_argument("--no-coco", action="store_true", help="skip the pycocotools figures")
    ap.add_argument("--format", choices=FORMATS, default="voc",
                    help="the data set's layout: voc (ImageSets/Main/<split>.txt) or coco "
                         "(annotations/instances_<split>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        report = score_comp4_files(args.data_root, args.split, args.results, metric=args.metric,
                                   classes=args.classes, out=args.out, coco=not args.no_coco,
                                   argv=command_line(argv), format=args.format)
        print(report.text())

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
