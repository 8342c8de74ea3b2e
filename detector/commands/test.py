"""Test a trained SPP-net detector on a VOC-layout split: VOC mAP, COCO figures, timing.

    sppnet test --config digits_zf5 [--checkpoint runs/.../model.pt] [--split test | --held-out]
        [--set key=value ...] [--device cpu|cuda|auto] [--compare-rcnn N] [--mode rcnn]
    (in a checkout, the same: python tools/test_net.py ...)

Test-time windows come only from the proposal method run on each image (never from the
annotations). Writes under ``<output_dir>/test_<split>/`` (``test_<split>_rcnn/`` with ``--mode
rcnn``): the devkit comp4 result files (``results/``), ``eval.json`` (per-class AP, mAP, COCO
AP/AP50/AP75, seconds per stage per image, peak memory), ``coco_gt.json`` and ``coco_dets.json``,
``pr_curves.png``, the false positives by cause (``errors.json``, ``errors.png``, ``confusion.png``,
``false_positives.png``: see ``sppnet errors``), ``test_log.txt``, ``resolved_config.yaml`` (with the command line),
``compare_rcnn.json`` with ``--compare-rcnn``, and the detection shards (``detect/``); computed
proposals are cached in ``<output_dir>/proposals/``. Prints the timing table, the per-class table,
the COCO figures, the false positives by cause and the AP each costs, and, last, the line ``mAP: 0.xxxxxx``. An interrupted run resumes from its
shards, and a rerun with the same model and settings only re-scores.

``--held-out`` scores the training images that training held out from fine-tuning
(``data.val_split``, or ``data.val_fraction`` of ``data.train_split`` with ``seed``), with the
training run's cached proposals, under ``<output_dir>/test_heldout/``: the place to choose test
settings (``test.*``, ``features.test_scales``) by ``--set`` without looking at the test split.
"""
from __future__ import annotations

import argparse
import sys

from detector.cli import add_config_args, command_line, config_from_args, run_tool
from detector.engine import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--checkpoint", help="model.pt (default: <output_dir>/model.pt)")
    p.add_argument("--split", help="split to score (default: data.test_split)")
    p.add_argument("--held-out", action="store_true",
                   help="score the training images held out from fine-tuning (validation), not a split")
    p.add_argument("--metric", choices=["07", "area"], default="07", help="VOC07 11-point (default) or area AP")
    p.add_argument("--time-proposals", type=int, default=10,
                   help="run the proposal method live on this many images to time it (the boxes scored are "
                        "the cached ones, made by the same deterministic function)")
    p.add_argument("--compare-rcnn", type=int, default=0, metavar="N",
                   help="also time R-CNN mode against SPP-net on N test images (1 and 5 scales)")
    p.add_argument("--mode", choices=["spp", "rcnn"], default="spp",
                   help="rcnn: score every window by warping it to 227x227 (spec §10), same model")
    args = p.parse_args(argv)
    if args.held_out and args.split:
        p.error("--held-out scores the held-out training images; it takes no --split")

    def body() -> None:
        report = evaluate(config_from_args(args), args.split, held_out=args.held_out, checkpoint=args.checkpoint,
                          metric=args.metric, mode=args.mode, time_proposals=args.time_proposals,
                          compare_rcnn=args.compare_rcnn, argv=command_line(argv))
        if report is not None:  # None on ranks other than 0 of a torchrun job
            print(report.text())

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
