"""Proposal recall: the fraction of ground-truth boxes covered by the first k proposals.

Shape shorthand (used across the project):
    R: proposals in one image      G: ground-truth boxes in one image

Recall@t at budget k = (number of ground-truth boxes whose best IoU with the first k proposals of
their image is >= t) / (number of ground-truth boxes), pooled over all images. Average recall (AR,
Hosang et al. 2015) is the mean of recall over t = 0.50, 0.55, ..., 0.95. IoU is the project's
continuous IoU (``detector.boxes.pairwise_iou``, no +1). The caller chooses which ground truth
counts (``tools/proposal_recall.py`` leaves VOC "difficult" objects out).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from detector.boxes import pairwise_iou

__all__ = ["best_iou_per_gt", "proposal_recall", "AR_THRESHOLDS"]

AR_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())  # 0.50 .. 0.95


def best_iou_per_gt(proposals: np.ndarray, gt_boxes: np.ndarray, top_ks: Sequence[int]) -> np.ndarray:
    """Best IoU of each ground-truth box with the first k proposals, for each k.

    Args:
        proposals (ndarray [R, 4]): xyxy, in rank order.
        gt_boxes (ndarray [G, 4]): xyxy.
        top_ks: budgets; k larger than R means all R.
    Returns:
        ndarray float64 [len(top_ks), G]: 0 where there are no proposals.
    """
    p = np.asarray(proposals, np.float32).reshape(-1, 4)
    g = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    out = np.zeros((len(top_ks), len(g)), np.float64)
    if len(p) == 0 or len(g) == 0:
        return out
    iou = pairwise_iou(torch.from_numpy(p), torch.from_numpy(g)).numpy()  # (R, G)
    running = np.maximum.accumulate(iou, axis=0)  # (R, G) best over the first r+1 proposals
    for i, k in enumerate(top_ks):
        out[i] = running[min(int(k), len(p)) - 1] if k > 0 else 0.0
    return out


def proposal_recall(proposals: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                    top_ks: Sequence[int] = (100, 300, 1000, 2000),
                    thresholds: Sequence[float] = (0.5, 0.7)) -> dict:
    """Recall at each budget and IoU threshold, and average recall, pooled over images.

    Args:
        proposals: per image, ndarray [R, 4] xyxy in rank order.
        gt_boxes: per image, ndarray [G, 4] xyxy (only the boxes that should count).
        top_ks: budgets; the table adds a row "all" (every proposal).
        thresholds: IoU thresholds for the recall columns.
    Returns:
        dict with ``num_images``, ``num_gt``, ``mean_boxes`` and ``rows``: a list of dicts
        ``{"k": k or "all", "recall@0.5": ..., "recall@0.7": ..., "AR": ...}``.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"proposal_recall: {len(proposals)} proposal arrays but {len(gt_boxes)} "
                         f"ground-truth arrays")
    ks = [int(k) for k in top_ks]
    big = max([len(p) for p in proposals] + ks + [1])
    budgets = ks + [big]
    best = [best_iou_per_gt(p, g, budgets) for p, g in zip(proposals, gt_boxes)]
    best_all = np.concatenate(best, axis=1) if best else np.zeros((len(budgets), 0))  # (k, sum G)
    n = best_all.shape[1]
    rows = []
    for i, k in enumerate(budgets):
        row: dict = {"k": k if i < len(ks) else "all"}
        for t in thresholds:
            row[f"recall@{t:g}"] = float((best_all[i] >= t).mean()) if n else float("nan")
        row["AR"] = (float(np.mean([(best_all[i] >= t).mean() for t in AR_THRESHOLDS]))
                     if n else float("nan"))
        rows.append(row)
    return {"num_images": len(proposals), "num_gt": int(n),
            "mean_boxes": float(np.mean([len(p) for p in proposals])) if len(proposals) else 0.0,
            "rows": rows}
