"""Train a torchvision peer detector from scratch on a VOC-layout split in a wall-clock budget, and
score it as the project's detector is scored (devkit VOC07 mAP, COCO AP/AP50/AP75, s per image).

    sppnet train-peer --data-root data/digits --model fasterrcnn_mobilenet_v3_large_fpn \\
        --budget-minutes 20 --out runs/peers/digits_frcnn_20
    (in a checkout, the same: python tools/train_peer.py ...)

Peers: fasterrcnn_mobilenet_v3_large_fpn and ssdlite320_mobilenet_v3_large, built with
weights=None, weights_backbone=None, trained with torchvision's reference recipe scaled to the
budget (``detector.peer_train.RECIPES`` says how). The first iterations are timed to fix the
iteration count that fills the budget; --iterations N replays a run exactly. Writes peer.pt,
eval.json and pr_curves.png into --out and prints one markdown row for BENCHMARKS.md. A killed run
started again with the same arguments resumes from --out/train_state.pt.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detector.cli import run_tool
from detector.peer_train import PEERS, RECIPES, train_peer, with_overrides


def _positive(kind):
    def parse(v: str):
        x = kind(v)
        if not x > 0:
            raise argparse.ArgumentTypeError(f"{v!r}: must be positive")
        return x
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path, help="a VOC-layout folder")
    ap.add_argument("--model", required=True, choices=PEERS)
    ap.add_argument("--out", required=True, type=Path, help="the run's folder")
    ap.add_argument("--budget-minutes", type=_positive(float), default=20.0, help="training wall clock (default 20)")
    ap.add_argument("--iterations", type=_positive(int), default=None, help="fix the iteration count (no probe)")
    ap.add_argument("--train-split", default="trainval")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=_positive(int), default=None, help="torch threads (default: torch's)")
    ap.add_argument("--lr", type=_positive(float), default=None, help="override the recipe's learning rate")
    ap.add_argument("--batch-size", type=_positive(int), default=None, help="override the recipe's batch")
    ap.add_argument("--min-size", type=_positive(int), default=None, help="Faster R-CNN's resize (short side)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        recipe = with_overrides(RECIPES[args.model], lr=args.lr, batch_size=args.batch_size, min_size=args.min_size)
        r = train_peer(args.data_root, args.model, args.out, budget_s=args.budget_minutes * 60,
                       train_split=args.train_split, test_split=args.test_split, seed=args.seed,
                       iterations=args.iterations, num_threads=args.threads, recipe=recipe)
        print("| peer | mAP (VOC07) | COCO AP | AP50 | AP75 | training min | test s per image |")
        print("|---|---|---|---|---|---|---|")
        print(r.row())
        print(f"{r.iterations} iterations; {r.out_dir / 'eval.json'}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
