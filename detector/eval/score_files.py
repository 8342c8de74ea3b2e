"""Scoring the devkit comp4 result files of a split: VOC AP, COCO AP, ``eval.json``, PR curves.

This is ``tools/eval_detections.py``: the results may come from any detector, written as
``comp4_det_<split>_<class>.txt`` (:mod:`detector.eval.comp4`). Ground truth is read as annotated
(``raw_boxes=True``, images not needed), as the devkit scores it.

Shape shorthand (used across the project):
    N: detections of one class      K: foreground classes
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from detector.artifacts import write_text
from detector.data.splits import Format, load_split
from detector.eval.coco import coco_evaluate
from detector.eval.comp4 import ResultsFileError, read_comp4
from detector.eval.plots import plot_pr_curves
from detector.eval.voc_ap import EvalResult, evaluate

__all__ = ["ScoreReport", "score_comp4_files"]

log = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    """What :func:`score_comp4_files` measured and wrote.

    Attributes:
        split: the split's name.
        metric: "07" (VOC 2007 11-point) or "area" (VOC 2010+).
        images: images in the split.
        result: VOC AP per class and mAP.
        coco: COCO AP, AP50, AP75 (pycocotools), or None when not asked for.
        json_path, png_path: the ``eval.json`` and PR-curve PNG written.
    """

    split: str
    metric: str
    images: int
    result: EvalResult
    coco: dict[str, float] | None
    json_path: Path
    png_path: Path

    @property
    def mAP(self) -> float:
        return self.result.mAP

    def text(self) -> str:
        """The printed report: the per-class table, the COCO figures, then ``mAP: 0.xxxxxx`` last."""
        metric = "VOC07 11-point" if self.metric == "07" else "area (VOC2010+)"
        lines = [f"{self.split}: {self.images} images, metric {metric}", self.result.table()]
        if self.coco is not None:
            lines.append(f"COCO (pycocotools): AP {self.coco['AP']:.4f}  AP50 {self.coco['AP50']:.4f}  "
                         f"AP75 {self.coco['AP75']:.4f}")
        lines.append(f"wrote {self.json_path} and {self.png_path}")
        lines.append(f"mAP: {self.result.mAP:.6f}")  # NaN prints as "mAP: nan"
        return "\n".join(lines)


def score_comp4_files(
    data_root: str | Path,
    split: str,
    results: str | Path,
    *,
    metric: Literal["07", "area"] = "07",
    classes: Sequence[str] | None = None,
    out: str | Path | None = None,
    coco: bool = True,
    argv: Sequence[str] = (),
    format: Format = "voc",
) -> ScoreReport:
    """Score ``<results>/comp4_det_<split>_<class>.txt`` on a split (exact VOCevaldet).

    Writes ``out`` (default ``<results>/eval.json``: per-class AP, mAP, COCO figures, the inputs
    and ``argv``) and ``<results>/pr_curves.png``, both atomically. A result file of a class not
    scored is reported (warning); a class without a file is scored with no detections (warning).

    Args:
        data_root: the data set's folder (annotations and split files; images are not read).
        split: ``ImageSets/Main/<split>.txt`` (VOC) or ``annotations/instances_<split>.json`` (COCO).
        results: the folder of result files.
        metric: "07" (VOC 2007 11-point AP) or "area" (VOC 2010+ area AP).
        classes: class names in id order (default: every name in the split, sorted).
        coco: also compute COCO AP / AP50 / AP75 with pycocotools.
        argv: the command line, kept in the JSON.
        format: the data set's layout, "voc" or "coco" (:mod:`detector.data.splits`).
    Returns:
        :class:`ScoreReport`.
    Raises:
        VOCDataError / CocoDataError: the split or its annotations cannot be read (named).
        ResultsFileError: ``results`` is not a folder, or a malformed line, or a detection on an
            image outside the split (file and line named).
    """
    results = Path(results)
    # GT as annotated (raw_boxes), images not needed: what the devkit scores against; no classes
    # given = every name in the split, sorted
    records, classes = load_split(data_root, split, tuple(classes) if classes else None, format=format,
                                  raw_boxes=True, require_images=False)
    if not results.is_dir():
        raise ResultsFileError(f"{results} is not a folder (of comp4 result files)")
    prefix = f"comp4_det_{split}_"
    extra = sorted(p.name for p in results.glob(f"{prefix}*.txt") if p.name[len(prefix):-4] not in classes)
    if extra:
        log.warning("result files for classes not scored (not in %s): %s", list(classes), extra)
    dets = read_comp4(results, split, classes, image_ids=[r.image_id for r in records])
    result = evaluate(records, classes, dets, metric=metric)
    figures = coco_evaluate(records, classes, dets) if coco else None
    json_path = Path(out) if out is not None else results / "eval.json"
    payload = {"data_root": str(data_root), "split": split, "results": str(results), "argv": list(argv),
               **result.to_dict(), "coco": figures}
    write_text(json_path, json.dumps(payload, indent=2))
    png = plot_pr_curves(result, results / "pr_curves.png")
    return ScoreReport(split=split, metric=metric, images=len(records), result=result, coco=figures,
                       json_path=json_path, png_path=png)
