"""SPP-net vs R-CNN mode timing (spec §10-11) on any checkpoint, or on a random full-width ZF-5.

    sppnet compare-rcnn --checkpoint runs/x/model.pt --data-root DIR --split test -n 5 [--device cuda]
    sppnet compare-rcnn --random-zf5 [--width-mult 1.0] -n 3 --threads 2
    (in a checkout, the same: python tools/compare_rcnn.py ...)

Both modes use the same model and the same proposals per image; proposals are excluded from the
times. ``--random-zf5`` builds a random ZF-5 with fc6/fc7 of width 4096 and random SVMs: timing does
not depend on the weights, so the paper's setting (full-width ZF-5, ~2000 proposals) can be timed
without a trained model. Images: the split's first N images (``--data-root``), else N VOC-sized
(500x375) real photos bundled with scikit-image / scikit-learn. Proposals: selective search on the
image, padded with random boxes up to ``--proposals`` when it returns fewer (the count is logged
and written). Prints the paper-shaped table and ``name: value`` lines; ``--out`` writes the JSON.
The flow is ``detector.bench.rcnn_compare.run_rcnn_comparison``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from detector.bench.rcnn_compare import run_rcnn_comparison
from detector.cli import add_device_arg, command_line, run_tool
from detector.engine.run import resolve_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model.pt written by sppnet train")
    src.add_argument("--random-zf5", action="store_true", help="random ZF-5 + fc 4096 + SVMs (timing only)")
    p.add_argument("--width-mult", type=float, default=1.0, help="ZF-5 width for --random-zf5 (1.0 = paper)")
    p.add_argument("--fc-dim", type=int, default=4096, help="fc6/fc7 width for --random-zf5")
    p.add_argument("--data-root", help="VOC-layout folder; default: bundled VOC-sized photos")
    p.add_argument("--split", default="test")
    p.add_argument("-n", "--num-images", type=int, default=3)
    p.add_argument("--proposals", type=int, default=2000, help="proposals per image (paper: ~2000)")
    p.add_argument("--ss-mode", default="fast+", help="proposals.selective_search mode (project default fast+)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--batch-size", type=int, default=0, help="R-CNN windows per conv batch (0 = default)")
    p.add_argument("--scales-5", type=int, nargs="+", default=[480, 576, 688, 864, 1200])
    p.add_argument("--scale-1", type=int, default=688)
    p.add_argument("--svd-rank", type=int, default=0, help="compress fc6/fc7 to this rank (0 = off)")
    add_device_arg(p, "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("-n must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        report = run_rcnn_comparison(
            checkpoint=None if args.random_zf5 else args.checkpoint, width_mult=args.width_mult, fc_dim=args.fc_dim,
            data_root=args.data_root, split=args.split, num_images=args.num_images, n_proposals=args.proposals,
            ss_mode=args.ss_mode, threads=args.threads, batch_size=args.batch_size,
            scale_sets=((args.scale_1,), tuple(args.scales_5)), svd_rank=args.svd_rank,
            device=resolve_device(args.device), seed=args.seed, out=args.out, command=" ".join(command_line(argv)))
        print(report.text())

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
