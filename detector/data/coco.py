"""COCO-json reader: one split -> ``list[ImageRecord]``, the same records as the VOC reader gives.

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      K: foreground classes

The layout read is the one CVAT, Label Studio and Roboflow exports (and COCO itself) use::

    ROOT/annotations/instances_<split>.json
    ROOT/<split>/<file_name>            images, first folder that holds the file, in this order:
    ROOT/images/<split>/<file_name>       (COCO 2017 puts them in ROOT/train2017/, CVAT in
    ROOT/images/<file_name>               ROOT/images/, Label Studio writes file names such as
    ROOT/<file_name>                      "images/x.jpg", relative to ROOT)

Every image listed in the json's ``images`` is in the split, in file order; an image without
annotations has ``G = 0``. ``ImageRecord.image_id`` is the file name without its folder and extension
(what a VOC folder converted with ``detector.data.convert.voc_to_coco`` had as its id; whitespace
becomes ``_`` so result files stay parseable) and ``ImageRecord.coco_id`` keeps the json's image
``id``, so COCO results can be scored against the user's own file. Categories map to classes by
name: ``class_names`` in id order, else every category name used by the split's annotations, sorted
(as the VOC reader sorts the names it finds). :func:`category_ids` gives the json's category id of
each class, for the results file.

Boxes leave this module as float32 xyxy, 0-based, continuous (``detector.boxes``); COCO's
``[x, y, w, h]`` is already continuous pixels, and is converted in exactly one place,
:func:`_coco_boxes_to_xyxy`.

Crowd boxes (``iscrowd: 1``) are kept with ``difficult = True``, so they are handled exactly as VOC
"difficult" objects: the evaluation ignores them (neither true nor false positives, not counted in
recall), pre-training crops and proposal recall leave them out, and training treats them as it
treats VOC difficult objects.

Annotation quirks are handled as the VOC reader handles them (every warning names the file and the
annotation, and the summary line at the end counts each kind):

* degenerate box (``w <= 0`` or ``h <= 0``: no extent between the annotated corners) -> skipped;
* box beyond the image -> clipped to the image (a box left with no area is skipped as degenerate);
* category not in ``class_names`` (or a ``category_id`` the json does not define) -> skipped;
* ``iscrowd`` missing or not a number -> 0;
* image ``width``/``height`` missing or unusable -> read from the image with PIL;
* ``bbox`` missing or not four finite numbers -> skipped;
* an annotation whose ``image_id`` is not among the json's images -> skipped;
* images whose file is missing -> :class:`CocoDataError` naming them (never silently dropped);
* a file that is not valid json or not COCO (no ``images`` list, entries without ``id`` /
  ``file_name`` / ``name``), two images with one ``id`` or one id after the file name is cut to its
  stem, two categories with one ``id`` or one ``name`` -> :class:`CocoDataError` naming the file.

``raw_boxes=True`` keeps every box of a known class exactly as annotated (no clipping, no skipping
of degenerate boxes; still warned): what the evaluation scores against. ``require_images=False``
loads a split from its json alone.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from detector.data.records import DataError, ImageRecord, class_index, fit_boxes_to_image, known_class

__all__ = ["CocoDataError", "annotation_file", "image_folders", "discover_coco_classes", "category_ids",
           "load_coco_split"]

log = logging.getLogger(__name__)

# summary-line keys, in print order (the VOC reader's kinds, in COCO's words)
_KINDS = (
    "degenerate box skipped",
    "box clipped to image",
    "unknown class skipped",
    "missing iscrowd set to 0",
    "size read from image",
    "bad bbox skipped",
    "annotation of an unlisted image skipped",
)


class CocoDataError(DataError):
    """A COCO json data set that cannot be read as asked (missing or broken json, missing images)."""


def annotation_file(root: str | Path, split: str) -> Path:
    """``ROOT/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_folders(root: str | Path, split: str) -> list[Path]:
    """The folders searched for a split's images, in order (see the module docstring)."""
    root = Path(root)
    return [root / split, root / "images" / split, root / "images", root]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _names(items: Sequence[Any], limit: int = 10) -> str:
    return ", ".join(str(i) for i in items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _read(root: Path, split: str) -> tuple[Path, list[dict], list[dict], dict[int, str]]:
    """(json path, images, annotations, {category id: name}) of a split, checked for COCO structure."""
    path = annotation_file(root, split)
    if not path.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("instances_*.json")) if (
            root / "annotations").is_dir() else []
        raise CocoDataError(f"COCO annotation file not found: {path} (split '{split}' under {root}; "
                            + (f"found {', '.join(found)})" if found else "no annotations/instances_*.json there)"))
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CocoDataError(f"unreadable COCO json {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoDataError(f"{path}: not a COCO annotation file (no top-level 'images' list)")
    images = data["images"]
    anns = data.get("annotations", [])
    cats = data.get("categories", [])
    if not isinstance(anns, list) or not isinstance(cats, list):
        raise CocoDataError(f"{path}: 'annotations' and 'categories' must be lists")
    if not images:
        raise CocoDataError(f"{path}: the file lists no images (split '{split}' under {root})")
    bad = [j for j, im in enumerate(images) if not (isinstance(im, dict) and _is_int(im.get("id"))
                                                     and isinstance(im.get("file_name"), str) and im["file_name"])]
    if bad:
        raise CocoDataError(f"{path}: images[{bad[0]}] needs an integer 'id' and a 'file_name' "
                            f"({len(bad)} such image entries)")
    dups = [i for i, n in Counter(im["id"] for im in images).items() if n > 1]
    if dups:
        raise CocoDataError(f"{path}: {len(dups)} image id(s) listed more than once: {_names(sorted(dups))}")
    bad = [j for j, c in enumerate(cats) if not (isinstance(c, dict) and _is_int(c.get("id"))
                                                   and isinstance(c.get("name"), str) and c["name"])]
    if bad:
        raise CocoDataError(f"{path}: categories[{bad[0]}] needs an integer 'id' and a 'name'")
    for key in ("id", "name"):
        dups = [v for v, n in Counter(c[key].strip() if key == "name" else c[key] for c in cats).items() if n > 1]
        if dups:
            raise CocoDataError(f"{path}: category {key}(s) used by more than one category: {_names(dups)} "
                                f"(classes map to categories by name)")
    bad = [j for j, a in enumerate(anns) if not isinstance(a, dict)]
    if bad:
        raise CocoDataError(f"{path}: annotations[{bad[0]}] is not an object")
    return path, images, anns, {c["id"]: c["name"].strip() for c in cats}


def _image_id(file_name: str) -> str:
    """The record id of an image: its file name without folder and extension, whitespace -> '_'."""
    return re.sub(r"\s", "_", Path(file_name.replace("\\", "/")).stem)


def discover_coco_classes(root: str | Path, split: str) -> tuple[str, ...]:
    """Every category name used by an annotation of the split (of a listed image), sorted.

    Sorted so the order (and so the label ids) is stable for a given data set; categories without
    annotations (Roboflow's super-category entry) are not classes.

    Raises:
        CocoDataError: missing or broken json (named).
    """
    _, images, anns, cats = _read(Path(root), split)
    listed = {im["id"] for im in images}
    return tuple(sorted({cats[a["category_id"]] for a in anns
                         if a.get("image_id") in listed and a.get("category_id") in cats}))


def category_ids(root: str | Path, split: str, class_names: Sequence[str]) -> tuple[int, ...]:
    """The json's category id of each class (by name), for results scored against that json.

    A class with no category of its name gets an id after the largest one (its detections then
    match nothing in the user's file, and pycocotools ignores ids it does not know).

    Raises:
        CocoDataError: missing or broken json (named).
    """
    _, _, _, cats = _read(Path(root), split)
    by_name = {name: i for i, name in cats.items()}
    nxt = max(cats, default=0) + 1
    out = []
    for name in class_names:
        if name not in by_name:
            by_name[name] = nxt
            nxt += 1
        out.append(by_name[name])
    return tuple(out)


def _coco_boxes_to_xyxy(coco_boxes: list[list[float]]) -> torch.Tensor:
    """EDGE: COCO ``[x, y, w, h]`` -> project xyxy.

    COCO boxes are already continuous, 0-based pixels (the top-left corner and the extent, no
    ``+1``), so the only change is ``x2 = x + w``, ``y2 = y + h``; computed in float64, then float32.
    """
    if not coco_boxes:
        return torch.zeros((0, 4), dtype=torch.float32)
    b = torch.tensor(coco_boxes, dtype=torch.float64)  # (G, 4) x, y, w, h
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1).to(torch.float32)  # (G, 4) xyxy


def _find_images(root: Path, split: str, images: list[dict], path: Path, need: bool) -> list[Path]:
    """The file of each image (first folder of :func:`image_folders` holding it); raises naming the
    missing ones when ``need``."""
    folders = [d for d in image_folders(root, split) if d.is_dir()] or [root / split]
    out, missing = [], []
    for im in images:
        cands = [d / im["file_name"] for d in folders]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            missing.append(im["file_name"])
            found = cands[0]
        out.append(found)
    if missing and need:
        raise CocoDataError(
            f"{path}: {len(missing)} image(s) not found in {', '.join(str(d) for d in image_folders(root, split))} "
            f"(searched in this order); no image is dropped silently: {_names(missing)}")
    return out


def _image_size(im: dict, image_path: Path, path: Path, counts: Counter) -> tuple[int, int]:
    w, h = im.get("width"), im.get("height")
    if _is_int(w) and _is_int(h) and w > 0 and h > 0:
        return h, w
    try:
        with Image.open(image_path) as pic:
            w2, h2 = pic.size
    except OSError as e:
        raise CocoDataError(f"{path}: image {im['id']} ({im['file_name']}): width/height missing or unusable "
                            f"and the image {image_path} cannot be read: {e}") from None
    counts["size read from image"] += 1
    log.warning("%s: image %s (%s): width/height missing or unusable (width=%r, height=%r); read %dx%d from "
                "the image", path, im["id"], im["file_name"], w, h, w2, h2)
    return h2, w2


def _read_annotation(a: dict, what: str, cats: dict[int, str], index: dict[str, int], raw_boxes: bool,
                     counts: Counter, unknown_names: Counter) -> tuple[list[float], int, bool, str] | None:
    """One annotation -> (COCO x,y,w,h box, class id, iscrowd, its name for messages), or None where
    it is skipped (warned and counted)."""
    cat = a.get("category_id")
    name = cats[cat] if cat in cats else f"<undefined category_id {cat!r}>"
    if not known_class(name, index, what, "annotation", counts, unknown_names):
        return None
    b = a.get("bbox")
    if not (isinstance(b, list) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
        counts["bad bbox skipped"] += 1
        log.warning("%s (%s): bbox %r is not four finite numbers [x, y, w, h]; annotation skipped",
                    what, name, b)
        return None
    c = a.get("iscrowd")
    if isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c):
        is_crowd = c != 0
    elif isinstance(c, bool):
        is_crowd = c
    else:
        counts["missing iscrowd set to 0"] += 1
        log.warning("%s (%s): iscrowd %s; set to 0", what, name,
                    "missing" if c is None else f"{c!r} is not a number")
        is_crowd = False
    if b[2] <= 0 or b[3] <= 0:
        if raw_boxes:
            log.warning("%s (%s): degenerate box x,y,w,h=%s; kept as annotated (raw_boxes: as the "
                        "evaluation scores it)", what, name, b)
        else:
            counts["degenerate box skipped"] += 1
            log.warning("%s (%s): degenerate box x,y,w,h=%s; annotation skipped", what, name, b)
            return None
    return [float(v) for v in b], index[name], is_crowd, f"{what} ({name})"


def load_coco_split(
    root: str | Path,
    split: str,
    class_names: Sequence[str] | None = None,
    *,
    log_summary: bool = True,
    raw_boxes: bool = False,
    require_images: bool = True,
) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """Read every image of ``ROOT/annotations/instances_<split>.json``, in the json's order.

    Category names are matched after ``strip()``, as the VOC reader matches XML names.

    Args:
        root: folder with ``annotations/`` and the image folders (module docstring).
        split: split name (``instances_<split>.json``).
        class_names: foreground names in id order; None = every category name the split's
            annotations use, sorted (:func:`discover_coco_classes`). Annotations of other
            categories are skipped with a warning.
        log_summary: log one INFO line counting images, objects and each kind of fix.
        raw_boxes: keep boxes exactly as annotated (no clipping, degenerate boxes kept); for
            evaluation only.
        require_images: False lets a split load without its image files (scoring needs only the
            json): ``path`` is then where the image would be, and the size must come from the json.
    Returns:
        (records, class_names): one :class:`ImageRecord` per listed image (none dropped), and the
        class names used for ``labels``.
    Raises:
        CocoDataError: missing or broken json, images whose files are missing (all named), ids
            that collide, duplicates in ``class_names``.
    """
    root = Path(root)
    if class_names is None:
        class_names = discover_coco_classes(root, split)
    class_names, index = class_index(class_names, CocoDataError)
    path, images, anns, cats = _read(root, split)
    ids = [_image_id(im["file_name"]) for im in images]
    dups = [i for i, n in Counter(ids).items() if n > 1]
    if dups:
        names = [im["file_name"] for im, i in zip(images, ids) if i in set(dups)]
        raise CocoDataError(f"{path}: {len(dups)} image id(s) shared by several file names (an image's id is its "
                            f"file name without folder and extension): {_names(names)}")
    files = _find_images(root, split, images, path, need=require_images)

    counts: Counter = Counter()
    unknown_names: Counter = Counter()
    n_renamed = sum(i != Path(im["file_name"].replace("\\", "/")).stem for i, im in zip(ids, images))
    if n_renamed:
        log.warning("%s: %d file name(s) contain whitespace, replaced by '_' in the image id (result files "
                    "separate fields by whitespace)", path, n_renamed)
    per_image: dict[int, list[tuple[int, dict]]] = {im["id"]: [] for im in images}
    for j, a in enumerate(anns):
        if a.get("image_id") not in per_image:
            counts["annotation of an unlisted image skipped"] += 1
            log.warning("%s: annotations[%d] (id %r): image_id %r is not among the images; skipped", path, j,
                        a.get("id"), a.get("image_id"))
            continue
        per_image[a["image_id"]].append((j, a))

    records: list[ImageRecord] = []
    for im, image_id, file in zip(images, ids, files):
        height, width = _image_size(im, file, path, counts)
        coco_boxes: list[list[float]] = []
        labels: list[int] = []
        crowd: list[bool] = []
        whats: list[str] = []
        for j, a in per_image[im["id"]]:
            got = _read_annotation(a, f"{path}: annotations[{j}] (id {a.get('id')!r}, image {im['file_name']})",
                                   cats, index, raw_boxes, counts, unknown_names)
            if got is None:
                continue
            coco_boxes.append(got[0])
            labels.append(got[1])
            crowd.append(got[2])
            whats.append(got[3])
        boxes = _coco_boxes_to_xyxy(coco_boxes)  # (G, 4)
        boxes, keep = fit_boxes_to_image(boxes, coco_boxes, whats, width, height, raw_boxes, counts,
                                         "COCO x,y,w,h", "annotation", "the evaluation")  # (G', 4), (G,)
        labels = [v for v, k in zip(labels, keep.tolist()) if k]
        crowd = [v for v, k in zip(crowd, keep.tolist()) if k]
        records.append(ImageRecord(
            image_id=image_id, path=file, height=height, width=width, boxes=boxes,
            labels=torch.tensor(labels, dtype=torch.int64), difficult=torch.tensor(crowd, dtype=torch.bool),
            coco_id=im["id"]))
    if log_summary:
        n_obj = sum(int(r.labels.numel()) for r in records)
        fixes = ", ".join(f"{k}: {counts[k]}" for k in _KINDS)
        extra = f" (unknown names: {dict(unknown_names.most_common(10))})" if unknown_names else ""
        log.info("COCO %s split '%s': %d images (%d without objects), %d objects of %d classes; %s%s",
                 path, split, len(records), sum(int(r.labels.numel() == 0) for r in records),
                 n_obj, len(class_names), fixes, extra)
    return records, class_names
