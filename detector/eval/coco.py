"""COCO-style evaluation of a split with pycocotools (AP over IoU 0.50:0.95, AP50, AP75).

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      N: detections      K: foreground classes

Boxes leave the project's xyxy as COCO ``[x, y, w, h]`` with ``w = x2 - x1`` (no ``+1``), what
COCOeval's IoU assumes.

Ids: records read from a COCO json (``ImageRecord.coco_id`` set) keep their image ids, and the
caller passes the json's category id of each class (``detector.data.coco.category_ids``), so the
results file ``coco_dets.json`` scores against the user's own annotation file with pycocotools. For
VOC data image ids are 1..N in split order and category ids are class id + 1.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from detector.artifacts import write_text
from detector.data.records import ImageRecord
from detector.eval.voc_ap import ClassDetections, per_class_detections

__all__ = ["coco_ground_truth", "coco_detections", "coco_evaluate", "coco_image_ids"]


def coco_image_ids(records: Sequence[ImageRecord]) -> dict[str, int]:
    """The COCO image id of each record: its own ``coco_id`` when every record has one (data read
    from a COCO json), else 1..len(records) in split order."""
    own = [r.coco_id for r in records]
    if records and all(i is not None for i in own):
        if len(set(own)) != len(own):
            raise ValueError("records carry repeated coco_id values; they come from more than one COCO json")
        return {r.image_id: int(r.coco_id) for r in records}  # type: ignore[arg-type]
    return {r.image_id: i for i, r in enumerate(records, start=1)}


def _category_ids(class_names: Sequence[str], category_ids: Sequence[int] | None) -> list[int]:
    if category_ids is None:
        return [k + 1 for k in range(len(class_names))]
    if len(category_ids) != len(class_names) or len(set(category_ids)) != len(category_ids):
        raise ValueError(f"category_ids {list(category_ids)} must give one distinct id per class of {list(class_names)}")
    return [int(c) for c in category_ids]


def coco_ground_truth(records: Sequence[ImageRecord], class_names: Sequence[str],
                      category_ids: Sequence[int] | None = None) -> dict:
    """COCO-format GT dict of a split.

    Image ids are :func:`coco_image_ids` (``file_name`` keeps the record's id); category ids are
    ``category_ids`` (the json's own, one per class) or class id + 1. ``bbox`` is ``[x, y, w, h]`` in the project's continuous pixels (w = x2 - x1,
    what COCOeval's IoU assumes). Difficult objects get ``iscrowd = 1``, so COCOeval ignores them
    (detections matched to them are neither TP nor FP and they are not positives). Unlike VOC,
    COCOeval matches a crowd box by intersection over the *detection's* area, and only after the
    non-crowd GTs, so a detection on a difficult object is not always ignored in the same cases.
    """
    img_id = coco_image_ids(records)
    cat_id = _category_ids(class_names, category_ids)
    images, anns = [], []
    for r in records:
        i = img_id[r.image_id]
        images.append({"id": i, "file_name": r.image_id, "height": r.height, "width": r.width})
        b = r.boxes.to(torch.float64)
        for j in range(b.shape[0]):
            x1, y1, x2, y2 = b[j].tolist()
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_id[int(r.labels[j])],
                         "bbox": [x1, y1, w, h], "area": max(w, 0.0) * max(h, 0.0),
                         "iscrowd": int(bool(r.difficult[j]))})
    cats = [{"id": c, "name": n} for c, n in zip(cat_id, class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_detections(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    detections: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, ClassDetections],
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """COCO results list ``[{image_id, category_id, bbox [x, y, w, h], score}]``.

    ``ClassDetections`` (VOC coordinates) are converted back to xyxy (``x1 - 1, y1 - 1``), the
    exact inverse of ``boxes.xyxy_to_voc``. Image and category ids follow :func:`coco_ground_truth`.
    """
    class_names = tuple(class_names)
    img_id = coco_image_ids(records)
    cat_id = _category_ids(class_names, category_ids)
    per_class = per_class_detections(detections, class_names)
    out = []
    for k, dets in enumerate(per_class):
        for i, s, b in zip(dets.image_ids, dets.scores, dets.voc_boxes):
            if i not in img_id:
                raise ValueError(f"class '{class_names[k]}': detection image '{i}' not in the split")
            x1, y1 = float(b[0]) - 1.0, float(b[1]) - 1.0  # EDGE: inverse of xyxy_to_voc
            out.append({"image_id": img_id[i], "category_id": cat_id[k],
                        "bbox": [x1, y1, float(b[2]) - x1, float(b[3]) - y1], "score": float(s)})
    return out


def coco_evaluate(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    detections: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, ClassDetections],
    *,
    out_dir: str | Path | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """pycocotools COCOeval (bbox) on the split: ``{"AP", "AP50", "AP75"}``.

    AP = mean over IoU 0.50:0.95, AP50 / AP75 at one threshold (COCO's 101-point interpolation and
    at most 100 detections per image, so these differ from the VOC figures by definition). With
    no detections at all every figure is 0. ``out_dir`` also writes ``coco_gt.json`` and
    ``coco_dets.json``. ``category_ids``: the data set's own id of each class (COCO data), else
    1..K. For records read from a COCO json, ``coco_dets.json`` scored by pycocotools against the
    user's own annotation file gives this AP when the file holds exactly these images and classes.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(records, class_names, category_ids)
    dets = coco_detections(records, class_names, detections, category_ids)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for nm, obj in (("coco_gt.json", gt), ("coco_dets.json", dets)):
            write_text(Path(out_dir) / nm, json.dumps(obj))
    if not dets or not gt["annotations"]:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}

