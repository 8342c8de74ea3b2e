"""Which images a run trains, holds out and tests on (the split policy, in one place).

``data.train_split`` (its first ``data.max_train_images`` when set) is the training list. The
held-out list is ``data.val_split`` when set, else ``data.val_fraction`` of the training list
chosen with ``seed`` (:func:`split_train_val`); held-out images are never fine-tuned on and serve
every model selection and ``test_net.py --held-out``. Pre-training crops, fine-tuning and the
held-out report all use this one policy.

Every split of a run is read by :func:`read_split`, which picks the reader by ``data.format``
(VOC folder or COCO json, :mod:`detector.data.splits`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from detector.config import Config
from detector.data.records import ImageRecord
from detector.data.splits import load_split, split_category_ids

__all__ = ["TrainingData", "training_data", "split_train_val", "test_records", "read_split", "category_ids"]


def read_split(cfg: Config, split: str, class_names: Sequence[str] | None, raw_boxes: bool = False
               ) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """The images of ``split`` of ``cfg.data`` (``root`` read as ``format`` says) and the class names.

    Raises:
        detector.data.records.DataError: a split that cannot be read (the file is named).
    """
    return load_split(cfg.data.root, split, class_names, format=cfg.data.format, raw_boxes=raw_boxes)


def category_ids(cfg: Config, split: str, class_names: Sequence[str]) -> tuple[int, ...] | None:
    """The data set's own COCO category id of each class when ``data.format`` is "coco" (COCO results
    keep them), else None."""
    return split_category_ids(cfg.data.root, split, class_names, format=cfg.data.format)


def split_train_val(records: Sequence[ImageRecord], fraction: float, seed: int
                    ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out ``fraction`` of the images (at least one) for model selection, chosen with ``seed``."""
    n = len(records)
    if n < 2 or fraction <= 0:
        return list(records), []
    g = np.random.default_rng(seed)
    n_val = max(1, int(round(fraction * n)))
    val_idx = set(g.permutation(n)[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]


@dataclass(frozen=True)
class TrainingData:
    """The training images of a run.

    Attributes:
        train: the training list (SVMs and box regression use it, without flips).
        finetune: ``train`` minus the held-out images (fine-tuning and pre-training crops).
        held_out: images kept out of fine-tuning for model selection.
        class_names: K foreground names (label ids index into it).
    """

    train: list[ImageRecord]
    finetune: list[ImageRecord]
    held_out: list[ImageRecord]
    class_names: tuple[str, ...]

    def with_proposals(self) -> list[ImageRecord]:
        """Every image whose proposals training computes (training list, then held-out images not
        in it), in the order that keys the proposal file."""
        out = {r.image_id: r for r in list(self.train) + list(self.held_out)}
        return list(out.values())


def training_data(cfg: Config, raw_boxes: bool = False, class_names: Sequence[str] | None = None) -> TrainingData:
    """The training, fine-tuning and held-out images of ``cfg``.

    Args:
        raw_boxes: load the annotations as the evaluation reads them (``raw_boxes`` of the readers).
        class_names: label ids (default ``data.classes``, else every name in the split, sorted).
    Raises:
        detector.data.records.DataError: a split that cannot be read (the file is named).
    """
    dc = cfg.data
    train, classes = read_split(cfg, dc.train_split, class_names or dc.classes or None, raw_boxes=raw_boxes)
    if dc.max_train_images:
        train = train[: dc.max_train_images]
    if dc.val_split:
        held, _ = read_split(cfg, dc.val_split, classes, raw_boxes=raw_boxes)
        held_ids = {r.image_id for r in held}
        finetune = [r for r in train if r.image_id not in held_ids]
    else:
        finetune, held = split_train_val(train, dc.val_fraction, cfg.seed)
    return TrainingData(list(train), list(finetune), list(held), tuple(classes))


def test_records(cfg: Config, split: str, class_names: Sequence[str]) -> tuple[list[ImageRecord], int]:
    """The images of ``split`` as the evaluation scores them (annotations as written), cut to
    ``data.max_test_images`` when set; returns (records, number of images in the split)."""
    records, _ = read_split(cfg, split, class_names, raw_boxes=True)
    n = len(records)
    if cfg.data.max_test_images:
        records = records[: cfg.data.max_test_images]
    return records, n
