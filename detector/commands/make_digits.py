"""Build the embedded default data set ``digits`` (VOC 2007 layout) with nothing downloaded.

    sppnet make-digits --out data/digits [--seed 0] [--trainval 1000] [--test 300] [--force]
    (in a checkout, the same: python tools/make_dataset.py ...)

A second run with the same parameters returns at once ("already built"); other parameters need --force.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from detector.cli import run_tool
from detector.data.digits_build import make_digits_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="destination folder, e.g. data/digits")
    ap.add_argument("--seed", type=int, default=0, help="data set seed (same seed -> identical bytes)")
    ap.add_argument("--trainval", type=int, default=1000, help="trainval images (half train, half val)")
    ap.add_argument("--test", type=int, default=300, help="test images")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="rendering processes (the output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="rebuild a data set made with other parameters")
    args = ap.parse_args(argv)
    if args.trainval < 2 or args.test < 1:
        ap.error(f"need --trainval >= 2 and --test >= 1, got {args.trainval} and {args.test}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("make_dataset")

    def body() -> None:
        s = make_digits_dataset(args.out, seed=args.seed, n_trainval=args.trainval, n_test=args.test,
                                workers=max(1, args.workers), force=args.force, progress=sys.stderr.isatty())
        splits = ("trainval", "train", "val", "test")
        log.info("images per split:  %s", ", ".join(f"{k} {s['images'][k]}" for k in splits))
        log.info("objects per split: %s", ", ".join(f"{k} {s['objects'][k]}" for k in splits))
        log.info("difficult:         %s", ", ".join(f"{k} {s['difficult'][k]}" for k in splits))
        log.info("objects per class: %s", ", ".join(f"{k} {v}" for k, v in s["per_class"].items()))
        log.info("objects per image %d..%d; object side (longer side of box) %.0f..%.0f px; image side %d..%d px",
                 s["objects_per_image"]["min"], s["objects_per_image"]["max"], s["object_side_px"]["min"],
                 s["object_side_px"]["max"], s["image_side_px"]["min"], s["image_side_px"]["max"])
        log.info("distinct digit instances: trainval %d, test %d, shared %d", s["distinct_digits"]["trainval"],
                 s["distinct_digits"]["test"], s["distinct_digits"]["shared"])
        log.info("%s in %.1f s", "checked" if s["skipped"] else f"wrote {s['out']}", s["seconds"])

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
