"""Window labelling and foreground/background sampling for fine-tuning (spec §6).

Shape shorthand:
    R: windows (proposals + GT boxes) in one image      G: ground-truth boxes      K: foreground classes
    B: windows in a mini-batch (128)

Labels follow STYLE.md: foreground ids 0..K-1, background = K, and -1 for windows that are used
neither as foreground nor as background. A window is foreground when its highest IoU with a GT box
is >= 0.5 (label = that GT's class; GT boxes themselves have IoU 1), background when that IoU lies
in [0.1, 0.5). IoU is continuous (``detector.boxes.pairwise_iou``), which equals the spec's +1 IoU
on inclusive pixel boxes (see ``detector.postprocess``).

Mini-batches (spec §6): 128 windows, 25% (32) foreground drawn uniformly without replacement, the
rest background; a batch mixes windows of many images (:class:`MultiImageBatchSampler`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from detector.boxes import pairwise_iou

__all__ = ["label_windows", "sample_fg_bg", "WindowBatch", "MultiImageBatchSampler"]

log = logging.getLogger(__name__)


def label_windows(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    fg_iou: float = 0.5,
    bg_low: float = 0.1,
    bg_high: float = 0.5,
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


def sample_fg_bg(
    labels: Tensor,
    num_classes: int,
    batch_size: int = 128,
    fg_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of one mini-batch: foreground uniformly without replacement, background fills the rest.

    ``n_fg = min(round(batch_size * fg_fraction), #fg)``; ``n_bg = min(batch_size - n_fg, #bg)``.
    With fewer foreground windows than the quota the batch takes more background; with too few
    windows overall the batch is shorter than ``batch_size`` (no window is repeated).

    Args:
        labels (Tensor[R] int64): from :func:`label_windows` (0..K-1 fg, K bg, -1 unused).
        num_classes: K.
        batch_size: B.
        fg_fraction: foreground share (0.25 = 32 of 128).
        generator: seeded torch.Generator for reproducible draws.
    Returns:
        Tensor[B'] int64 (B' <= B): foreground indices first, then background.
    """
    if labels.ndim != 1:
        raise ValueError(f"sample_fg_bg expects labels [R], got {tuple(labels.shape)}")
    fg_idx = torch.nonzero((labels >= 0) & (labels < num_classes)).flatten()  # (#fg,)
    bg_idx = torch.nonzero(labels == num_classes).flatten()  # (#bg,)
    n_fg = min(int(round(batch_size * fg_fraction)), fg_idx.numel())
    n_bg = min(batch_size - n_fg, bg_idx.numel())
    fg_pick = fg_idx[torch.randperm(fg_idx.numel(), generator=generator)[:n_fg]]
    bg_pick = bg_idx[torch.randperm(bg_idx.numel(), generator=generator)[:n_bg]]
    return torch.cat([fg_pick, bg_pick])  # (B',)


@dataclass
class WindowBatch:
    """One mini-batch of windows drawn from many images.

    Attributes:
        image_index (Tensor[B] int64): index into the sampler's image list.
        window_index (Tensor[B] int64): row of that image's window list.
        labels (Tensor[B] int64): 0..K-1 foreground, K background.
    """

    image_index: Tensor
    window_index: Tensor
    labels: Tensor


def _draw(n_pool: int, n_need: int, generator: torch.Generator | None) -> Tensor:
    """n_need indices into a pool of n_pool: without replacement when the pool is large enough,
    else whole shuffled passes over the pool followed by a partial one (each window used
    floor or ceil(n_need / n_pool) times)."""
    if n_pool == 0 or n_need == 0:
        return torch.zeros(0, dtype=torch.int64)
    reps = math.ceil(n_need / n_pool)
    return torch.cat([torch.randperm(n_pool, generator=generator) for _ in range(reps)])[:n_need]  # (n_need,)


class MultiImageBatchSampler:
    """Mini-batches that mix windows of many images, built a chunk of batches at a time (spec §6).

    For each chunk of ``chunk_batches`` batches: shuffle the images and take images until their
    foreground and background windows each reach ``pool_factor`` times what the chunk needs (or the
    images run out); draw the needed foreground and background windows uniformly from that pool
    without replacement (with whole extra passes when the pool is smaller than the need, e.g. on
    tiny data sets), shuffle, and split into batches of exactly ``round(B * fg_fraction)``
    foreground and ``B - that`` background windows. (The spec shuffles fg and bg together before
    splitting, so its per-batch fraction only averages 25%; here every batch has exactly 25%.)
    If no image has a foreground window the batches are all background (warned once); if there is
    no background window at all they are all foreground.

    Args:
        labels_per_image: one Tensor[R_i] int64 per image (from :func:`label_windows`).
        num_classes: K.
        batch_size: B (128).
        fg_fraction: 0.25.
        chunk_batches: batches planned together (500).
        pool_factor: pool size relative to the chunk's need (10).
        generator: seeded torch.Generator.
    Iterating yields :class:`WindowBatch` forever; use ``itertools.islice`` or :meth:`next_batch`.
    """

    def __init__(
        self,
        labels_per_image: Sequence[Tensor],
        num_classes: int,
        batch_size: int = 128,
        fg_fraction: float = 0.25,
        chunk_batches: int = 500,
        pool_factor: float = 10.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(labels_per_image) == 0:
            raise ValueError("MultiImageBatchSampler needs at least one image")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.chunk_batches = chunk_batches
        self.pool_factor = pool_factor
        self.generator = generator
        self._fg: list[Tensor] = []
        self._bg: list[Tensor] = []
        for lab in labels_per_image:
            if lab.ndim != 1:
                raise ValueError(f"labels_per_image entries must be Tensor[R], got {tuple(lab.shape)}")
            self._fg.append(torch.nonzero((lab >= 0) & (lab < num_classes)).flatten())  # (#fg_i,)
            self._bg.append(torch.nonzero(lab == num_classes).flatten())  # (#bg_i,)
        self._labels = [lab.to(torch.int64) for lab in labels_per_image]
        sizes = torch.tensor([lab.numel() for lab in self._labels], dtype=torch.int64)  # (I,)
        self._offsets = torch.cumsum(sizes, 0) - sizes  # (I,) start of each image in _flat_labels
        self._flat_labels = torch.cat(self._labels)  # (sum R_i,)
        total_fg = sum(f.numel() for f in self._fg)
        total_bg = sum(b.numel() for b in self._bg)
        if total_fg + total_bg == 0:
            raise ValueError("MultiImageBatchSampler: no foreground or background window in any image")
        n_fg = int(round(batch_size * fg_fraction))
        if total_fg == 0:
            log.warning("no foreground windows in %d images: batches are all background", len(labels_per_image))
            n_fg = 0
        if total_bg == 0:
            log.warning("no background windows in %d images: batches are all foreground", len(labels_per_image))
            n_fg = batch_size
        self.fg_per_batch = n_fg
        self.bg_per_batch = batch_size - n_fg
        self._queue: list[WindowBatch] = []

    def _pool(self, order: Tensor, which: list[Tensor], need: int) -> tuple[Tensor, Tensor]:
        """(image_index, window_index) of all windows of the first images in ``order`` whose count
        reaches ``need`` (or all images)."""
        counts = torch.tensor([which[i].numel() for i in order.tolist()], dtype=torch.int64)  # (I,)
        cum = torch.cumsum(counts, 0)
        reached = torch.nonzero(cum >= need).flatten()  # (I',)
        n_img = int(reached[0]) + 1 if reached.numel() else len(order)
        imgs = order[:n_img].tolist()
        img_idx = torch.cat([torch.full((which[i].numel(),), i, dtype=torch.int64) for i in imgs])  # (P,)
        win_idx = torch.cat([which[i] for i in imgs])  # (P,)
        return img_idx, win_idx

    def _refill(self) -> None:
        nb = self.chunk_batches
        order = torch.randperm(len(self._labels), generator=self.generator)
        parts = []
        for which, per_batch in ((self._fg, self.fg_per_batch), (self._bg, self.bg_per_batch)):
            need = nb * per_batch
            img_idx, win_idx = self._pool(order, which, int(math.ceil(self.pool_factor * need)))
            pick = _draw(img_idx.numel(), need, self.generator)  # (need,)
            parts.append((img_idx[pick].view(nb, per_batch), win_idx[pick].view(nb, per_batch)))  # (nb, per_batch)
        (fi, fw), (bi, bw) = parts
        img = torch.cat([fi, bi], dim=1)  # (nb, B)
        win = torch.cat([fw, bw], dim=1)  # (nb, B)
        perm = torch.argsort(torch.rand(nb, self.batch_size, generator=self.generator), dim=1)  # (nb, B)
        img = torch.gather(img, 1, perm)  # (nb, B) shuffled inside each batch
        win = torch.gather(win, 1, perm)  # (nb, B)
        lab = self._flat_labels[self._offsets[img] + win]  # (nb, B)
        for b in range(nb):
            self._queue.append(WindowBatch(img[b], win[b], lab[b]))
        self._queue.reverse()

    def next_batch(self) -> WindowBatch:
        """The next mini-batch (a new chunk is planned when the current one is used up)."""
        if not self._queue:
            self._refill()
        return self._queue.pop()

    def __iter__(self) -> Iterator[WindowBatch]:
        while True:
            yield self.next_batch()
