"""Synthetic comp4 result files made by jittering a split's ground truth (``tools/jitter_gt_comp4.py``).

They exercise the scoring path (:mod:`detector.eval.score_files`) end to end on real annotations
without a trained detector: each GT box (difficult ones too) becomes a detection with its corners
moved by Gaussian noise, some are dropped, some duplicated, and random false boxes are added.

Shape shorthand (used across the project):
    G: ground-truth boxes in one image      N: detections in one image      K: foreground classes
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from detector.data.records import ImageRecord
from detector.data.splits import Format, load_split
from detector.eval.comp4 import write_comp4

__all__ = ["jitter_detections", "write_jittered_comp4"]


def jitter_detections(records: Sequence[ImageRecord], num_classes: int, *, noise: float, miss: float, dup: float,
                      fp: float, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Detections made from the ground truth of ``records``.

    Args:
        records: the split's images with their GT (``boxes`` xyxy, ``labels``).
        num_classes: K, for the labels of the false boxes.
        noise: corner noise, a fraction of the box side (std of a Gaussian).
        miss: fraction of GT boxes dropped.
        dup: fraction of the kept boxes that get a second, shifted copy (score x 0.8).
        fp: mean number of random false boxes per image (Poisson).
        generator: the only source of randomness.
    Returns:
        ``{image_id: {"boxes": Tensor[N, 4] xyxy, "scores": Tensor[N] float64 rounded to 2
        decimals (so that ties occur, as in real result files), "labels": Tensor[N] int64}}``.
    """
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


def write_jittered_comp4(data_root: str | Path, split: str, out: str | Path, *, classes: Sequence[str] | None = None,
                         noise: float = 0.08, miss: float = 0.1, dup: float = 0.05, fp: float = 1.0,
                         seed: int = 0, format: Format = "voc") -> tuple[list[Path], int]:
    """Write one comp4 file per class of jittered ground truth (:func:`jitter_detections`).

    Args:
        data_root, split: the split whose ground truth is jittered (``format``: "voc" or "coco").
        out: folder for ``comp4_det_<split>_<class>.txt``.
        classes: class names in id order (default: every name in the split, sorted).
        noise, miss, dup, fp: see :func:`jitter_detections`.
        seed: seed of the generator.
    Returns:
        (the files written, the number of detections).
    Raises:
        VOCDataError / CocoDataError: the split cannot be read (named).
    """
    records, classes = load_split(data_root, split, tuple(classes) if classes else None, format=format)
    gen = torch.Generator().manual_seed(seed)
    dets = jitter_detections(records, len(classes), noise=noise, miss=miss, dup=dup, fp=fp, generator=gen)
    paths = write_comp4(out, split, classes, dets)
    return paths, sum(int(d["scores"].numel()) for d in dets.values())
