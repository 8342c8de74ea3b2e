"""VOC folder <-> COCO json folder (``sppnet convert``, ``tools/convert.py``).

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      K: foreground classes

Both directions read the source through the project's own reader with ``raw_boxes=True`` (every box
of a known class exactly as annotated, as the evaluation scores it) and write what the other reader
reads back into the same records:

* :func:`voc_to_coco` writes ``OUT/annotations/instances_<split>.json`` per split and the images
  into ``OUT/images/`` (one folder for every split; an image in several splits is written once and
  keeps one COCO id). ``file_name`` is the VOC image's file name, so the COCO reader's image id is
  the VOC id again; category ids are 1..K in class order; ``difficult`` becomes ``iscrowd``.
* :func:`coco_to_voc` writes ``OUT/Annotations/<id>.xml``, ``OUT/JPEGImages/<id><ext>`` and
  ``OUT/ImageSets/Main/<split>.txt`` (the json's image order); ``iscrowd`` becomes ``<difficult>``.
  Images that are not .jpg/.jpeg/.png (the VOC reader's extensions) are re-encoded as PNG.

Boxes go through the project's xyxy: VOC ``(xmin, ymin, xmax, ymax)`` -> xyxy
``(xmin - 1, ymin - 1, xmax, ymax)`` (``detector.data.voc``'s edge) -> COCO
``[x1, y1, x2 - x1, y2 - y1]``, and back through ``boxes.xyxy_to_voc``. An integer VOC box comes
back exactly (tests/test_convert.py). Coordinates are written as the shortest decimals of the
readers' float32 values (integers as integers), and a COCO width as the exact difference of those
decimals, so ``273.5`` stays ``273.5``.

A VOC box with ``xmax == xmin`` or ``ymax == ymin`` (a single click, which the VOC reader skips as
degenerate for training) is one pixel wide in continuous coordinates: it is converted as that
one-pixel box (the evaluation scores it the same through either reader) and warned about, since the
COCO reader, which only skips boxes of no extent, then trains on it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal, Sequence
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from detector.artifacts import write_text
from detector.boxes import xyxy_to_voc
from detector.data.coco import CocoDataError, discover_coco_classes, load_coco_split
from detector.data.records import DataError, ImageRecord
from detector.data.voc import discover_classes, load_voc_split

__all__ = ["voc_to_coco", "coco_to_voc", "ConversionReport", "ImageMode"]

log = logging.getLogger(__name__)

ImageMode = Literal["copy", "symlink", "none"]  # how images reach OUT: copied, linked, or not at all
_VOC_EXTS = (".jpg", ".jpeg", ".png")  # what detector.data.voc.load_voc_split looks for


@dataclass
class ConversionReport:
    """What a conversion wrote.

    Attributes:
        out: the output folder.
        classes: class names in id order (COCO category ids 1..K for :func:`voc_to_coco`).
        splits: per split, ``{"images", "objects", "difficult", "file"}`` (the list file written).
        images: image files written (copied, linked or re-encoded).
        one_pixel: VOC boxes with xmax == xmin or ymax == ymin converted as one-pixel boxes.
    """

    out: Path
    classes: tuple[str, ...]
    splits: dict[str, dict] = field(default_factory=dict)
    images: int = 0
    one_pixel: int = 0

    def text(self) -> str:
        lines = [f"{s}: {v['images']} images, {v['objects']} objects ({v['difficult']} difficult/crowd) -> {v['file']}"
                 for s, v in self.splits.items()]
        lines.append(f"classes ({len(self.classes)}): {', '.join(self.classes)}")
        lines.append(f"{self.images} image files written under {self.out}")
        if self.one_pixel:
            lines.append(f"{self.one_pixel} VOC single-click box(es) (xmax == xmin or ymax == ymin) written as "
                         f"one-pixel boxes (see the warnings)")
        return "\n".join(lines)


def _dec(v: float) -> Decimal:
    """The shortest decimal that reads back as the same float32 (the readers hold float32 boxes)."""
    return Decimal(str(np.float32(v)))


def _num(d: Decimal) -> int | float:
    return int(d) if d == d.to_integral_value() else float(d)


def _check_out(root: Path, out: Path, splits: Sequence[str]) -> None:
    if not splits:
        raise DataError("no splits to convert")
    if len(set(splits)) != len(splits):
        raise DataError(f"splits listed more than once: {list(splits)}")
    if out.resolve() == root.resolve():
        raise DataError(f"the output folder {out} is the input folder; convert into a new folder")


def _put_image(src: Path, dst: Path, mode: ImageMode) -> bool:
    """Copy or link ``src`` to ``dst`` (replacing what is there); False when ``mode`` is "none"."""
    if mode == "none":
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve() and mode == "symlink":
            return True
        dst.unlink()
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)
    return True


def voc_to_coco(root: str | Path, splits: Sequence[str], out: str | Path, *, classes: Sequence[str] | None = None,
                images: ImageMode = "copy") -> ConversionReport:
    """Convert splits of a VOC folder into a COCO json folder.

    Args:
        root: VOC folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``).
        splits: the splits to convert, e.g. ``["trainval", "test"]``.
        out: output folder: ``annotations/instances_<split>.json`` and ``images/``.
        classes: class names in category-id order (ids 1..K); None = every object name in the
            splits, sorted. Objects of other names are skipped with the VOC reader's warning.
        images: "copy", "symlink" (absolute links) or "none" (annotations only).
    Returns:
        :class:`ConversionReport`.
    Raises:
        VOCDataError: a split that cannot be read (named). DataError: no or repeated splits, or
            ``out`` is ``root``.
    """
    root, out = Path(root), Path(out)
    _check_out(root, out, splits)
    if classes is None:
        classes = tuple(sorted({n for s in splits for n in discover_classes(root, s)}))
    classes = tuple(classes)
    report = ConversionReport(out=out, classes=classes)
    coco_ids: dict[str, int] = {}
    written: set[str] = set()
    cats = [{"id": k + 1, "name": n, "supercategory": "none"} for k, n in enumerate(classes)]
    for split in splits:
        records, _ = load_voc_split(root, split, classes, raw_boxes=True, require_images=images != "none")
        imgs, anns = [], []
        for r in records:
            cid = coco_ids.setdefault(r.image_id, len(coco_ids) + 1)
            imgs.append({"id": cid, "file_name": r.path.name, "width": r.width, "height": r.height})
            for j in range(r.boxes.shape[0]):
                x1, y1, x2, y2 = (_dec(v) for v in r.boxes[j].tolist())
                w, h = x2 - x1, y2 - y1  # EDGE: xyxy -> COCO [x, y, w, h], both continuous pixels
                if w == 1 or h == 1:
                    voc = xyxy_to_voc(r.boxes[j]).tolist()
                    if voc[2] == voc[0] or voc[3] == voc[1]:
                        report.one_pixel += 1
                        log.warning("%s: object %d (%s): VOC box %s has xmax == xmin or ymax == ymin (a single "
                                    "click, skipped by the VOC reader for training); written as the one-pixel "
                                    "COCO box %s, which the COCO reader keeps", root / "Annotations" /
                                    f"{r.image_id}.xml", j, classes[int(r.labels[j])], voc,
                                    [_num(v) for v in (x1, y1, w, h)])
                anns.append({"id": len(anns) + 1, "image_id": cid, "category_id": int(r.labels[j]) + 1,
                             "bbox": [_num(x1), _num(y1), _num(w), _num(h)], "area": _num(max(w, 0) * max(h, 0)),
                             "iscrowd": int(bool(r.difficult[j])), "segmentation": []})
            if r.image_id not in written and _put_image(r.path, out / "images" / r.path.name, images):
                report.images += 1
            written.add(r.image_id)
        path = out / "annotations" / f"instances_{split}.json"
        write_text(path, json.dumps({"info": {"description": f"converted from the VOC folder {root}, split {split}"},
                                     "images": imgs, "annotations": anns, "categories": cats}))
        report.splits[split] = {"images": len(imgs), "objects": len(anns),
                                "difficult": sum(a["iscrowd"] for a in anns), "file": str(path)}
        log.info("%s: %d images, %d objects", path, len(imgs), len(anns))
    return report


def _voc_xml(r: ImageRecord, file_name: str, classes: Sequence[str]) -> str:
    """The VOC annotation of one record (1-based inclusive corners, the inverse of the VOC reader's edge)."""
    objs = []
    voc = xyxy_to_voc(r.boxes)  # (G, 4) EDGE: xyxy -> VOC 1-based inclusive (xmin = x1 + 1, xmax = x2)
    for j in range(r.boxes.shape[0]):
        x1, y1, x2, y2 = (_dec(v) for v in voc[j].tolist())
        objs.append(
            f"\t<object>\n\t\t<name>{escape(classes[int(r.labels[j])])}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>{int(bool(r.difficult[j]))}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{_num(x1)}</xmin>\n\t\t\t<ymin>{_num(y1)}</ymin>\n"
            f"\t\t\t<xmax>{_num(x2)}</xmax>\n\t\t\t<ymax>{_num(y2)}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return (f"<annotation>\n\t<folder>JPEGImages</folder>\n\t<filename>{escape(file_name)}</filename>\n"
            f"\t<size>\n\t\t<width>{r.width}</width>\n\t\t<height>{r.height}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>0</segmented>\n{''.join(objs)}</annotation>\n")


def _voc_image(src: Path, dst_stem: Path, mode: ImageMode) -> tuple[str, bool]:
    """Put the image under ``JPEGImages/<id><ext>`` (extension lower-cased; other formats re-encoded as
    PNG); returns (file name, whether a file was written)."""
    ext = src.suffix.lower()
    if ext in _VOC_EXTS:
        dst = dst_stem.with_name(dst_stem.name + ext)
        return dst.name, _put_image(src, dst, mode)
    dst = dst_stem.with_name(dst_stem.name + ".png")
    if mode == "none":
        return dst.name, False
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Image.open(src) as im:
            im.convert("RGB").save(dst)
    except OSError as e:
        raise CocoDataError(f"{src}: cannot re-encode the image as PNG for the VOC folder: {e}") from None
    return dst.name, True


def coco_to_voc(root: str | Path, splits: Sequence[str], out: str | Path, *, classes: Sequence[str] | None = None,
                images: ImageMode = "copy") -> ConversionReport:
    """Convert splits of a COCO json folder into a VOC folder.

    Args:
        root: COCO folder (``annotations/instances_<split>.json`` and the images, see
            :mod:`detector.data.coco`).
        splits: the splits to convert (``instances_<split>.json`` each).
        out: output folder: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.
        classes: class names to keep; None = every category the splits' annotations use.
        images: "copy", "symlink" or "none" (annotations and split files only).
    Returns:
        :class:`ConversionReport`.
    Raises:
        CocoDataError: a split that cannot be read, or one image annotated differently in two
            splits (named). DataError: no or repeated splits, or ``out`` is ``root``.
    """
    root, out = Path(root), Path(out)
    _check_out(root, out, splits)
    if classes is None:
        classes = tuple(sorted({n for s in splits for n in discover_coco_classes(root, s)}))
    classes = tuple(classes)
    report = ConversionReport(out=out, classes=classes)
    xml_of: dict[str, str] = {}
    for split in splits:
        records, _ = load_coco_split(root, split, classes, raw_boxes=True, require_images=images != "none")
        for r in records:
            ext = r.path.suffix.lower()
            file_name = f"{r.image_id}{ext if ext in _VOC_EXTS else '.png'}"
            xml = _voc_xml(r, file_name, classes)
            if r.image_id in xml_of:
                if xml_of[r.image_id] != xml:
                    raise CocoDataError(f"{root}: image '{r.image_id}' is annotated differently in split '{split}' "
                                        f"than in an earlier split; one VOC annotation cannot hold both")
                continue
            xml_of[r.image_id] = xml
            write_text(out / "Annotations" / f"{r.image_id}.xml", xml)
            _, wrote = _voc_image(r.path, out / "JPEGImages" / r.image_id, images)
            report.images += int(wrote)
        path = out / "ImageSets" / "Main" / f"{split}.txt"
        write_text(path, "".join(f"{r.image_id}\n" for r in records))
        report.splits[split] = {"images": len(records), "objects": sum(int(r.labels.numel()) for r in records),
                                "difficult": sum(int(r.difficult.sum()) for r in records), "file": str(path)}
        log.info("%s: %d images", path, len(records))
    return report
