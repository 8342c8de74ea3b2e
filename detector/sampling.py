"""Window labelling and foreground/background sampling for fine-tuning (spec §6).

Shape shorthand:
    R: windows (proposals + GT boxes) in one image      G: ground-truth boxes      K: foreground classes
    B: windows in a mini-batch (128)

Labels follow STYLE.md: foreground ids 0..K-1, background = K, and -1 for windows that are used
neither as foreground nor as background. A window is foreground when its highest IoU with a GT box
is >= 0.5 (label = that GT's class; GT boxes themselves have IoU 1), background when that IoU lies
in [0.1, 0.5). IoU is continuous (``detector.boxes.pairwise_iou``), which equals the spec's +1 IoU
on inclusive pixel boxes (see ``detector.postprocess``).

The one sampler, :func:`sample_windows`, draws foreground and background windows uniformly without
replacement from the pooled windows of a list of images. Fine-tuning uses it in both of its modes
(``detector.finetune``): on a chunk of many images for a whole chunk of batches (fc layers only:
every batch mixes windows of many images, spec §6), or per image, a fixed number of windows from
each of a batch's few images (with the trunk's tail: Fast R-CNN's hierarchical sampling).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from detector.boxes import pairwise_iou

__all__ = ["label_windows", "sample_windows"]


def label_windows(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    fg_iou: float,
    bg_low: float,
    bg_high: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fine-tuning label of each window from its best-overlapping GT box.

    Args:
        proposals (Tensor[R, 4]): xyxy windows (include the GT boxes to have them as foreground).
        gt_boxes (Tensor[G, 4]): xyxy ground truth (G may be 0).
        gt_labels (Tensor[G] int64): classes in [0, K).
        num_classes: K (the background label).
        fg_iou: foreground when max IoU >= fg_iou.
        bg_low, bg_high: background when bg_low <= max IoU < bg_high (and not foreground).
    Returns:
        (labels, max_iou, gt_index): labels (Tensor[R] int64: class, K = background, -1 = unused),
        max_iou (Tensor[R] float32), gt_index (Tensor[R] int64: argmax GT, first on ties; -1 when G = 0).
        With no GT every window has IoU 0, so it is background only when bg_low <= 0.
    """
    if proposals.ndim != 2 or proposals.shape[-1] != 4 or gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"label_windows expects proposals [R, 4] and gt_boxes [G, 4], got "
                         f"{tuple(proposals.shape)}, {tuple(gt_boxes.shape)}")
    if gt_labels.shape != (gt_boxes.shape[0],):
        raise ValueError(f"label_windows expects gt_labels [G={gt_boxes.shape[0]}], got {tuple(gt_labels.shape)}")
    if gt_labels.numel() and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
        raise ValueError(f"label_windows: gt_labels must lie in [0, {num_classes})")
    r = proposals.shape[0]
    if gt_boxes.shape[0] == 0:
        max_iou = torch.zeros(r, dtype=torch.float32)
        gt_index = torch.full((r,), -1, dtype=torch.int64)
    else:
        iou = pairwise_iou(proposals, gt_boxes)  # (R, G)
        max_iou, gt_index = iou.max(dim=1)  # (R,), (R,)
    labels = torch.full((r,), -1, dtype=torch.int64)
    bg = (max_iou >= bg_low) & (max_iou < bg_high)
    labels[bg] = num_classes
    fg = max_iou >= fg_iou
    if gt_boxes.shape[0]:
        labels[fg] = gt_labels.to(torch.int64)[gt_index[fg]]
    return labels, max_iou, gt_index


def sample_windows(
    labels: Sequence[Tensor],
    images: Sequence[int],
    num_classes: int,
    n_fg: int,
    n_total: int,
    generator: torch.Generator,
) -> tuple[list[tuple[int, int]], int, int]:
    """Draw foreground and background windows from the pooled windows of ``images`` (spec §6).

    The foreground windows (labels 0..K-1) of all listed images form one pool and the background
    windows (label K) another, each in image order and window order inside an image. ``min(n_fg,
    #fg)`` foreground windows are drawn uniformly without replacement, then ``n_total`` minus
    that many background windows (fewer when the pool is short: no window is drawn twice, so a
    short pool gives a short draw). Unused windows (-1) are never drawn.

    Args:
        labels: one Tensor[R_i] int64 per image of the training list (:func:`label_windows`).
        images: indices into ``labels`` whose windows are pooled (e.g. a chunk of images, or one).
        num_classes: K, the background label.
        n_fg: foreground windows wanted.
        n_total: windows wanted in all.
        generator: seeded torch.Generator; the draw is a function of its state.
    Returns:
        (selection, n_fg_drawn, n_bg_drawn): ``selection`` lists ``(image, window)`` pairs,
        foreground first, then background.
    """
    fg_pool: list[tuple[int, int]] = []
    bg_pool: list[tuple[int, int]] = []
    for im in images:
        lab = labels[im]
        fg_pool += [(im, j) for j in torch.nonzero((lab >= 0) & (lab < num_classes)).flatten().tolist()]
        bg_pool += [(im, j) for j in torch.nonzero(lab == num_classes).flatten().tolist()]
    fg = _draw(fg_pool, min(n_fg, n_total), generator)
    bg = _draw(bg_pool, n_total - len(fg), generator)
    return fg + bg, len(fg), len(bg)


def _draw(pool: list[tuple[int, int]], n: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``min(n, len(pool))`` entries of ``pool`` uniformly without replacement."""
    if not pool or n <= 0:
        return []
    return [pool[i] for i in torch.randperm(len(pool), generator=generator)[:n].tolist()]
