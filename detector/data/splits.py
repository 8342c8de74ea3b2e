"""One entry point for reading a split, whatever the data set's layout (``data.format``).

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      K: foreground classes

``"voc"``: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt`` (:mod:`detector.data.voc`);
``"coco"``: ``annotations/instances_<split>.json`` and an image folder (:mod:`detector.data.coco`).
Both give the same :class:`~detector.data.records.ImageRecord` list, so everything after the reader
(proposals, pre-training crops, training, evaluation) is the same for both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from detector.data.records import ImageRecord

__all__ = ["FORMATS", "load_split", "split_category_ids"]

FORMATS = ("voc", "coco")  # detector.config.DataConfig.format
Format = Literal["voc", "coco"]


def load_split(
    root: str | Path,
    split: str,
    class_names: Sequence[str] | None = None,
    *,
    format: Format = "voc",
    raw_boxes: bool = False,
    require_images: bool = True,
    log_summary: bool = True,
) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """Every image of a split, read by the reader of ``format``.

    Args:
        root: the data set's folder.
        split: split name (``ImageSets/Main/<split>.txt`` or ``annotations/instances_<split>.json``).
        class_names: foreground names in id order; None = every name the split's annotations use,
            sorted.
        format: "voc" or "coco".
        raw_boxes: keep boxes exactly as annotated (what the evaluation scores); training uses False.
        require_images: False reads the annotations alone (scoring does not need the pictures).
        log_summary: log the reader's one-line summary.
    Returns:
        (records, class_names), see :func:`detector.data.voc.load_voc_split`.
    Raises:
        VOCDataError / CocoDataError (both ``DataError``): a split that cannot be read (named).
        ValueError: an unknown format.
    """
    if format == "voc":
        from detector.data.voc import load_voc_split

        return load_voc_split(root, split, class_names, raw_boxes=raw_boxes, require_images=require_images,
                              log_summary=log_summary)
    if format == "coco":
        from detector.data.coco import load_coco_split

        return load_coco_split(root, split, class_names, raw_boxes=raw_boxes, require_images=require_images,
                               log_summary=log_summary)
    raise ValueError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")


def split_category_ids(root: str | Path, split: str, class_names: Sequence[str], *,
                       format: Format = "voc") -> tuple[int, ...] | None:
    """The COCO category id of each class when the split came from a COCO json (its own ids, by
    name: :func:`detector.data.coco.category_ids`), else None (COCO results then number classes 1..K)."""
    if format == "coco":
        from detector.data.coco import category_ids

        return category_ids(root, split, class_names)
    if format != "voc":
        raise ValueError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    return None
