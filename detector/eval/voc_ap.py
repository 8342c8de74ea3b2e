"""Exact Pascal VOC detection evaluation: the MATLAB devkit's ``VOCevaldet`` (11-point and area AP).

Shape shorthand (used across the project):
    G: ground-truth boxes of one image (of one class)      N: detections
    K: foreground classes

Semantics follow ``../shared/spec/VOC_EVAL_SEMANTICS.md`` (the official MATLAB devkit, not
py-faster-rcnn's ``voc_eval.py``), per class:

* IoU with the devkit's inclusive ``+1`` widths, also for float coordinates; a detection is matched
  when ``IoU >= 0.5`` (``>=``, as MATLAB). This module holds the only ``+1`` arithmetic of the
  project: boxes arrive as project xyxy and are turned into VOC coordinates with
  ``boxes.xyxy_to_voc`` at the edge (:func:`class_ground_truth`, :func:`detections_by_class`).
* each detection goes to the single GT of its image with the largest IoU (first in annotation
  order on ties); there is no fallback to the second best. That GT difficult -> the detection is
  ignored (neither TP nor FP); already taken -> FP (duplicate); else TP. Difficult GTs are not
  counted in ``npos``.
* detections are sorted by decreasing score with a STABLE sort (MATLAB ``sort``): ties keep the
  results-file order (for per-image dicts: split order, then the order inside each image).
* 11-point AP (VOC 2007, default) at MATLAB's ``0:0.1:1`` levels (see :data:`RECALL_LEVELS_11`:
  0.30000000000000004 but exactly 0.6 and 0.7 as MATLAB builds them); area AP (``xVOCap``,
  VOC 2010+) with ``metric="area"``.

NaN handling (as MATLAB, deliberately): precision before the first TP/FP is 0/0 = NaN and
``max`` ignores NaN, so 11-point AP is NaN only when every detection of a class was ignored (all on
difficult GTs); area AP is 0 then. A class with no non-difficult GT (``npos = 0``) gets 11-point
AP 0, and area AP NaN if it has detections (0 if none). An empty detection list gives AP 0.
``mAP`` is the plain mean over the evaluated classes (MATLAB ``mean``): one NaN class AP makes
mAP NaN. (``EvalResult.to_dict`` writes NaN as JSON ``null``.)

Differences from the devkit that remain, both documented: GT boxes come from :class:`ImageRecord`
(float32 xyxy, so a non-integer XML coordinate such as 273.3 carries float32 rounding, ~1e-5 px),
and class names are matched after ``strip()`` (``detector.data.voc``). Score against records loaded
with ``load_voc_split(..., raw_boxes=True)`` to keep degenerate/out-of-image GT boxes exactly as
the devkit does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from detector.boxes import xyxy_to_voc
from detector.data.voc import ImageRecord

__all__ = [
    "RECALL_LEVELS_11",
    "ClassDetections",
    "ClassEval",
    "EvalResult",
    "class_ground_truth",
    "detections_by_class",
    "per_class_detections",
    "eval_class",
    "RankedOutcomes",
    "rank_outcomes",
    "pr_curve",
    "evaluate",
    "ap_11point",
    "ap_area",
]


def _matlab_colon(a: float, d: float, b: float) -> tuple[float, ...]:
    """MATLAB's ``a:d:b`` as MATLAB builds it: first half ``a + k*d``, second half ``b - (n-k)*d``."""
    n = int(round((b - a) / d))
    return tuple(a + k * d if k <= n // 2 else b - (n - k) * d for k in range(n + 1))


# 0, .1, .2, 0.30000000000000004, .4, .5, 0.6, 0.7, .8, .9, 1 (numpy's arange has 0.6000000000000001
# and 0.7000000000000001 instead; the devkit keeps a recall of exactly 0.6 / 0.7, numpy drops it).
RECALL_LEVELS_11: tuple[float, ...] = _matlab_colon(0.0, 0.1, 1.0)


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class ClassDetections:
    """Detections of one class over a split, in results-file order.

    Attributes:
        image_ids: N image ids.
        scores (ndarray[N] float64): confidences.
        voc_boxes (ndarray[N, 4] float64): 1-based inclusive VOC ``(x1, y1, x2, y2)``, exactly as in
            a comp4 file (not project xyxy: a different space, hence the name).
    """

    image_ids: tuple[str, ...]
    scores: np.ndarray
    voc_boxes: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.scores.shape != (n,) or self.voc_boxes.shape != (n, 4):
            raise ValueError(
                f"ClassDetections: {n} image ids but scores {self.scores.shape} and voc_boxes "
                f"{self.voc_boxes.shape} (expected ({n},) and ({n}, 4))"
            )

    @staticmethod
    def empty() -> "ClassDetections":
        return ClassDetections((), np.zeros(0), np.zeros((0, 4)))

    def __len__(self) -> int:
        return len(self.image_ids)


def class_ground_truth(records: Sequence[ImageRecord], label: int
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ground truth of one class per image, in split order, in VOC coordinates.

    EDGE: project xyxy -> VOC 1-based inclusive via ``boxes.xyxy_to_voc``.

    Args:
        records: every image of the split (images without the class are kept: detections there
            are false positives).
        label: class id.
    Returns:
        ``{image_id: (voc_boxes ndarray[G, 4] float64, difficult ndarray[G] bool)}``.
    Raises:
        ValueError: an image id repeated in ``records`` (the devkit: "multiple image").
    """
    gt: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in records:
        if r.image_id in gt:
            raise ValueError(f"image id '{r.image_id}' appears twice in the ground truth")
        m = r.labels == label
        gt[r.image_id] = (
            xyxy_to_voc(r.boxes[m].reshape(-1, 4)).numpy(),  # (G, 4)
            r.difficult[m].numpy().astype(bool),
        )
    return gt


def detections_by_class(
    detections: Mapping[str, Mapping[str, torch.Tensor]], num_classes: int
) -> list[ClassDetections]:
    """Per-image detector output -> per-class lists in results-file order.

    EDGE: project xyxy -> VOC 1-based inclusive via ``boxes.xyxy_to_voc``.

    Args:
        detections: ``{image_id: {"boxes": Tensor[N, 4] xyxy, "scores": Tensor[N],
            "labels": Tensor[N] int64}}`` (the public detector output). Order: mapping order,
            then the order inside each image (this is the tie order).
        num_classes: K; labels must lie in ``0..K-1``.
    Returns:
        K :class:`ClassDetections`, one per class id.
    Raises:
        ValueError: wrong shapes or labels outside ``0..K-1`` (the image id is named).
    """
    ids: list[list[str]] = [[] for _ in range(num_classes)]
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    boxes: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for image_id, det in detections.items():
        try:
            b, s, lab = det["boxes"], det["scores"], det["labels"]
        except (KeyError, TypeError):
            raise ValueError(f"detections['{image_id}'] must be a dict with boxes, scores, labels") from None
        b, s, lab = torch.as_tensor(b), torch.as_tensor(s), torch.as_tensor(lab)
        n = s.shape[0] if s.ndim == 1 else -1
        if b.shape != (n, 4) or lab.shape != (n,):
            raise ValueError(
                f"detections['{image_id}']: boxes {tuple(b.shape)}, scores {tuple(s.shape)}, labels "
                f"{tuple(lab.shape)}; expected [N, 4], [N], [N]"
            )
        if lab.dtype.is_floating_point or lab.dtype == torch.bool:
            raise ValueError(f"detections['{image_id}']: labels must be int64 class ids, got {lab.dtype}")
        if n and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(f"detections['{image_id}']: labels must be in 0..{num_classes - 1}, "
                             f"got {sorted(set(lab.tolist()))}")
        voc = xyxy_to_voc(b.detach().cpu()).numpy()  # (N, 4) float64
        sc = s.detach().cpu().to(torch.float64).numpy()
        lab_np = lab.detach().cpu().numpy()
        for k in np.unique(lab_np):
            m = lab_np == k
            ids[k].extend([image_id] * int(m.sum()))
            scores[k].append(sc[m])
            boxes[k].append(voc[m])
    return [
        ClassDetections(
            tuple(ids[k]),
            np.concatenate(scores[k]) if scores[k] else np.zeros(0),  # (N,)
            np.concatenate(boxes[k]) if boxes[k] else np.zeros((0, 4)),  # (N, 4)
        )
        for k in range(num_classes)
    ]


def per_class_detections(
    detections: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, ClassDetections],
    class_names: Sequence[str],
    *,
    strict: bool = False,
) -> list[ClassDetections]:
    """Either form of detections that :func:`evaluate`, ``write_comp4`` and ``coco_detections`` take
    -> K :class:`ClassDetections`, one per name of ``class_names``, in that order.

    The two forms are told apart by the value type: ``{class_name: ClassDetections}`` (as
    ``read_comp4`` returns; a class missing from it has no detections) or per-image detector output
    ``{image_id: {"boxes", "scores", "labels"}}`` (split per class by :func:`detections_by_class`).

    Args:
        strict: per-class input only: raise on a class name not in ``class_names`` (:func:`evaluate`
            does; the writers keep the named classes and leave the others out).
    Raises:
        ValueError: with ``strict``, detections under a name not in ``class_names``; per-image input
            as :func:`detections_by_class`.
    """
    class_names = tuple(class_names)
    values = list(detections.values())
    if values and all(isinstance(v, ClassDetections) for v in values):
        extra = sorted(set(detections) - set(class_names))
        if strict and extra:
            raise ValueError(f"detections for unknown classes {extra}; classes are {class_names}")
        return [detections.get(c, ClassDetections.empty()) for c in class_names]  # type: ignore[misc]
    return detections_by_class(detections, len(class_names))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# AP


def ap_11point(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC 2007 11-point interpolated AP, exactly as ``VOCevaldet.m``.

    ``ap += max(prec(rec >= t)) / 11`` for ``t`` in :data:`RECALL_LEVELS_11`, where ``max``
    ignores NaN (MATLAB), an empty selection gives 0 and an all-NaN one gives NaN.

    Args:
        rec, prec (ndarray[N] float64): the PR curve over detection ranks.
    """
    ap = 0.0
    for t in RECALL_LEVELS_11:
        sel = prec[rec >= t]
        if sel.size == 0:
            p = 0.0
        else:
            finite = sel[~np.isnan(sel)]
            p = float(finite.max()) if finite.size else math.nan
        ap = ap + p / 11
    return ap


def ap_area(rec: np.ndarray, prec: np.ndarray) -> float:
    """Area under the interpolated PR curve, exactly as the devkit's ``xVOCap`` (VOC 2010+).

    Sentinels ``mrec = [0, rec, 1]``, ``mpre = [0, prec, 0]``; ``mpre`` is made monotone from the
    right with MATLAB's NaN-ignoring ``max``; AP sums ``(mrec_i - mrec_{i-1}) * mpre_i`` where the
    recall changes (NaN recall, i.e. npos = 0, counts as a change and gives NaN).
    """
    mrec = np.concatenate([[0.0], rec, [1.0]])  # (N+2,)
    mpre = np.concatenate([[0.0], prec, [0.0]])  # (N+2,)
    for i in range(mpre.size - 2, -1, -1):
        mpre[i] = np.fmax(mpre[i], mpre[i + 1])
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


@dataclass(frozen=True)
class ClassEval:
    """Evaluation of one class.

    Attributes:
        name: class name.
        n_gt: npos, non-difficult GT objects.
        n_difficult: difficult GT objects (matched, never counted).
        n_det: detections scored.
        tp, fp, ignored: counts over all detections (ignored = best GT difficult).
        recall: final recall ``tp / n_gt`` (NaN when n_gt = 0; 0 with no detections).
        ap: average precision (metric of the run).
        rec, prec (ndarray[N] float64): the PR curve over score-sorted detections.
    """

    name: str
    n_gt: int
    n_difficult: int
    n_det: int
    tp: int
    fp: int
    ignored: int
    recall: float
    ap: float
    rec: np.ndarray = field(repr=False)
    prec: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class RankedOutcomes:
    """How the devkit judged each detection of one class, in rank (decreasing score) order.

    Attributes:
        order (ndarray[N] int64): rank -> index of the detection in results-file order.
        tp, fp (ndarray[N] float64): 1 where the ranked detection is a true / false positive
            (a false positive reached no GT at ``iou_thresh``, or a GT already taken: a duplicate);
            both 0 for a detection whose best GT is difficult (ignored).
        ovmax (ndarray[N] float64): IoU (devkit ``+1``) with the best GT of the class in the
            detection's image, difficult ones included; ``-inf`` where none intersects.
        npos: non-difficult GT objects of the class; n_difficult: difficult ones.
        found (ndarray[sum G] bool): each GT object (the images of ``gt`` in order, their objects
            in order) taken by a true positive.
    """

    order: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    ovmax: np.ndarray
    npos: int
    n_difficult: int
    found: np.ndarray


def rank_outcomes(
    gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
    dets: ClassDetections,
    *,
    iou_thresh: float = 0.5,
    name: str = "",
) -> RankedOutcomes:
    """``VOCevaldet``'s matching for one class: every detection judged TP, FP or ignored, by rank.

    Args:
        gt, dets, iou_thresh, name: as :func:`eval_class`.
    Returns:
        :class:`RankedOutcomes`.
    Raises:
        ValueError: a detection on an image not in ``gt`` (named), or NaN scores.
    """
    unknown = sorted(set(dets.image_ids) - set(gt))
    if unknown:
        raise ValueError(
            f"class '{name}': {len(unknown)} detection image id(s) not in the split: "
            + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        )
    if np.isnan(dets.scores).any():
        raise ValueError(f"class '{name}': NaN detection scores")
    npos = int(sum(int((~d).sum()) for _, d in gt.values()))
    n_diff = int(sum(int(d.sum()) for _, d in gt.values()))

    order = np.argsort(-dets.scores, kind="stable")  # MATLAB sort: stable, ties keep file order
    nd = len(order)
    # The greedy assignment only interacts within an image, so the IoUs of all detections of an
    # image are computed at once; the order-dependent part (which detection takes a GT first) is
    # resolved below in rank order. Element-wise float operations are the devkit's, in its order,
    # so the result equals a per-detection loop (tests/test_evaluation.py checks it against a
    # line-by-line transcription of the devkit; speed: BENCHMARKS.md, "VOC evaluation").
    image_index = {i: k for k, i in enumerate(gt)}
    det_img = np.fromiter((image_index[dets.image_ids[d]] for d in order), np.int64, nd)  # (N,)
    det_boxes = dets.voc_boxes[order]  # (N, 4) in rank order
    ovmax = np.full(nd, -math.inf)
    jmax = np.zeros(nd, dtype=np.int64)
    gt_list = list(gt.values())
    offsets = np.cumsum([0] + [len(d) for _, d in gt_list])  # first global GT index per image
    by_img = np.argsort(det_img, kind="stable")  # ranks grouped by image, rank order inside
    starts = np.flatnonzero(np.r_[True, det_img[by_img][1:] != det_img[by_img][:-1]]) if nd else by_img
    for a, b in zip(starts, np.r_[starts[1:], nd]):
        ranks = by_img[a:b]
        bbgt = gt_list[det_img[ranks[0]]][0]  # (G, 4)
        if len(bbgt) == 0:
            continue
        bb = det_boxes[ranks][:, None, :]  # (n, 1, 4)
        g = bbgt[None, :, :]  # (1, G, 4)
        # inclusive +1 widths: the devkit's convention (this module is its only home)
        iw = np.minimum(bb[..., 2], g[..., 2]) - np.maximum(bb[..., 0], g[..., 0]) + 1  # (n, G)
        ih = np.minimum(bb[..., 3], g[..., 3]) - np.maximum(bb[..., 1], g[..., 1]) + 1  # (n, G)
        with np.errstate(divide="ignore", invalid="ignore"):
            ua = ((bb[..., 2] - bb[..., 0] + 1) * (bb[..., 3] - bb[..., 1] + 1)
                  + (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1) - iw * ih)  # (n, G)
            ov = iw * ih / ua
        # MATLAB: only intersecting GTs are candidates; `ov > ovmax` from -inf (NaN never wins)
        ov = np.where((iw > 0) & (ih > 0) & ~np.isnan(ov), ov, -math.inf)
        j = np.argmax(ov, axis=1)  # (n,) first maximum = annotation order on exact IoU ties
        ovmax[ranks] = ov[np.arange(len(ranks)), j]
        jmax[ranks] = j
    matched = ovmax >= iou_thresh  # (N,)
    gidx = offsets[det_img] + jmax  # (N,) global index of the best GT
    all_diff = np.concatenate([d for _, d in gt_list]) if gt_list else np.zeros(0, bool)  # (sum G,)
    on_diff = matched & all_diff[np.where(matched, gidx, 0)] if all_diff.size else np.zeros(nd, bool)
    free = np.flatnonzero(matched & ~on_diff)  # ranks whose best GT is non-difficult
    tp = np.zeros(nd)
    # the first detection (in rank order) to reach a GT takes it; later ones are duplicates (FP)
    _, first = np.unique(gidx[free], return_index=True)
    tp[free[first]] = 1
    fp = (~matched).astype(np.float64)  # no GT reached 0.5
    fp[free] = 1 - tp[free]  # duplicates; detections on difficult GTs are neither (ignored)
    found = np.zeros(int(offsets[-1]), dtype=bool)
    found[gidx[tp > 0]] = True
    return RankedOutcomes(order=order, tp=tp, fp=fp, ovmax=ovmax, npos=npos, n_difficult=n_diff, found=found)


def pr_curve(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's recall and precision after each ranked detection.

    Args:
        tp, fp (ndarray[N] float64): 1 where the ranked detection is a true / false positive (both 0:
            ignored). npos: non-difficult objects.
    Returns:
        (rec, prec) (ndarray[N] float64 each).
    """
    fp_c = np.cumsum(fp)
    tp_c = np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp_c / float(npos)  # npos = 0: 0/0 = NaN (MATLAB), so no 11-point level is reached
        prec = tp_c / (fp_c + tp_c)  # 0/0 = NaN before the first TP/FP (MATLAB)
    return rec, prec


def eval_class(
    gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
    dets: ClassDetections,
    *,
    metric: str = "07",
    iou_thresh: float = 0.5,
    name: str = "",
) -> ClassEval:
    """``VOCevaldet`` for one class.

    Args:
        gt: ``{image_id: (voc_boxes ndarray[G, 4], difficult ndarray[G] bool)}`` for EVERY image of
            the split (:func:`class_ground_truth`).
        dets: the class's detections in results-file order (VOC coordinates).
        metric: ``"07"`` (11-point, VOC 2007 default) or ``"area"`` (VOC 2010+).
        iou_thresh: minimum overlap, matched with ``>=`` (devkit ``minoverlap`` 0.5).
        name: class name for messages and the result.
    Raises:
        ValueError: a detection on an image not in ``gt`` (named; the devkit: "unrecognized
            image"), NaN scores, or an unknown metric.
    """
    if metric not in ("07", "area"):
        raise ValueError(f"metric must be '07' or 'area', got {metric!r}")
    m = rank_outcomes(gt, dets, iou_thresh=iou_thresh, name=name)
    tp, fp, npos = m.tp, m.fp, m.npos
    nd = len(tp)
    rec, prec = pr_curve(tp, fp, npos)
    ap = ap_11point(rec, prec) if metric == "07" else ap_area(rec, prec)
    n_tp, n_fp = int(tp.sum()), int(fp.sum())
    return ClassEval(
        name=name,
        n_gt=npos,
        n_difficult=m.n_difficult,
        n_det=nd,
        tp=n_tp,
        fp=n_fp,
        ignored=nd - n_tp - n_fp,
        recall=(n_tp / npos) if npos else math.nan,
        ap=ap,
        rec=rec,
        prec=prec,
    )


@dataclass(frozen=True)
class EvalResult:
    """Per-class rows and mAP of one evaluation.

    Attributes:
        metric: ``"07"`` or ``"area"``.
        classes: one :class:`ClassEval` per class, in class-id order.
        mAP: plain mean of the class APs (NaN propagates, as MATLAB ``mean``).
    """

    metric: str
    classes: tuple[ClassEval, ...]
    mAP: float

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN -> None)."""

        def f(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "metric": self.metric,
            "mAP": f(self.mAP),
            "classes": [
                {"class": c.name, "n_gt": c.n_gt, "n_difficult": c.n_difficult, "n_det": c.n_det,
                 "tp": c.tp, "fp": c.fp, "ignored": c.ignored, "recall": f(c.recall), "ap": f(c.ap)}
                for c in self.classes
            ],
        }

    def table(self) -> str:
        """Plain-text per-class table: class, #gt, #det, recall, AP."""
        w = max([5] + [len(c.name) for c in self.classes])
        lines = [f"{'class':<{w}}  {'#gt':>6}  {'#det':>7}  {'recall':>8}  {'AP':>8}",
                 "-" * (w + 37)]
        for c in self.classes:
            lines.append(f"{c.name:<{w}}  {c.n_gt:>6d}  {c.n_det:>7d}  {c.recall:>8.4f}  {c.ap:>8.4f}")
        return "\n".join(lines)


def evaluate(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    detections: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, ClassDetections],
    *,
    metric: str = "07",
    iou_thresh: float = 0.5,
) -> EvalResult:
    """VOC evaluation of a split, every class of ``class_names``.

    Args:
        records: the split's ground truth (every image; for devkit-exact scoring load with
            ``raw_boxes=True``).
        class_names: K names, ids as in ``records[i].labels``.
        detections: either per-image detector output ``{image_id: {"boxes": Tensor[N, 4] xyxy,
            "scores": Tensor[N], "labels": Tensor[N] int64}}`` or per-class lists
            ``{class_name: ClassDetections}`` (as :func:`detector.eval.comp4.read_comp4` returns; a missing class has
            no detections). Told apart by the value type.
        metric: ``"07"`` (11-point, default) or ``"area"``.
        iou_thresh: overlap threshold, ``>=``.
    Returns:
        :class:`EvalResult`.
    """
    class_names = tuple(class_names)
    per_class = per_class_detections(detections, class_names, strict=True)
    rows = []
    for k, name in enumerate(class_names):
        gt = class_ground_truth(records, k)
        rows.append(eval_class(gt, per_class[k], metric=metric, iou_thresh=iou_thresh, name=name))
    aps = [r.ap for r in rows]
    m = float(np.mean(aps)) if aps else math.nan
    return EvalResult(metric=metric, classes=tuple(rows), mAP=m)

