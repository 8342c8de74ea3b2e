"""Detection on a user's images, in the manner of ``yolo predict``, and the demo picture.

Shape shorthand:
    N: detections in one image      G: ground-truth boxes in one image

:func:`predict`: images (a file, a folder, a glob, or several of them) -> one annotated PNG per
image and one table of every detection (JSON or CSV: file, class, score, box xyxy in 0-based
continuous pixels of the original image), with a progress bar. The detector runs through
:meth:`detector.detector.SPPDetector.iter_detect` (same-size images through the trunk together,
selective search of the next images in a worker process).

:func:`demo_picture`: a grid of several test images of a VOC-layout split, each as a pair of
panels, ground truth (green) beside the detections (class colours, with scores), a line under each
pair counting what was found and what was wrong, and the score threshold in the title: what
``make demo`` shows a newcomer.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from detector.artifacts import write_text
from detector.boxes import pairwise_iou
from detector.visualize import caption, draw_detections, tile

__all__ = ["predict", "PredictResult", "find_images", "IMAGE_EXTENSIONS", "DISPLAY_THRESHOLD", "demo_picture",
           "match_detections"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DISPLAY_THRESHOLD = 0.0  # SVM margin: 0 is the decision boundary (the model's test threshold keeps far more)
FORMATS = ("json", "csv")


def find_images(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files named by ``sources``: files, folders (their images, not recursive, sorted) and
    glob patterns (``data/*.jpg``, ``photos/**/*.png``), in the order given, each file once.

    Raises:
        FileNotFoundError: a source that names no image (the source is named).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out: dict[Path, None] = {}
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(src)):
            found = sorted(Path(f) for f in glob.glob(str(src), recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise FileNotFoundError(f"{src}: no such image file or folder")
        if not found:
            raise FileNotFoundError(f"{src}: no image files ({', '.join(IMAGE_EXTENSIONS)}) there")
        out.update(dict.fromkeys(found))
    return list(out)


@dataclass
class PredictResult:
    """What :func:`predict` wrote."""

    out_dir: Path
    table: Path
    pictures: list[Path] = field(default_factory=list)
    detections: int = 0
    score_threshold: float = DISPLAY_THRESHOLD

    def text(self) -> str:
        shown = self.pictures[:5] + ([] if len(self.pictures) <= 5 else [f"... ({len(self.pictures)} in all)"])
        return "\n".join([f"{len(self.pictures)} images, {self.detections} detections with score >= "
                          f"{self.score_threshold:g}", f"detections: {self.table}",
                          f"annotated images in {self.out_dir}:", *[f"  {p}" for p in shown]])


def _picture_names(files: list[Path]) -> list[str]:
    """One PNG name per image: its stem, with the parent folder's name added where stems collide."""
    stems = [f.stem for f in files]
    names = [s if stems.count(s) == 1 else f"{f.parent.name}_{s}" for f, s in zip(files, stems)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return [f"{n}.png" for n in out]


def predict(
    checkpoint: str | Path,
    sources: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float | None = None,
    device: str = "cpu",
    fmt: str = "json",
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PredictResult:
    """Detect objects in every image of ``sources``; write annotated PNGs and one table.

    Args:
        checkpoint: ``model.pt``.
        sources: image files, folders or glob patterns (:func:`find_images`).
        out_dir: folder for ``<image stem>.png`` and ``detections.json`` / ``detections.csv``.
        score_threshold: keep detections scoring at least this (None = :data:`DISPLAY_THRESHOLD`, 0,
            the SVM decision boundary; the model's own test threshold keeps the many low-scoring
            boxes that mAP needs).
        device: "cpu", "cuda", "cuda:N" or "auto".
        fmt: "json" (one record per image, its detections inside) or "csv" (one row per detection:
            file, class, score, x1, y1, x2, y2).
        batch_size, workers: see :meth:`SPPDetector.detect_batch`.
        progress: show a tqdm bar.
    Returns:
        :class:`PredictResult`.
    Raises:
        FileNotFoundError: a source with no image; ImageError: an unreadable image (named);
        CheckpointError: a bad checkpoint; ConfigError: an unknown format or a CUDA device that is
        not there.
    """
    from tqdm import tqdm

    from detector.config import ConfigError
    from detector.detector import SPPDetector
    from detector.engine.run import resolve_device
    from proposals.imageio import read_image

    if fmt not in FORMATS:
        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    files = find_images(sources)
    det = SPPDetector.load(checkpoint, device=resolve_device(device))
    thr = DISPLAY_THRESHOLD if score_threshold is None else float(score_threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _picture_names(files)
    pending: deque[tuple[Path, np.ndarray]] = deque()

    def images():  # read once: the detector and the drawing share the array
        for f in files:
            im = read_image(f)
            pending.append((f, im))
            yield im

    result = PredictResult(out_dir=out_dir, table=out_dir / f"detections.{fmt}", score_threshold=thr)
    records = []
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress)
    try:
        for name, dets in zip(names, det.iter_detect(images(), score_threshold=thr, batch_size=batch_size,
                                                     workers=workers if len(files) > 1 else 0)):
            f, im = pending.popleft()
            dets = {k: v.cpu() for k, v in dets.items()}
            pic = out_dir / name
            _write_png(pic, draw_detections(im, dets, det.class_names))
            result.pictures.append(pic)
            result.detections += len(dets["scores"])
            records.append({
                "file": str(f), "height": int(im.shape[0]), "width": int(im.shape[1]), "annotated": str(pic),
                "detections": [{"class": det.class_names[int(k)], "label": int(k), "score": round(float(s), 6),
                                "box": [round(float(v), 3) for v in b]}
                               for b, s, k in zip(dets["boxes"], dets["scores"], dets["labels"])],
            })
            bar.update(1)
    finally:
        bar.close()
    if fmt == "json":
        write_text(result.table, json.dumps({
            "checkpoint": str(checkpoint), "classes": list(det.class_names), "score_threshold": thr,
            "box_format": "xyxy, 0-based continuous pixels of the original image (pixel i covers [i, i+1))",
            "images": records}, indent=1) + "\n")
    else:
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "class", "score", "x1", "y1", "x2", "y2"])
        for r in records:
            for d in r["detections"]:
                w.writerow([r["file"], d["class"], d["score"], *d["box"]])
        write_text(result.table, buf.getvalue())
    return result


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB picture atomically (a reader never sees half a file)."""
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(image).save(tmp)
    tmp.replace(path)


def match_detections(dets: dict[str, torch.Tensor], gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                     iou: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ground-truth boxes a set of detections finds, VOC style: detections by descending
    score, each takes the unmatched ground-truth box of its class with the highest IoU >= ``iou``.

    Args:
        dets: ``boxes`` [N, 4], ``scores`` [N], ``labels`` [N].
        gt_boxes (Tensor[G, 4]), gt_labels (Tensor[G] int64): xyxy pixels.
    Returns:
        (found Tensor[G] bool, correct Tensor[N] bool): ground truth found; detections that found one.
    """
    n, g = dets["scores"].shape[0], gt_boxes.shape[0]
    found = torch.zeros(g, dtype=torch.bool)
    correct = torch.zeros(n, dtype=torch.bool)
    if n == 0 or g == 0:
        return found, correct
    ious = pairwise_iou(dets["boxes"], gt_boxes)  # (N, G)
    same = dets["labels"][:, None] == gt_labels[None, :]  # (N, G)
    for i in torch.argsort(dets["scores"], descending=True).tolist():
        cand = torch.where(same[i] & ~found & (ious[i] >= iou), ious[i], torch.tensor(-1.0))  # (G,)
        j = int(torch.argmax(cand))
        if cand[j] >= 0:
            found[j] = correct[i] = True
    return found, correct


def demo_picture(
    checkpoint: str | Path,
    image: str | Path,
    out: str | Path,
    count: int = 6,
    split: str | None = None,
    images: Sequence[str | Path] | None = None,
    score_threshold: float = DISPLAY_THRESHOLD,
    device: str = "cpu",
    columns: int = 2,
) -> tuple[Path, str]:
    """The demo picture: ``count`` images, each as ground truth beside detections, tiled.

    The images are ``image`` and the ids after it in its VOC split (``<root>/ImageSets/Main/<split>.txt``,
    ``root`` the folder above the image's ``JPEGImages``; ``split`` default: the first of test, val,
    trainval, train that lists it), or ``images`` when given. Ground truth comes from
    ``<root>/Annotations/<id>.xml`` where the split can be read; without it only detections are drawn.

    Returns:
        (the PNG written, a text summary: one line per image and the totals).
    Raises:
        FileNotFoundError: a missing image; VOCDataError: an unreadable annotation or split.
    """
    from detector.config import ConfigError
    from detector.data.voc import load_voc_split, read_split_ids
    from detector.detector import SPPDetector
    from detector.engine.run import resolve_device
    from proposals.imageio import read_image

    if count < 1:
        raise ConfigError(f"count: must be >= 1, got {count}")
    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"{image}: no such image file")
    root = image.parent.parent
    records = {}
    if images:
        files = [Path(p) for p in images]
    else:
        splits = [split] if split else [s for s in ("test", "val", "trainval", "train")
                                         if (root / "ImageSets" / "Main" / f"{s}.txt").is_file()]
        files, split = [image], None
        for s in splits:
            ids = read_split_ids(root, s)
            if image.stem in ids:
                start = ids.index(image.stem)
                files = [root / "JPEGImages" / f"{i}{image.suffix}" for i in ids[start:start + count]]
                split = s
                break
    det = SPPDetector.load(checkpoint, device=resolve_device(device))
    if split is not None and (root / "Annotations").is_dir():
        recs, _ = load_voc_split(root, split, class_names=det.class_names, log_summary=False)
        records = {r.image_id: r for r in recs}
    arrays = [read_image(f) for f in files]
    dets = [{k: v.cpu() for k, v in d.items()} for d in det.detect_batch(arrays, score_threshold=score_threshold)]
    panels, lines = [], []
    tot_gt = tot_found = tot_fp = 0
    for f, im, d in zip(files, arrays, dets):
        rec = records.get(f.stem)
        left = draw_detections(im, None, det.class_names, ground_truth=None if rec is None else
                               {"boxes": rec.boxes, "labels": rec.labels})
        right = draw_detections(im, d, det.class_names)
        pair = tile([caption(left, ["ground truth"], where="above"),
                     caption(right, [f"detections (score >= {score_threshold:g})"], where="above")], 2, gap=4)
        if rec is not None:
            found, correct = match_detections(d, rec.boxes, rec.labels)
            n_fp = int((~correct).sum())
            missed = [det.class_names[int(k)] for k in rec.labels[~found]]
            text = (f"{f.name}: found {int(found.sum())} of {len(found)}"
                    + (f", missed {', '.join(missed)}" if missed else "")
                    + f"; {n_fp} false positive{'s' if n_fp != 1 else ''}")
            tot_gt, tot_found, tot_fp = tot_gt + len(found), tot_found + int(found.sum()), tot_fp + n_fp
        else:
            text = f"{f.name}: {len(d['scores'])} detections (no annotation)"
        lines.append(text)
        panels.append(caption(pair, [text], where="below"))
    grid = tile(panels, columns, gap=12)
    total = (f"all {len(files)} images: found {tot_found} of {tot_gt} objects, {tot_fp} false positives"
             if records else f"{len(files)} images")
    name = f"{Path(checkpoint).parent.name}/{Path(checkpoint).name}"
    head = [f"{name}: green = ground truth, coloured = detections with SVM score >= "
            f"{score_threshold:g} (label: class score)",
            f"{total}; a detection is right when its class matches and IoU >= 0.5"]
    grid = caption(grid, head, font_size=16, where="above")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_png(out, grid)
    return out, "\n".join(lines + [total])
