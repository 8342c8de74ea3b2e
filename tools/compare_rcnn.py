"""SPP-net vs R-CNN mode timing (spec §10-11) on any checkpoint, or on a random full-width ZF-5.

    python tools/compare_rcnn.py --checkpoint runs/x/model.pt --data-root DIR --split test -n 5
    python tools/compare_rcnn.py --random-zf5 [--width-mult 1.0] -n 3 --threads 2

Both modes use the same model and the same proposals per image; proposals are excluded from the
times. ``--random-zf5`` builds a random ZF-5 with fc6/fc7 of width 4096 and random SVMs: timing does
not depend on the weights, so the paper's setting (full-width ZF-5, ~2000 proposals) can be timed
without a trained model. Images: the split's first N images (``--data-root``), else N VOC-sized
(500x375) real photos bundled with scikit-image / scikit-learn. Proposals: selective search on the
image, padded with random boxes up to ``--proposals`` when it returns fewer (the count is logged
and written). Prints the paper-shaped table and ``name: value`` lines; ``--out`` writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from detector.bench import inputs as TI
from detector.bench.random_model import random_detector
from detector.bench.rcnn_compare import compare_rcnn, format_comparison

log = logging.getLogger("compare_rcnn")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model.pt written by tools/train_detector.py")
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.num_images < 1:
        sys.exit("-n must be >= 1")

    if args.random_zf5:
        det = random_detector(width_mult=args.width_mult, fc_dim=args.fc_dim, seed=args.seed, device=args.device)
        model = f"random ZF-5 width {args.width_mult}, fc {args.fc_dim}"
    else:
        from detector.detector import CheckpointError, SPPDetector

        try:
            det = SPPDetector.load(args.checkpoint, device=args.device)
        except CheckpointError as e:
            sys.exit(str(e))
        model = f"{args.checkpoint} ({det.arch}, width {det.width_mult})"
    if args.svd_rank > 0:
        det.compress_fc(args.svd_rank)
        model += f", fc SVD rank {args.svd_rank}"

    if args.data_root:
        from detector.data.voc import VOCDataError, load_voc_split
        from proposals.imageio import read_image

        try:
            records = load_voc_split(args.data_root, args.split)[0][: args.num_images]
        except (VOCDataError, OSError) as e:
            sys.exit(f"--data-root {args.data_root}: {e}")
        images = [(r.image_id, read_image(r.path)) for r in records]
    else:
        images = TI.voc_sized_photos(args.num_images)
    props, n_ss = [], []
    for i, (name, im) in enumerate(images):
        boxes, k = TI.proposals_for(im, args.proposals, args.ss_mode, seed=args.seed + i)
        props.append(boxes)
        n_ss.append(k)
        log.info("%s %dx%d: %d selective-search boxes, %d random boxes added", name, im.shape[1], im.shape[0],
                 k, boxes.shape[0] - k)

    cmp = compare_rcnn(det, [im for _, im in images], props,
                       scale_sets=((args.scale_1,), tuple(args.scales_5)),
                       batch_size=args.batch_size or None, progress=True)
    cmp.update(model=model, selective_search_boxes=n_ss, image_names=[n for n, _ in images],
               command=" ".join(["python", "tools/compare_rcnn.py", *(argv if argv is not None else sys.argv[1:])]),
               cpu_count=os.cpu_count())
    print(f"model: {model}")
    print(format_comparison(cmp))
    for lab, sp in cmp["speedup"].items():
        key = lab.split(" ")[0].replace("-", "_")
        print(f"rcnn_conv_speedup_{key}: {sp['conv']:.2f}")
        print(f"rcnn_overall_speedup_{key}: {sp['overall']:.2f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(cmp, indent=1, default=str))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
