"""Pascal VOC-layout reader: one split -> ``list[ImageRecord]`` in the project's box convention.

Shape shorthand (used across the project):
    G: ground-truth boxes of one image      K: foreground classes

Reads Pascal VOC 2007 / 2012 and any folder laid out the same way::

    ROOT/Annotations/<id>.xml
    ROOT/JPEGImages/<id>.jpg        (or .jpeg / .png, see ``image_ext``)
    ROOT/ImageSets/Main/<split>.txt (first whitespace token of each line is an id)

Boxes leave this module as float32 xyxy, 0-based, continuous (``detector.boxes``); the XML's
1-based inclusive corners are converted in exactly one place, :func:`_voc_boxes_to_xyxy`
(``boxes.voc_to_xyxy``).

Real annotations are imperfect. What the reader does with each quirk (every warning names the file
and what was done, and the summary line at the end counts each kind):

* degenerate box (VOC ``xmax <= xmin`` or ``ymax <= ymin``: no extent between the annotated
  corners, e.g. BCCD's two single clicks) -> object skipped, warning;
* box beyond the image -> clipped to the image, warning (a box left with no area after clipping is
  skipped as degenerate);
* class name not in ``class_names`` -> object skipped, warning;
* ``<difficult>`` missing -> 0 (as the devkit's ``VOCreadrecxml``), warning;
* ``<size>`` missing or unusable -> read from the image with PIL, warning;
* float coordinates (``273.5``) -> kept as floats;
* missing or unusable ``<bndbox>`` -> object skipped, warning;
* ids listed in the split whose XML or image file is missing -> :class:`VOCDataError` naming them
  (an image is never silently dropped from a split);
* unreadable XML -> :class:`VOCDataError` naming the file;
* an id listed twice in the split file -> :class:`VOCDataError` (the devkit would count its
  positives twice).

Images without any (kept) object stay in the list with ``G = 0``.

``raw_boxes=True`` keeps every box of a known class exactly as annotated (no clipping, no skipping
of degenerate boxes; still warned). That is what the devkit evaluator scores against, so
``tools/eval_detections.py`` uses it; training code should use the default. ``require_images=False``
loads a split from its XML alone (scoring does not need the pictures).
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from detector.boxes import voc_to_xyxy
from detector.config import VOC_CLASSES
from detector.data.records import DataError, ImageRecord, class_index, fit_boxes_to_image, known_class

__all__ = [
    "ImageRecord",
    "VOCDataError",
    "VOC_CLASSES",
    "read_split_ids",
    "discover_classes",
    "load_voc_split",
]

log = logging.getLogger(__name__)

# summary-line keys, in print order
_KINDS = (
    "degenerate box skipped",
    "box clipped to image",
    "unknown class skipped",
    "missing <difficult> set to 0",
    "size read from image",
    "bad <bndbox> skipped",
)


class VOCDataError(DataError):
    """A VOC folder that cannot be read as asked (missing files, unreadable XML, bad split file)."""


def _split_file(root: Path, split: str) -> Path:
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def read_split_ids(root: str | Path, split: str) -> list[str]:
    """Image ids of ``ROOT/ImageSets/Main/<split>.txt`` in file order.

    The first whitespace-separated token of each line is the id (as the devkit's ``textread``;
    2-column files such as ``000005  1`` work). Blank lines are ignored.

    Raises:
        VOCDataError: the file is missing or lists no image, or an id is listed twice (named).
    """
    path = _split_file(Path(root), split)
    if not path.is_file():
        raise VOCDataError(f"split file not found: {path} (split '{split}' under {root})")
    ids: list[str] = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if tokens:
            ids.append(tokens[0])
    if not ids:
        raise VOCDataError(f"{path}: the split file lists no images (split '{split}' under {root})")
    dups = [i for i, n in Counter(ids).items() if n > 1]
    if dups:
        raise VOCDataError(
            f"{path}: {len(dups)} id(s) listed more than once: {', '.join(sorted(dups)[:10])}"
            f"{' ...' if len(dups) > 10 else ''}"
        )
    return ids


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as e:
        raise VOCDataError(f"unreadable annotation XML {path}: {e}") from None


def _text(node: ET.Element | None, tag: str) -> str | None:
    if node is None:
        return None
    child = node.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _check_files(root: Path, ids: Sequence[str], split: str, need_images: bool,
                 image_ext: Sequence[str]) -> dict[str, Path]:
    """Image path per id; raises naming every id whose XML (or image) is missing."""
    missing_xml, missing_img = [], []
    images: dict[str, Path] = {}
    for image_id in ids:
        if not (root / "Annotations" / f"{image_id}.xml").is_file():
            missing_xml.append(image_id)
        if need_images:
            for ext in image_ext:
                p = root / "JPEGImages" / f"{image_id}{ext}"
                if p.is_file():
                    images[image_id] = p
                    break
            else:
                missing_img.append(image_id)
    problems = []
    if missing_xml:
        problems.append(
            f"{len(missing_xml)} id(s) without {root / 'Annotations'}/<id>.xml: "
            + ", ".join(missing_xml[:10]) + (" ..." if len(missing_xml) > 10 else "")
        )
    if missing_img:
        problems.append(
            f"{len(missing_img)} id(s) without an image {root / 'JPEGImages'}/<id>{{{','.join(image_ext)}}}: "
            + ", ".join(missing_img[:10]) + (" ..." if len(missing_img) > 10 else "")
        )
    if problems:
        raise VOCDataError(
            f"split '{split}' ({_split_file(root, split)}) lists ids whose files are missing; "
            "no image is dropped silently: " + "; ".join(problems)
        )
    return images


def discover_classes(root: str | Path, split: str) -> tuple[str, ...]:
    """Every object name (after ``strip()``) in the split's annotations, sorted.

    Sorted so the order (and so the label ids) is stable for a given data set.

    Raises:
        VOCDataError: missing split file, missing or unreadable XML (named).
    """
    root = Path(root)
    ids = read_split_ids(root, split)
    _check_files(root, ids, split, need_images=False, image_ext=())
    names: set[str] = set()
    for image_id in ids:
        xml = _parse_xml(root / "Annotations" / f"{image_id}.xml")
        for obj in xml.iter("object"):
            name = _text(obj, "name")
            if name:
                names.add(name)
    return tuple(sorted(names))


def _voc_boxes_to_xyxy(voc_boxes: list[list[float]]) -> torch.Tensor:
    """EDGE: XML corners (1-based inclusive) -> project xyxy, via ``boxes.voc_to_xyxy``."""
    if not voc_boxes:
        return torch.zeros((0, 4), dtype=torch.float32)
    return voc_to_xyxy(torch.tensor(voc_boxes, dtype=torch.float64))  # (G, 4)


def _image_size(xml_path: Path, root_el: ET.Element, image_path: Path,
                counts: Counter) -> tuple[int, int]:
    size = root_el.find("size")
    w_txt, h_txt = _text(size, "width"), _text(size, "height")
    try:
        w, h = int(float(w_txt)), int(float(h_txt))  # type: ignore[arg-type]
        if w > 0 and h > 0:
            return h, w
    except (TypeError, ValueError):
        pass
    try:
        with Image.open(image_path) as im:
            w, h = im.size
    except OSError as e:
        raise VOCDataError(
            f"{xml_path}: <size> missing or unusable and the image {image_path} cannot be read: {e}"
        ) from None
    counts["size read from image"] += 1
    log.warning("%s: <size> missing or unusable (width=%r, height=%r); read %dx%d from %s",
                xml_path, w_txt, h_txt, w, h, image_path.name)
    return h, w


def _read_object(obj: ET.Element, what: str, index: dict[str, int], raw_boxes: bool, counts: Counter,
                 unknown_names: Counter) -> tuple[list[float], int, bool, str] | None:
    """One ``<object>`` -> (VOC box, class id, difficult, its name for messages), or None where it is
    skipped (warned and counted)."""
    name = _text(obj, "name") or ""
    if not known_class(name, index, what, "object", counts, unknown_names):
        return None
    bnd = obj.find("bndbox")
    try:
        b = [float(_text(bnd, k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[arg-type]
        if not all(math.isfinite(v) for v in b):
            raise ValueError("not finite")
    except (TypeError, ValueError):
        counts["bad <bndbox> skipped"] += 1
        log.warning("%s (%s): <bndbox> missing or not numeric; object skipped", what, name)
        return None
    d_txt = _text(obj, "difficult")
    if d_txt is None or d_txt == "":
        counts["missing <difficult> set to 0"] += 1
        log.warning("%s (%s): no <difficult>; set to 0", what, name)
        diff = False
    else:
        try:
            diff = float(d_txt) != 0
        except ValueError:
            counts["missing <difficult> set to 0"] += 1
            log.warning("%s (%s): <difficult>%s</difficult> is not a number; set to 0",
                        what, name, d_txt)
            diff = False
    if b[2] <= b[0] or b[3] <= b[1]:
        if raw_boxes:
            log.warning("%s (%s): degenerate box xmin,ymin,xmax,ymax=%s; kept as annotated "
                        "(raw_boxes: as the devkit scores it)", what, name, b)
        else:
            counts["degenerate box skipped"] += 1
            log.warning("%s (%s): degenerate box xmin,ymin,xmax,ymax=%s; object skipped",
                        what, name, b)
            return None
    return b, index[name], diff, f"{what} ({name})"


def load_voc_split(
    root: str | Path,
    split: str,
    class_names: Sequence[str] | None = None,
    *,
    image_ext: Sequence[str] = (".jpg", ".jpeg", ".png"),
    log_summary: bool = True,
    raw_boxes: bool = False,
    require_images: bool = True,
) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """Read every image of a split, in split-file order.

    Class names in the XML are matched after ``strip()`` (so ``" dog\\n"`` is ``dog``). The devkit
    evaluator (``VOCevaldet``) matches names exactly; the two differ only for names with
    surrounding whitespace, which the devkit would then not score as that class.

    Args:
        root: folder with ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``.
        split: split name (``ImageSets/Main/<split>.txt``).
        class_names: foreground names in id order (e.g. ``VOC_CLASSES``); None = every name in the
            split, sorted (:func:`discover_classes`). Objects of other names are skipped with a
            warning.
        image_ext: image extensions tried in order for ``JPEGImages/<id><ext>``.
        log_summary: log one INFO line counting images, objects and each kind of fix.
        raw_boxes: keep boxes exactly as annotated (no clipping, degenerate boxes kept), as the
            devkit evaluator scores them; for evaluation only.
        require_images: False lets a split without ``JPEGImages`` files load (scoring needs only the
            XML, like the devkit): ``path`` is then ``JPEGImages/<id><image_ext[0]>`` even if absent,
            and the size must come from ``<size>``.
    Returns:
        (records, class_names): one :class:`ImageRecord` per listed id (none dropped), and the
        class names used for ``labels``.
    Raises:
        VOCDataError: missing split file, ids whose XML/image files are missing (all named),
            unreadable XML (named), duplicate ids in the split or in ``class_names``.
    """
    root = Path(root)
    if class_names is None:
        class_names = discover_classes(root, split)
    class_names, index = class_index(class_names, VOCDataError)
    ids = read_split_ids(root, split)
    images = _check_files(root, ids, split, need_images=require_images, image_ext=tuple(image_ext))
    for image_id in ids:
        if image_id not in images:  # require_images=False: first existing candidate or the default
            cands = [root / "JPEGImages" / f"{image_id}{ext}" for ext in image_ext]
            images[image_id] = next((c for c in cands if c.is_file()), cands[0])

    counts: Counter = Counter()
    unknown_names: Counter = Counter()
    records: list[ImageRecord] = []
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        el = _parse_xml(xml_path)
        height, width = _image_size(xml_path, el, images[image_id], counts)
        voc_boxes: list[list[float]] = []
        labels: list[int] = []
        difficult: list[bool] = []
        whats: list[str] = []
        for j, obj in enumerate(el.iter("object")):
            got = _read_object(obj, f"{xml_path}: object {j}", index, raw_boxes, counts, unknown_names)
            if got is None:
                continue
            voc_boxes.append(got[0])
            labels.append(got[1])
            difficult.append(got[2])
            whats.append(got[3])
        boxes = _voc_boxes_to_xyxy(voc_boxes)  # (G, 4)
        boxes, keep = fit_boxes_to_image(boxes, voc_boxes, whats, width, height, raw_boxes, counts, "VOC",
                                         "object", "the devkit")  # (G', 4), (G,)
        labels = [v for v, k in zip(labels, keep.tolist()) if k]
        difficult = [v for v, k in zip(difficult, keep.tolist()) if k]
        records.append(
            ImageRecord(
                image_id=image_id,
                path=images[image_id],
                height=height,
                width=width,
                boxes=boxes,
                labels=torch.tensor(labels, dtype=torch.int64),
                difficult=torch.tensor(difficult, dtype=torch.bool),
            )
        )
    if log_summary:
        n_obj = sum(int(r.labels.numel()) for r in records)
        fixes = ", ".join(f"{k}: {counts[k]}" for k in _KINDS)
        extra = (f" (unknown names: {dict(unknown_names.most_common(10))})" if unknown_names else "")
        log.info("VOC %s split '%s': %d images (%d without objects), %d objects of %d classes; %s%s",
                 root, split, len(records), sum(int(r.labels.numel() == 0) for r in records),
                 n_obj, len(class_names), fixes, extra)
    return records, class_names
