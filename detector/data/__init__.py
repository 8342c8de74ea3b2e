"""Data sets: the Pascal VOC-layout and COCO-json readers, VOC <-> COCO conversion, crop sets for
classifier pre-training, and the embedded ``digits`` set (drawing one image apart from building the
folder).

Modules:
    records        ``ImageRecord`` (what every reader returns) and ``DataError``
    splits         ``load_split(root, split, format=...)``: the reader of a data format
    voc            VOC-layout split -> ``list[ImageRecord]`` (the XML's 1-based boxes converted once)
    coco           COCO-json split -> ``list[ImageRecord]`` (``[x, y, w, h]`` converted once)
    convert        VOC folder <-> COCO json folder (``sppnet convert``)
    crops          object / background crops of a split or an image folder (:class:`CropSet`)
    digits_draw    one ``digits`` image: backgrounds, digit alpha, ink colour, placement
    digits_build   the ``digits`` folder: VOC XML and lists, parallel workers, stamp

The public names below are importable from ``detector.data`` directly. They are resolved on first
use, so importing one module (the digits build's spawned workers import ``digits_build``) does not
import the others and their dependencies (torch, PIL).
"""
from __future__ import annotations

import importlib

# public name -> module of this package that defines it
_EXPORTS = {
    **dict.fromkeys(("ImageRecord", "DataError"), "records"),
    **dict.fromkeys(("FORMATS", "load_split", "split_category_ids"), "splits"),
    **dict.fromkeys(("VOCDataError", "VOC_CLASSES", "read_split_ids", "discover_classes", "load_voc_split"), "voc"),
    **dict.fromkeys(("CocoDataError", "discover_coco_classes", "category_ids", "load_coco_split"), "coco"),
    **dict.fromkeys(("voc_to_coco", "coco_to_voc", "ConversionReport"), "convert"),
    **dict.fromkeys(("CropSet", "sample_object_boxes", "sample_background_boxes", "cut_crops", "cut_native",
                     "crops_from_records", "crops_from_folder", "IMAGE_EXTS"), "crops"),
    **dict.fromkeys(("DIGIT_CLASSES", "BACKGROUNDS", "DigitsParams", "load_backgrounds", "load_digit_images",
                     "compose_image", "draw_image"), "digits_draw"),
    **dict.fromkeys(("DATASET_VERSION", "STAMP_NAME", "DatasetExistsError", "make_digits_dataset",
                     "split_digit_pools"), "digits_build"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'detector.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"detector.data.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
