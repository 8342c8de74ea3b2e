"""Detect objects in several test images and draw them beside the ground truth, in one picture.

    sppnet demo --checkpoint runs/digits_zf5/model.pt IMAGE --out demo.png [--count 6]
        [--split test | --images A.jpg B.jpg ...] [--threshold 0] [--columns 2] [--device cpu]
    (in a checkout, the same: python tools/demo.py ...)

IMAGE and the next ids of its VOC split (<root>/ImageSets/Main/<split>.txt, root being the folder
above JPEGImages; default split: the first of test, val, trainval, train that lists IMAGE), or the
--images given. Each image is a pair of panels: ground truth in green (from <root>/Annotations),
and the detections scoring at least --threshold in class colours with their scores; under each pair
what was found, missed and wrong (right = same class and IoU >= 0.5). The threshold is written on
the picture. Prints the same lines.
"""
from __future__ import annotations

import argparse
import sys

from detector.cli import add_device_arg, run_tool
from detector.engine.run import resolve_device
from detector.predict import DISPLAY_THRESHOLD, demo_picture


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by sppnet train")
    p.add_argument("image", help="the first image (in a VOC layout: JPEGImages/<id>.jpg)")
    p.add_argument("--out", default="demo.png", help="PNG to write")
    p.add_argument("--count", type=int, default=6, help="images in the grid (default 6)")
    p.add_argument("--split", help="split whose ids follow IMAGE (default: the first that lists it)")
    p.add_argument("--images", nargs="+", help="draw exactly these images instead")
    p.add_argument("--threshold", type=float, default=DISPLAY_THRESHOLD,
                   help=f"display threshold on the score (default {DISPLAY_THRESHOLD:g}: the SVM decision boundary)")
    p.add_argument("--columns", type=int, default=2, help="image pairs per row (default 2)")
    add_device_arg(p, "cpu")
    args = p.parse_args(argv)

    def body() -> None:
        out, text = demo_picture(args.checkpoint, args.image, args.out, count=args.count, split=args.split,
                                 images=args.images, score_threshold=args.threshold,
                                 device=resolve_device(args.device), columns=args.columns)
        print(text)
        print(f"wrote {out}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
