"""From per-window class scores to detections: threshold, clip, per-class NMS, top-k per class.

Shape shorthand:
    R: windows in one image      K: foreground classes      N: detections

Spec §9: per class keep windows scoring > -1.5, greedy NMS suppressing IoU > 0.3, keep at most 100
per class and image. Everything here is vectorised over classes: one ``torchvision.ops.batched_nms``
call for all (window, class) candidates, and the per-class top-k by a stable sort, no Python loop
over classes or windows.

IoU and the spec's +1: the spec's NMS computes IoU on 1-based inclusive pixel boxes with ``+1``
widths. In the project's continuous convention (``detector.boxes``) an inclusive VOC box
``(xmin..xmax)`` is ``(xmin - 1, xmax)``, whose plain width ``x2 - x1`` already equals
``xmax - xmin + 1``; so torchvision's IoU (no +1) on project boxes is *the same number* as the
spec's +1 IoU on the inclusive boxes, with no deviation. (Regressed boxes are fractional in both
conventions; the identity holds for them too.) torchvision also suppresses IoU strictly greater
than the threshold, as the spec does.

Ties: with exactly equal scores torchvision's CPU and CUDA kernels may keep different boxes
(vision#2157); SVM scores are continuous, so this does not arise in practice.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms
from torchvision.ops import nms as _tv_nms

from detector.boxes import clip_boxes

__all__ = ["nms", "detections_from_scores", "topk_per_class"]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3) -> Tensor:
    """Greedy NMS of one class (torchvision.ops.nms): suppresses boxes with IoU > ``iou_threshold``.

    Args:
        boxes (Tensor[N, 4]): xyxy.
        scores (Tensor[N]): higher is better.
        iou_threshold: IoU above which the lower-scored box is dropped.
    Returns:
        Tensor[N'] int64: indices of kept boxes, by decreasing score.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"nms expects boxes [N, 4] and scores [N], got {tuple(boxes.shape)}, {tuple(scores.shape)}")
    return _tv_nms(boxes.float(), scores.float(), float(iou_threshold))


def topk_per_class(labels: Tensor, k: int) -> Tensor:
    """Mask keeping the first ``k`` entries of each label, in the given order (vectorised).

    Args:
        labels (Tensor[N] int64): labels of a score-sorted list.
        k: entries kept per label.
    Returns:
        Tensor[N] bool.
    """
    n = labels.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=labels.device)
    order = torch.argsort(labels, stable=True)  # (N,) groups labels, keeps the score order inside
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)  # (max_label + 1,)
    starts = torch.cumsum(counts, 0) - counts  # first position of each label in `order`
    rank_sorted = torch.arange(n, device=labels.device) - starts[sorted_labels]  # (N,)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank < k


def detections_from_scores(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float = -1.5,
    nms_thresh: float = 0.3,
    max_per_class: int = 100,
    image_size: tuple[int, int] | None = None,
    return_indices: bool = False,
) -> dict[str, Tensor]:
    """Per-class detections of one image.

    Args:
        boxes (Tensor[R, 4] or Tensor[R, K, 4]): xyxy windows (shared by all classes) or per-class
            regressed boxes, original-image pixels.
        scores (Tensor[R, K]): class scores (SVM margins), no background column.
        score_thresh: candidates need ``score > score_thresh`` (spec: -1.5; use ``-inf`` for none).
        nms_thresh: per-class NMS IoU threshold (0.3).
        max_per_class: detections kept per class after NMS (100; <= 0 = no limit).
        image_size: (H, W); boxes are clipped to ``[0, W] x [0, H]`` before NMS and candidates that
            become empty (zero width or height) are dropped. None = no clipping.
        return_indices: also return ``window_index`` (Tensor[N] int64): the row of ``scores`` each
            detection came from (e.g. to regress only the kept boxes, spec §8).
    Returns:
        dict with ``boxes`` (Tensor[N, 4] float32, xyxy), ``scores`` (Tensor[N] float32) and
        ``labels`` (Tensor[N] int64, in [0, K)), sorted by decreasing score.
    """
    if scores.ndim != 2:
        raise ValueError(f"detections_from_scores expects scores [R, K], got {tuple(scores.shape)}")
    r, k = scores.shape
    if not (boxes.shape == (r, 4) or boxes.shape == (r, k, 4)):
        raise ValueError(f"detections_from_scores expects boxes [R, 4] or [R, K, 4] with R={r}, K={k}, got "
                         f"{tuple(boxes.shape)}")
    mask = scores > score_thresh  # (R, K)
    win, lab = torch.nonzero(mask, as_tuple=True)  # (M,), (M,)
    cand_scores = scores[win, lab].float()  # (M,)
    cand_boxes = (boxes[win] if boxes.ndim == 2 else boxes[win, lab]).float()  # (M, 4)
    if image_size is not None:
        cand_boxes = clip_boxes(cand_boxes, image_size[0], image_size[1])
        ok = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])  # (M,)
        if not bool(ok.all()):
            win, lab, cand_scores, cand_boxes = win[ok], lab[ok], cand_scores[ok], cand_boxes[ok]
    keep = batched_nms(cand_boxes, cand_scores, lab, float(nms_thresh))  # (M',) by decreasing score
    if max_per_class > 0:
        keep = keep[topk_per_class(lab[keep], max_per_class)]
    out = {
        "boxes": cand_boxes[keep].contiguous(),
        "scores": cand_scores[keep].contiguous(),
        "labels": lab[keep].to(torch.int64),
    }
    if return_indices:
        out["window_index"] = win[keep].to(torch.int64)
    return out
