"""Make comp4 result files by jittering a split's ground truth (to exercise tools/eval_detections.py).

    python tools/jitter_gt_comp4.py --data-root DIR --split test --out RESULTS_DIR --seed 0

Each GT box (difficult ones too) becomes a detection with its corners moved by Gaussian noise
(``--noise`` x box side), a fraction ``--miss`` is dropped, ``--dup`` get a second shifted copy and
``--fp`` random false boxes per image are added. Scores are rounded to 2 decimals so that ties
occur, as in real result files.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from detector.eval import write_comp4
from detector.data.voc import discover_classes, load_voc_split


def jitter_detections(records, num_classes: int, *, noise: float, miss: float, dup: float,
                      fp: float, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image detections ``{id: {boxes [N,4] xyxy, scores [N], labels [N] int64}}``."""
    out = {}
    for r in records:
        g = r.boxes.shape[0]
        keep = torch.rand(g, generator=generator) >= miss
        b, lab = r.boxes[keep], r.labels[keep]
        wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)  # (G', 4)
        b = b + noise * wh * torch.randn(b.shape, generator=generator)
        iou_like = torch.exp(-(torch.randn(b.shape[0], generator=generator) ** 2))  # score proxy
        s = 0.4 + 0.6 * iou_like * torch.rand(b.shape[0], generator=generator)
        d = torch.rand(b.shape[0], generator=generator) < dup
        b = torch.cat([b, b[d] + 0.05 * wh[d]])  # (G'+D, 4)
        lab = torch.cat([lab, lab[d]])
        s = torch.cat([s, 0.8 * s[d]])
        n_fp = int(torch.poisson(torch.tensor(float(fp)), generator=generator))
        if n_fp:
            xy = torch.rand(n_fp, 2, generator=generator) * torch.tensor([r.width, r.height]) * 0.8
            side = 20 + 100 * torch.rand(n_fp, 2, generator=generator)
            b = torch.cat([b, torch.cat([xy, xy + side], 1)])  # (N, 4)
            lab = torch.cat([lab, torch.randint(num_classes, (n_fp,), generator=generator)])
            s = torch.cat([s, 0.6 * torch.rand(n_fp, generator=generator)])
        out[r.image_id] = {"boxes": b.float(), "scores": torch.round(s.double() * 100) / 100, "labels": lab}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True, type=Path, help="folder for comp4_det_<split>_<class>.txt")
    ap.add_argument("--classes", nargs="+", default=None, help="default: every name in the split, sorted")
    ap.add_argument("--noise", type=float, default=0.08, help="corner noise, fraction of the box side")
    ap.add_argument("--miss", type=float, default=0.1, help="fraction of GT boxes dropped")
    ap.add_argument("--dup", type=float, default=0.05, help="fraction duplicated")
    ap.add_argument("--fp", type=float, default=1.0, help="mean random false boxes per image")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    classes = tuple(args.classes) if args.classes else discover_classes(args.data_root, args.split)
    records, classes = load_voc_split(args.data_root, args.split, classes)
    gen = torch.Generator().manual_seed(args.seed)
    dets = jitter_detections(records, len(classes), noise=args.noise, miss=args.miss, dup=args.dup,
                             fp=args.fp, generator=gen)
    paths = write_comp4(args.out, args.split, classes, dets)
    logging.info("wrote %d comp4 files to %s (%d detections)", len(paths), args.out,
                 sum(int(d["scores"].numel()) for d in dets.values()))


if __name__ == "__main__":
    main()
