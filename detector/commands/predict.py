"""sppnet predict: detect objects in images, folders or globs; write annotated PNGs and one table.

    sppnet predict --checkpoint runs/digits_zf5/model.pt SOURCE [SOURCE ...] [--out runs/predict]
        [--threshold 0] [--device cpu] [--format json|csv]

SOURCE is an image file, a folder (its images: .jpg .jpeg .png .bmp .tif .tiff .webp) or a glob
("photos/*.jpg", quoted). Writes <out>/<image>.png with the detections drawn (class colour,
"class score") and <out>/detections.json (per image: file, size, and each detection's class, label,
score and box) or detections.csv (file, class, score, x1, y1, x2, y2). Boxes are xyxy in 0-based
continuous pixels of the original image. Proposals are computed by selective search with the
settings the model was trained with.
"""
from __future__ import annotations

import argparse

from detector.cli import run_tool
from detector.predict import DISPLAY_THRESHOLD, predict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sppnet predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by training")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image file, folder or glob pattern")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"keep detections scoring at least this (default {DISPLAY_THRESHOLD:g}, the SVM decision "
                        "boundary)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--format", choices=["json", "csv"], default="json", help="detections table format")
    args = p.parse_args(argv)

    def body() -> None:
        res = predict(args.checkpoint, args.sources, args.out, score_threshold=args.threshold, device=args.device,
                      fmt=args.format)
        print(res.text())

    return run_tool(body)
