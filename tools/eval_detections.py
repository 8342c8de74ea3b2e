"""Score devkit comp4 result files on a VOC-layout split (exact VOC 2007 semantics) plus COCO AP.

    python tools/eval_detections.py --data-root DIR --split test --results RESULTS_DIR [--metric 07|area]

Prints the per-class table (class, #gt, #det, recall, AP), the COCO figures (AP, AP50, AP75) and
ends with ``mAP: 0.xxxxxx``. Writes the same as JSON (default RESULTS_DIR/eval.json) and the PR
curves (RESULTS_DIR/pr_curves.png). Ground truth is read as annotated (``raw_boxes=True``), as the
devkit scores it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from detector.eval import coco_evaluate, evaluate, plot_pr_curves, read_comp4
from detector.data.voc import VOCDataError, discover_classes, load_voc_split

log = logging.getLogger("eval_detections")


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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        classes = tuple(args.classes) if args.classes else discover_classes(args.data_root, args.split)
        # GT as annotated (raw_boxes), images not needed: what the devkit scores against
        records, classes = load_voc_split(args.data_root, args.split, classes, raw_boxes=True,
                                          require_images=False)
        if not args.results.is_dir():
            raise VOCDataError(f"--results {args.results} is not a folder")
        prefix = f"comp4_det_{args.split}_"
        extra = sorted(p.name for p in args.results.glob(f"{prefix}*.txt")
                       if p.name[len(prefix):-4] not in classes)
        if extra:
            log.warning("result files for classes not scored (not in %s): %s", list(classes), extra)
        dets = read_comp4(args.results, args.split, classes, image_ids=[r.image_id for r in records])
        result = evaluate(records, classes, dets, metric=args.metric)
        coco = None if args.no_coco else coco_evaluate(records, classes, dets)
    except (ValueError, OSError) as e:  # VOCDataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = args.out or args.results / "eval.json"
    payload = {"data_root": str(args.data_root), "split": args.split, "results": str(args.results),
               "argv": sys.argv, **result.to_dict(), "coco": coco}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    png = plot_pr_curves(result, args.results / "pr_curves.png")

    metric = "VOC07 11-point" if args.metric == "07" else "area (VOC2010+)"
    print(f"{args.split}: {len(records)} images, metric {metric}")
    print(result.table())
    if coco is not None:
        print(f"COCO (pycocotools): AP {coco['AP']:.4f}  AP50 {coco['AP50']:.4f}  AP75 {coco['AP75']:.4f}")
    print(f"wrote {out} and {png}")
    print(f"mAP: {result.mAP:.6f}" if not math.isnan(result.mAP) else "mAP: nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
