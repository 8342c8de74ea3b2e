"""What every data-set reader returns: one :class:`ImageRecord` per image, and the error they raise.

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      K: foreground classes

The VOC reader (:mod:`detector.data.voc`) and the COCO reader (:mod:`detector.data.coco`) both turn a
split into ``list[ImageRecord]`` in the project's box convention (``detector.boxes``); everything
downstream (proposals, training, evaluation) sees only these records.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from detector.boxes import clip_boxes, valid_boxes_mask

__all__ = ["ImageRecord", "DataError", "class_index", "known_class", "fit_boxes_to_image"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set that cannot be read as asked (missing files, unreadable annotations, a bad split).
    Each reader has its own subclass (``VOCDataError``, ``CocoDataError``); the message names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        image_id: the id as listed in the split file (VOC), or the image's file name without its
            extension (COCO); keys proposals, detections and result files.
        path: the image file.
        height, width: image size in pixels.
        boxes (Tensor[G, 4]): float32 xyxy, 0-based continuous pixels of the original image.
        labels (Tensor[G] int64): ids into the ``class_names`` returned beside the records.
        difficult (Tensor[G] bool): the VOC ``difficult`` flag, or COCO ``iscrowd``: ignored by the
            evaluation, treated alike in training.
        coco_id: the image's ``id`` in its COCO json (None for VOC data); COCO results keep it.
    """

    image_id: str
    path: Path
    height: int
    width: int
    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor
    coco_id: int | None = None


def class_index(class_names: Sequence[str],
                error: type[DataError] = DataError) -> tuple[tuple[str, ...], dict[str, int]]:
    """``class_names`` as a tuple, and each name's label id (its position).

    Raises:
        error: a name is repeated (the reader's own ``DataError`` subclass).
    """
    names = tuple(class_names)
    if len(set(names)) != len(names):
        raise error(f"class_names has duplicates: {names}")
    return names, {name: k for k, name in enumerate(names)}


def known_class(name: str, index: dict[str, int], what: str, item: str, counts: Counter,
                unknown_names: Counter) -> bool:
    """Whether ``name`` is in the class list; an unknown one is warned about (naming ``what``),
    counted and skipped by the caller. ``item`` is the reader's word for an annotation."""
    if name in index:
        return True
    counts["unknown class skipped"] += 1
    unknown_names[name] += 1
    log.warning("%s: class %r not in the class list; %s skipped", what, name, item)
    return False


def fit_boxes_to_image(
    boxes: torch.Tensor,
    annotated: Sequence[list[float]],
    whats: Sequence[str],
    width: int,
    height: int,
    raw_boxes: bool,
    counts: Counter,
    box_format: str,
    unit: str,
    scorer: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's annotated boxes that reach beyond it: kept and warned (``raw_boxes``, as the
    evaluation scores them), else clipped to the image or, where nothing is left, dropped; each
    case is warned naming the annotation and counted in ``counts``.

    Args:
        boxes (Tensor[G, 4]): xyxy (``detector.boxes``) of the annotations.
        annotated: each box as written in the file (for the messages); whats: each annotation's name.
        width, height: the image's size.
        raw_boxes: keep the boxes as annotated.
        counts: the reader's fix counters ("box clipped to image", "degenerate box skipped").
        box_format: how the file writes boxes ("VOC", "COCO x,y,w,h"); unit: "object" / "annotation";
        scorer: who scores raw boxes ("the devkit", "the evaluation").
    Returns:
        (Tensor[G', 4] the boxes to use, Tensor[G] bool which annotations they are).
    """
    beyond = ((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height))  # (G,)
    keep = torch.ones(boxes.shape[0], dtype=torch.bool)  # (G,)
    if raw_boxes:
        for j in torch.nonzero(beyond).flatten().tolist():
            log.warning("%s: box %s (%s) extends beyond the %dx%d image; kept as annotated (raw_boxes: as %s "
                        "scores it)", whats[j], annotated[j], box_format, width, height, scorer)
        return boxes, keep
    if not bool(beyond.any()):
        return boxes, keep
    clipped = clip_boxes(boxes, height, width)  # (G, 4)
    keep = valid_boxes_mask(clipped)  # (G,)
    for j in torch.nonzero(beyond).flatten().tolist():
        if keep[j]:
            counts["box clipped to image"] += 1
            log.warning("%s: box %s (%s) extends beyond the %dx%d image; clipped to xyxy %s", whats[j],
                        annotated[j], box_format, width, height, [round(v, 3) for v in clipped[j].tolist()])
        else:
            counts["degenerate box skipped"] += 1
            log.warning("%s: box %s (%s) lies outside the %dx%d image; %s skipped", whats[j], annotated[j],
                        box_format, width, height, unit)
    return clipped[keep], keep
