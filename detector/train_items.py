"""Training items: one image (or its horizontal mirror) with its ground truth and proposals.

Shape shorthand:
    R: proposals in one image      G: ground-truth boxes

Fine-tuning, feature statistics, SVM mining and box regression all walk lists of items; the conv5
maps of an item come from the conv5 cache through a ``load_pyramid(item)`` callable. The windows
of an item are its GT boxes first, then its proposals (:func:`candidates`), so GT boxes are
foreground windows of fine-tuning and regression samples (spec §6, §8).

:func:`make_items` gives each item the split's proposal mapping rather than its boxes: an item
reads (and for a mirror, flips) its proposals when asked, so a list of items holds no boxes and the
memory of the stages that walk it does not grow with the data set (the proposal stage's mapping
reads them from its file, :class:`proposals.store.NpzProposals`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from detector.boxes import hflip_boxes
from detector.data.voc import ImageRecord

__all__ = ["TrainItem", "make_items", "candidates"]


@dataclass(frozen=True)
class TrainItem:
    """One training image (or its mirror) with ground truth and proposals in its own frame.

    Attributes:
        record: the annotation of the original image.
        flipped: True for the horizontally mirrored copy.
        gt_boxes (Tensor[G, 4]): xyxy in this item's frame.
        gt_labels (Tensor[G] int64), gt_difficult (Tensor[G] bool).
        source: the proposals, either as Tensor[R, 4] xyxy in this item's frame, or as the split's
            mapping image id -> ndarray [R, 4] xyxy in the original image's frame, read (and
            mirrored for a flipped item) on each access of :attr:`proposals`.
    """

    record: ImageRecord
    flipped: bool
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_difficult: torch.Tensor
    source: torch.Tensor | Mapping[str, np.ndarray]

    @property
    def proposals(self) -> torch.Tensor:
        """Tensor[R, 4] float32 xyxy in this item's frame."""
        if isinstance(self.source, torch.Tensor):
            return self.source
        boxes = torch.as_tensor(np.asarray(self.source[self.record.image_id], dtype=np.float32)).reshape(-1, 4)  # (R, 4)
        return hflip_boxes(boxes, self.record.width) if self.flipped else boxes

    @property
    def key(self) -> tuple[str, bool]:
        """(image id, flipped): the item's conv5 cache entry."""
        return (self.record.image_id, self.flipped)


def make_items(records: Sequence[ImageRecord], proposals: Mapping[str, np.ndarray], flips: bool) -> list[TrainItem]:
    """Training items for ``records`` (each followed by its mirror when ``flips``, spec §2, §6).

    The items keep ``proposals`` itself and read their boxes from it on access (see
    :class:`TrainItem`), so the mapping must stay unchanged while they are used.

    Args:
        records: annotated images.
        proposals: image id -> float32 [R, 4] xyxy.
        flips: add the mirrored copy of every image.
    Raises:
        KeyError: an image without proposals (named).
    """
    items = []
    for rec in records:
        if rec.image_id not in proposals:
            raise KeyError(f"no proposals for image '{rec.image_id}'")
        items.append(TrainItem(rec, False, rec.boxes, rec.labels, rec.difficult, proposals))
        if flips:
            items.append(TrainItem(rec, True, hflip_boxes(rec.boxes, rec.width), rec.labels, rec.difficult,
                                   proposals))
    return items


def candidates(item: TrainItem) -> torch.Tensor:
    """The item's windows, GT boxes first, then proposals: Tensor[G + R, 4] xyxy."""
    return torch.cat([item.gt_boxes, item.proposals], dim=0)  # (G+R, 4)
