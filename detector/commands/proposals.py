"""Selective-search proposals for every image of a split (VOC or COCO layout) -> one .npz (resumable).

    sppnet proposals --data-root data/digits --split test --out out/ss_test.npz \
        [--workers 2] [--mode fast+|fast|quality] [--min-size 20] [--max-boxes 2000]
    (in a checkout, the same: python tools/compute_proposals.py ...)

A killed run continues where it stopped when run again with the same arguments (finished chunks
live in <out>.parts/ until the final file is written atomically). Read the result with
``proposals.load_proposals(out, ids)``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from detector.cli import run_tool
from detector.config import ProposalConfig
from detector.data.splits import FORMATS, load_split
from detector.data.voc import VOCDataError, read_split_ids
from proposals import MODES, compute_proposals_for_images

log = logging.getLogger("compute_proposals")
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def image_path(root: Path, image_id: str) -> Path:
    for ext in IMAGE_EXT:
        p = root / "JPEGImages" / f"{image_id}{ext}"
        if p.is_file():
            return p
    raise VOCDataError(f"no image for id {image_id!r} in {root / 'JPEGImages'} (tried {', '.join(IMAGE_EXT)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path, help="the data set's folder")
    ap.add_argument("--split", required=True, help="ImageSets/Main/<split>.txt, or instances_<split>.json (coco)")
    ap.add_argument("--format", choices=FORMATS, default="voc",
                    help="voc (the split file and JPEGImages/) or coco (the json and its image folder)")
    ap.add_argument("--out", required=True, type=Path, help="output .npz")
    d = ProposalConfig()
    ap.add_argument("--workers", type=int, default=d.workers, help=f"processes (default {d.workers})")
    ap.add_argument("--mode", default=d.mode, choices=MODES, help=f"default {d.mode} (see proposals.selective_search)")
    ap.add_argument("--min-size", type=float, default=d.min_size, help="drop boxes with a side under this (px)")
    ap.add_argument("--max-boxes", type=int, default=d.max_boxes, help="per image; 0 = all")
    ap.add_argument("--skip-bad-images", action="store_true",
                    help="give unreadable images 0 boxes with a warning instead of stopping")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        t0 = time.time()
        if args.format == "voc":  # the split file and the images: no annotations needed
            items = [(i, image_path(args.data_root, i)) for i in read_split_ids(args.data_root, args.split)]
        else:
            records, _ = load_split(args.data_root, args.split, format=args.format, log_summary=False)
            items = [(r.image_id, r.path) for r in records]
        options = {"method": "selective_search", "mode": args.mode, "min_size": args.min_size,
                   "max_boxes": args.max_boxes or None}
        boxes = compute_proposals_for_images(items, args.out, options, workers=args.workers,
                                             progress=not args.no_progress, skip_bad_images=args.skip_bad_images)
        n = sum(len(b) for b in boxes.values())
        log.info("%d images, %.1f boxes/image, %.1f s wall -> %s", len(boxes), n / max(1, len(boxes)),
                 time.time() - t0, args.out)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
