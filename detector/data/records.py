"""What every data-set reader returns: one :class:`ImageRecord` per image, and the error they raise.

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      K: foreground classes

The VOC reader (:mod:`detector.data.voc`) and the COCO reader (:mod:`detector.data.coco`) both turn a
split into ``list[ImageRecord]`` in the project's box convention (``detector.boxes``); everything
downstream (proposals, training, evaluation) sees only these records.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ImageRecord", "DataError"]


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
