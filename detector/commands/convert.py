"""Convert a detection data set between the VOC layout and COCO json (``sppnet convert``).

    sppnet convert ROOT OUT --to coco --splits trainval test [--classes A B ...] [--images copy|symlink|none]
    sppnet convert ROOT OUT --to voc  --splits train val

``--to coco`` reads the VOC folder ROOT (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``)
and writes ``OUT/annotations/instances_<split>.json`` and ``OUT/images/``; ``--to voc`` reads
``ROOT/annotations/instances_<split>.json`` (images in ``ROOT/<split>/``, ``ROOT/images/<split>/``,
``ROOT/images/`` or ``ROOT/``) and writes ``OUT/Annotations/``, ``OUT/JPEGImages/`` and
``OUT/ImageSets/Main/<split>.txt``. VOC ``difficult`` <-> COCO ``iscrowd``; integer VOC boxes come back
exactly (``detector.data.convert``). Train on the result with ``data.format: coco`` or ``voc`` and
``data.root: OUT``. Prints what was written per split; an unreadable input ends with one ``error:``
line and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from detector.cli import run_tool
from detector.data.convert import coco_to_voc, voc_to_coco


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sppnet convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the data set to convert")
    p.add_argument("out", type=Path, help="new folder for the converted data set")
    p.add_argument("--to", required=True, choices=("coco", "voc"), help="the format to write (ROOT is the other)")
    p.add_argument("--splits", nargs="+", required=True, help="splits to convert, e.g. trainval test")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names in id order (default: every name the splits' annotations use, sorted)")
    p.add_argument("--images", choices=("copy", "symlink", "none"), default="copy",
                   help="copy the images (default), link them, or write annotations only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        convert = voc_to_coco if args.to == "coco" else coco_to_voc
        print(convert(args.root, args.splits, args.out, classes=args.classes, images=args.images).text())

    return run_tool(body)
