"""Where a detector's false positives come from: every detection of a split judged as the devkit
judges it, each false positive put down to one cause, and the AP each cause costs.

Shape shorthand (used across the project):
    N: detections of one class      G: ground-truth boxes of one image      K: foreground classes

After Hoiem, Chodpathumwan and Dai, "Diagnosing error in object detectors" (ECCV 2012) and TIDE
(Bolya et al., ECCV 2020). The devkit's matching (:func:`detector.eval.voc_ap.rank_outcomes`) says
which detections are false positives; each one then gets the first cause that fits:

* ``duplicate``: its best ground truth of the class (IoU >= 0.5) was taken by a higher-scored
  detection;
* ``localization``: its best IoU with an object of the class is in [0.1, 0.5);
* ``confusion``: IoU >= 0.1 with an object of another class (``confused_with`` counts them by that
  class; :func:`plot_confusion` draws the detected-as x object-class matrix);
* ``background``: IoU < 0.1 with every object; ``at_border`` counts those that reach within
  ``border_px`` pixels of an image edge, where objects cut by the frame are often left unannotated.

Counts are given over the ``n_gt`` best-scored detections of a class (``n_gt`` its non-difficult
objects: the length of list at which a perfect detector reaches recall 1, Hoiem's "top-ranked"
view) and over all of them. The AP a cause costs (``dAP``) is the class's AP with that cause's
false positives taken out of the ranked list, minus its AP (TIDE's oracle, one cause at a time);
with every false positive taken out, what is left is the AP that the misses allow. ``missed``:
objects no detection finds at IoU 0.5; given the proposals, ``missed_no_proposal`` says how many
of them no proposal reaches either (only better proposals find those).

IoU with other classes and the frame are computed on project xyxy boxes, converted at the edge
with ``boxes.voc_to_xyxy`` (plain IoU on them equals the devkit's ``+1`` IoU on the VOC boxes, see
``detector.postprocess``), vectorised over a class's false positives.

Why not ``tidecv``, the field's tool for this: its wheel requires ``opencv-python``, which
installs a second ``cv2`` over the ``opencv-contrib-python-headless`` that selective search needs,
plus pandas and seaborn; and it ranks with COCO's 101-point AP over IoU thresholds, not the VOC07
11-point AP this project reports, so its dAPs would not add up to the figures beside them.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from detector.artifacts import atomic_path, write_text
from detector.boxes import valid_boxes_mask, voc_to_xyxy
from detector.data.voc import ImageRecord
from detector.eval.voc_ap import (
    ClassDetections,
    ap_11point,
    ap_area,
    class_ground_truth,
    per_class_detections,
    pr_curve,
    rank_outcomes,
)

__all__ = ["CAUSES", "FalsePositive", "ClassErrors", "ErrorReport", "analyze_errors", "plot_errors", "plot_confusion",
           "false_positive_gallery", "write_error_report"]

log = logging.getLogger(__name__)

CAUSES = ("duplicate", "localization", "confusion", "background")
BACKGROUND_IOU = 0.1  # Hoiem et al.'s and TIDE's threshold between "near an object" and background


@dataclass(frozen=True)
class FalsePositive:
    """One false positive: where it is, how it scored and why it is wrong."""

    image_id: str
    box: tuple[float, float, float, float]  # project xyxy, original-image pixels
    score: float
    cause: str  # one of CAUSES
    at_border: bool  # within border_px of an image edge


@dataclass
class ClassErrors:
    """The error breakdown of one class.

    Attributes:
        name: class name.
        n_gt: non-difficult objects (npos); n_det: detections.
        ap: the class's AP (the run's metric).
        top: counts over the ``min(n_gt, n_det)`` best-scored detections: ``true``, each cause of
            :data:`CAUSES`, ``background_at_border`` and ``ignored`` (on difficult objects).
        all: the same counts over every detection.
        missed: objects found by no detection.
        missed_no_proposal: of those, the ones no proposal reaches at IoU 0.5 (None when the
            proposals were not given): misses that only better proposals can fix.
        ap_without: the AP with the false positives of each cause removed, and with ``all`` removed.
        worst: the highest-scored false positives (for :func:`false_positive_gallery`).
        confused_with: of the ``top`` confusions, how many sit on each other class (most first).
    """

    name: str
    n_gt: int
    n_det: int
    ap: float
    top: dict[str, int]
    all: dict[str, int]
    missed: int
    ap_without: dict[str, float]
    worst: list[FalsePositive] = field(default_factory=list)
    missed_no_proposal: int | None = None
    confused_with: dict[str, int] = field(default_factory=dict)

    def dap(self, cause: str) -> float:
        """AP gained if the false positives of ``cause`` (or ``"all"``) were not there."""
        return self.ap_without[cause] - self.ap


@dataclass
class ErrorReport:
    """:func:`analyze_errors`' result: one :class:`ClassErrors` per class."""

    metric: str
    border_px: float
    classes: list[ClassErrors]

    def to_dict(self) -> dict:
        """JSON-ready (NaN -> None)."""

        def f(x: float) -> float | None:
            return None if isinstance(x, float) and math.isnan(x) else x

        return {"metric": self.metric, "border_px": self.border_px, "causes": list(CAUSES),
                "classes": [{**{k: v for k, v in asdict(c).items() if k not in ("ap", "ap_without", "worst")},
                             "ap": f(c.ap), "ap_without": {k: f(v) for k, v in c.ap_without.items()},
                             "dap": {k: f(c.dap(k)) for k in c.ap_without},
                             "worst": [asdict(w) for w in c.worst]} for c in self.classes]}

    def text(self) -> str:
        """Two tables: the best-scored detections by verdict, and the AP each cause costs."""
        w = max([5] + [len(c.name) for c in self.classes])
        props = all(c.missed_no_proposal is not None for c in self.classes)
        head = (f"{'class':<{w}}  {'#gt':>5}  {'true':>5}  {'dupl':>5}  {'loc':>5}  {'conf':>5}  {'bkg':>5}  "
                f"{'(edge)':>6}  {'missed':>6}" + (f"  {'(no proposal)':>13}" if props else ""))
        lines = [f"the n_gt best-scored detections of each class (edge: background boxes within "
                 f"{self.border_px:g} px of the frame); missed: objects no detection finds"
                 + ("; no proposal: of those, the ones no proposal reaches at IoU 0.5" if props else ""),
                 head, "-" * len(head)]
        for c in self.classes:
            t = c.top
            lines.append(f"{c.name:<{w}}  {c.n_gt:>5d}  {t['true']:>5d}  {t['duplicate']:>5d}  "
                         f"{t['localization']:>5d}  {t['confusion']:>5d}  {t['background']:>5d}  "
                         f"{t['background_at_border']:>6d}  {c.missed:>6d}"
                         + (f"  {c.missed_no_proposal:>13d}" if props else ""))
        confused = [c for c in self.classes if c.confused_with]
        if confused:
            lines += ["", "boxes on another class (conf above), by that class, most first:"]
            lines += [f"  {c.name:<{w}}  " + ", ".join(f"{k} {v}" for k, v in list(c.confused_with.items())[:5])
                      for c in confused]
        head = (f"{'class':<{w}}  {'AP':>7}  {'+dupl':>7}  {'+loc':>7}  {'+conf':>7}  {'+bkg':>7}  "
                f"{'+all FP':>7}")
        lines += ["", f"AP ({self.metric}) and what it gains with each cause's false positives removed",
                  head, "-" * len(head)]
        for c in self.classes:
            lines.append(f"{c.name:<{w}}  {c.ap:>7.4f}  " + "  ".join(
                f"{c.dap(k):>+7.4f}" for k in (*CAUSES, "all")))
        if self.classes:
            mean = {k: float(np.mean([c.dap(k) for c in self.classes])) for k in (*CAUSES, "all")}
            m_ap = float(np.mean([c.ap for c in self.classes]))
            lines.append(f"{'mean':<{w}}  {m_ap:>7.4f}  " + "  ".join(f"{mean[k]:>+7.4f}" for k in (*CAUSES, "all")))
        return "\n".join(lines)


def _ap(tp: np.ndarray, fp: np.ndarray, npos: int, metric: str) -> float:
    """The devkit's AP of a ranked tp/fp list (as :func:`detector.eval.voc_ap.eval_class`)."""
    rec, prec = pr_curve(tp, fp, npos)
    return ap_11point(rec, prec) if metric == "07" else ap_area(rec, prec)


def _at_border(boxes: torch.Tensor, height: torch.Tensor | float, width: torch.Tensor | float, px: float
               ) -> torch.Tensor:
    """Tensor[N] bool: xyxy boxes that come within ``px`` of the frame [0, W] x [0, H] (sizes per box or one)."""
    return ((boxes[:, 0] <= px) | (boxes[:, 1] <= px) | (boxes[:, 2] >= width - px)
            | (boxes[:, 3] >= height - px))


class _SplitGT:
    """Every image's objects padded to one tensor, so that a class's false positives are compared
    with the objects of their images in one vectorised step.

    Attributes:
        index: image id -> row.
        boxes (Tensor[I, Gmax, 4] float64): project xyxy; padding and degenerate boxes are masked.
        labels (Tensor[I, Gmax] int64): class ids, -1 for padding and degenerate boxes.
        height, width (Tensor[I] float64): image sizes.
    """

    def __init__(self, records: Sequence[ImageRecord]) -> None:
        self.index = {r.image_id: i for i, r in enumerate(records)}
        g_max = max([int(r.boxes.reshape(-1, 4).shape[0]) for r in records] + [1])
        self.boxes = torch.zeros(len(records), g_max, 4, dtype=torch.float64)
        self.labels = torch.full((len(records), g_max), -1, dtype=torch.int64)
        for i, r in enumerate(records):
            b = r.boxes.reshape(-1, 4).to(torch.float64)
            ok = valid_boxes_mask(b)  # a degenerate box (kept as annotated) overlaps nothing
            self.boxes[i, :b.shape[0]] = b
            self.labels[i, :b.shape[0]] = torch.where(ok, r.labels, -1)
        self.height = torch.tensor([float(r.height) for r in records], dtype=torch.float64)
        self.width = torch.tensor([float(r.width) for r in records], dtype=torch.float64)

    def other_class_iou(self, img: np.ndarray, boxes: torch.Tensor, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Each box's largest IoU with an object of another class in its image, and that object's class.

        ``torchvision.ops.box_iou``'s arithmetic, vectorised over images.

        Args:
            img (ndarray[n] int64): image row of each box; boxes (Tensor[n, 4] float64): xyxy.
        Returns:
            (iou ndarray[n] float64, 0 where there is no such object; cls ndarray[n] int64, -1 there).
        """
        out = np.zeros(len(img))
        cls = np.full(len(img), -1, dtype=np.int64)
        step = max(1, (1 << 22) // self.boxes.shape[1])  # about 4M box pairs (~130 MB of float64) at a time
        for s in range(0, len(img), step):
            idx = torch.from_numpy(img[s:s + step])
            g, lab = self.boxes[idx], self.labels[idx]  # (n, Gmax, 4), (n, Gmax)
            b = boxes[s:s + step, None, :]  # (n, 1, 4)
            lt = torch.maximum(b[..., :2], g[..., :2])  # (n, Gmax, 2)
            rb = torch.minimum(b[..., 2:], g[..., 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (n, Gmax)
            area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # (n, 1)
            area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])  # (n, Gmax)
            iou = inter / (area_b + area_g - inter)
            iou = torch.where((lab >= 0) & (lab != label), iou, torch.zeros_like(iou)).nan_to_num(0.0)
            best, j = iou.max(dim=1)  # (n,), (n,)
            out[s:s + step] = best.numpy()
            cls[s:s + step] = torch.where(best > 0, lab.gather(1, j[:, None])[:, 0], -1).numpy()
        return out, cls


def _missed_without_proposal(gt: Mapping[str, tuple[np.ndarray, np.ndarray]], found: np.ndarray,
                             proposals: Mapping[str, Any]) -> int:
    """Non-difficult objects that no detection found and no proposal reaches at IoU 0.5."""
    n, off = 0, 0
    for image_id, (voc_boxes, difficult) in gt.items():
        g = len(difficult)
        missed = ~found[off:off + g] & ~difficult  # (G,)
        off += g
        if not missed.any():
            continue
        objects = voc_to_xyxy(voc_boxes[missed]).to(torch.float64).reshape(-1, 4)  # (g', 4)
        props = torch.as_tensor(np.asarray(proposals.get(image_id, np.zeros((0, 4)))), dtype=torch.float64)
        props = props.reshape(-1, 4)
        if props.shape[0] == 0:
            n += objects.shape[0]
            continue
        n += int((box_iou(objects, props).amax(dim=1) < 0.5).sum())
    return n


def _class_errors(records: Sequence[ImageRecord], split: _SplitGT, class_names: tuple[str, ...], label: int,
                  dets: ClassDetections, metric: str, border_px: float, keep_worst: int,
                  proposals: Mapping[str, Any] | None) -> ClassErrors:
    name = class_names[label]
    gt = class_ground_truth(records, label)
    m = rank_outcomes(gt, dets, name=name)
    nd = len(m.order)
    cause = np.full(nd, "", dtype=object)  # (N,) in rank order; "" for true positives and ignored
    at_border = np.zeros(nd, dtype=bool)
    confused_with = np.full(nd, -1, dtype=np.int64)  # (N,) the other object's class of a confusion
    fp_ranks = np.flatnonzero(m.fp > 0)
    # duplicates and loose boxes follow from the devkit's own best-IoU; the rest need the other classes
    cause[fp_ranks[m.ovmax[fp_ranks] >= 0.5]] = "duplicate"
    loose = (m.ovmax[fp_ranks] >= BACKGROUND_IOU) & (m.ovmax[fp_ranks] < 0.5)
    cause[fp_ranks[loose]] = "localization"
    rest = fp_ranks[cause[fp_ranks] == ""]
    idx = m.order[rest]  # results-file indices of the remaining false positives
    boxes = voc_to_xyxy(dets.voc_boxes[idx]).to(torch.float64).reshape(-1, 4)  # (n, 4)
    if len(idx):
        img = np.fromiter((split.index[dets.image_ids[i]] for i in idx), np.int64, len(idx))  # (n,)
        iou, other = split.other_class_iou(img, boxes, label)  # (n,), (n,)
        conf = iou >= BACKGROUND_IOU
        cause[rest] = np.where(conf, "confusion", "background")
        confused_with[rest] = np.where(conf, other, -1)
        at_border[rest] = _at_border(boxes, split.height[img], split.width[img], border_px).numpy() & ~conf

    def counts(n: int) -> dict[str, int]:
        c = cause[:n]
        out = {"true": int(m.tp[:n].sum()), **{k: int((c == k).sum()) for k in CAUSES},
               "background_at_border": int(at_border[:n].sum())}
        out["ignored"] = n - out["true"] - sum(out[k] for k in CAUSES)
        return out

    top_other = confused_with[:min(m.npos, nd)]
    on_class = {class_names[j]: int((top_other == j).sum()) for j in np.unique(top_other[top_other >= 0])}
    ap = _ap(m.tp, m.fp, m.npos, metric)
    ap_without = {}
    for k in (*CAUSES, "all"):
        keep = (cause != k) if k != "all" else (m.fp == 0)  # (N,)
        ap_without[k] = _ap(m.tp[keep], m.fp[keep], m.npos, metric)
    worst = []
    for r in fp_ranks[:keep_worst]:
        i = m.order[r]
        box = voc_to_xyxy(dets.voc_boxes[i:i + 1])[0].tolist()
        worst.append(FalsePositive(image_id=dets.image_ids[i], box=tuple(round(v, 2) for v in box),
                                   score=float(dets.scores[i]), cause=str(cause[r]), at_border=bool(at_border[r])))
    return ClassErrors(name=name, n_gt=m.npos, n_det=nd, ap=ap, top=counts(min(m.npos, nd)), all=counts(nd),
                       missed=m.npos - int(m.tp.sum()), ap_without=ap_without, worst=worst,
                       confused_with=dict(sorted(on_class.items(), key=lambda kv: -kv[1])),
                       missed_no_proposal=None if proposals is None else
                       _missed_without_proposal(gt, m.found, proposals))


def analyze_errors(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    detections: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, ClassDetections],
    *,
    metric: str = "07",
    border_px: float = 2.0,
    keep_worst: int = 8,
    proposals: Mapping[str, Any] | None = None,
) -> ErrorReport:
    """The false positives of every class by cause, and the AP each cause costs.

    Args:
        records: the split's ground truth (every image; ``raw_boxes=True`` as the devkit scores).
        class_names: K names, ids as in ``records[i].labels``.
        detections: per-image detector output or per-class lists, as
            :func:`detector.eval.voc_ap.evaluate` takes them.
        metric: "07" (11-point) or "area".
        border_px: a background false positive "at the border" comes this close to an image edge.
        keep_worst: false positives kept per class for the gallery, highest-scored first.
        proposals: ``{image_id: boxes}`` (array or Tensor [R, 4] xyxy, original-image pixels), the
            windows the detector scored: then each class also counts the missed objects that no
            proposal reaches at IoU 0.5. None: not counted.
    Returns:
        :class:`ErrorReport`; its AP per class is :func:`detector.eval.voc_ap.evaluate`'s.
    Raises:
        ValueError: an unknown metric, a negative ``border_px``, or a detection on an image outside
            the split (named).
    """
    if metric not in ("07", "area"):
        raise ValueError(f"metric must be '07' or 'area', got {metric!r}")
    if not (math.isfinite(border_px) and border_px >= 0):
        raise ValueError(f"border_px must be a number >= 0, got {border_px!r}")
    class_names = tuple(class_names)
    per_class = per_class_detections(detections, class_names, strict=True)
    split = _SplitGT(records)
    classes = [_class_errors(records, split, class_names, k, per_class[k], metric, float(border_px), keep_worst,
                             proposals) for k in range(len(class_names))]
    return ErrorReport(metric=metric, border_px=float(border_px), classes=classes)


_CAUSE_COLOURS = {"true": "#2ca02c", "duplicate": "#9467bd", "localization": "#ff7f0e", "confusion": "#8c564b",
                  "background": "#d62728", "background_at_border": "#f4a6a6", "ignored": "#c7c7c7"}


def plot_errors(report: ErrorReport, path: str | Path) -> Path:
    """Two panels into one PNG, written atomically: each class's ``n_gt`` best-scored detections as
    a stacked bar by verdict (background split into inside and at the border), and the AP each
    cause costs per class.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [c.name for c in report.classes]
    height = 1.9 + 0.4 * max(3, len(names))  # inches: 1 for the legends under the bars
    fig = Figure(figsize=(12, height), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(names))
    left = np.zeros(len(names))
    parts = [("true", "true"), ("duplicate", "duplicate"), ("localization", "localization"),
             ("confusion", "confusion"), ("background_inside", "background"),
             ("background_at_border", f"background at the frame ({report.border_px:g} px)"),
             ("ignored", "on difficult objects")]
    for key, label in parts:
        if key == "background_inside":
            v = np.array([c.top["background"] - c.top["background_at_border"] for c in report.classes], float)
            colour = _CAUSE_COLOURS["background"]
        else:
            v = np.array([c.top[key] for c in report.classes], float)
            colour = _CAUSE_COLOURS[key]
        share = v / np.maximum(1, [c.top["true"] + sum(c.top[k] for k in CAUSES) + c.top["ignored"]
                                   for c in report.classes])
        ax1.barh(y, share, left=left, color=colour, label=label)
        left += share
    ax1.set_yticks(y, [f"{c.name} ({c.n_gt})" for c in report.classes])
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1)
    ax1.set_title("the n_gt best-scored detections of each class", fontsize=10)
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    width = 0.8 / (len(CAUSES) + 1)
    for i, k in enumerate((*CAUSES, "all")):
        colour = _CAUSE_COLOURS.get(k, "#1f77b4")
        ax2.barh(y - 0.4 + (i + 0.5) * width, [c.dap(k) for c in report.classes], height=width, color=colour,
                 label="all false positives" if k == "all" else k)
    ax2.set_yticks(y, names)
    ax2.invert_yaxis()
    ax2.set_title(f"AP gained with these false positives removed ({report.metric})", fontsize=10)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    ax2.grid(True, axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.14, right=0.98, top=1 - 0.35 / height, bottom=1.0 / height, wspace=0.35)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_confusion(report: ErrorReport, path: str | Path) -> Path:
    """Which objects each class's best-scored detections sit on, as a matrix PNG (written atomically).

    Row: the detected class, over its ``n_gt`` best-scored detections; column: the class of the object
    a detection is on (the diagonal: true detections; off it: ``confusion``), or background. Each row
    is divided by its number of detections, so duplicates, loose boxes and ignored detections are what
    a row lacks to 1. Like mmdetection's ``confusion_matrix.py``, with the devkit's matching.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [c.name for c in report.classes]
    k = len(names)
    counts = np.zeros((k, k + 1))
    for i, c in enumerate(report.classes):
        counts[i, i] = c.top["true"]
        for other, v in c.confused_with.items():
            counts[i, names.index(other)] = v
        counts[i, k] = c.top["background"]
    rows = np.array([max(1, min(c.n_gt, c.n_det)) for c in report.classes], float)
    share = counts / rows[:, None]
    side = 2.5 + 0.45 * k
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k + 1), [*names, "background"], rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("the object it is on")
    ax.set_ylabel("detected as")
    ax.set_title("the n_gt best-scored detections of each class", fontsize=10)
    if k <= 20:
        for i in range(k):
            for j in range(k + 1):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def false_positive_gallery(records: Sequence[ImageRecord], class_names: Sequence[str], report: ErrorReport,
                           path: str | Path, *, crop_height: int = 140) -> Path | None:
    """The highest-scored false positives of each class, one row per class, written as one PNG.

    Each picture is the detection (its class's colour) and every object annotated there (green)
    in a crop around it with half its size of context on each side, scaled to ``crop_height``,
    with the score and the cause under it.

    Returns:
        ``path``, or None (nothing written) when no class has a false positive or an image they are
        on is not there (scoring needs only the annotations; a warning names one such image).
    """
    from PIL import Image

    from detector.visualize import caption, draw_detections, tile
    from proposals.imageio import read_image

    by_id = {r.image_id: r for r in records}
    missing = sorted({fp.image_id for c in report.classes for fp in c.worst
                      if not Path(by_id[fp.image_id].path).is_file()})
    if missing:
        log.warning("%s not drawn: %d image(s) not found, e.g. %s", Path(path).name, len(missing),
                    by_id[missing[0]].path)
        return None
    read: dict[str, np.ndarray] = {}  # each image decoded once
    cols = max([len(c.worst) for c in report.classes] + [0])
    cells: list[np.ndarray] = []
    for k, c in enumerate(report.classes):
        row: list[np.ndarray] = []
        for fp in c.worst:
            rec = by_id[fp.image_id]
            im = read.get(fp.image_id)
            if im is None:
                im = read[fp.image_id] = read_image(rec.path)
            x1, y1, x2, y2 = fp.box
            mx, my = max(8.0, 0.5 * (x2 - x1)), max(8.0, 0.5 * (y2 - y1))
            cx1, cy1 = int(max(0, math.floor(x1 - mx))), int(max(0, math.floor(y1 - my)))
            cx2, cy2 = int(min(im.shape[1], math.ceil(x2 + mx))), int(min(im.shape[0], math.ceil(y2 + my)))
            if cx2 <= cx1 or cy2 <= cy1:
                continue
            # scale the crop first, then draw, so that lines and labels look alike in every cell
            scale = min(crop_height / (cy2 - cy1), 1.5 * crop_height / (cx2 - cx1))
            size = (max(1, round((cx2 - cx1) * scale)), max(1, round((cy2 - cy1) * scale)))
            crop = np.array(Image.fromarray(im[cy1:cy2, cx1:cx2]).resize(size, Image.BILINEAR))
            shift = torch.tensor([cx1, cy1, cx1, cy1], dtype=torch.float32)
            box = (torch.tensor([fp.box], dtype=torch.float32) - shift) * scale  # (1, 4)
            gt_ok = valid_boxes_mask(rec.boxes.reshape(-1, 4))  # annotations kept as written may be degenerate
            ok = valid_boxes_mask(box)
            pic = draw_detections(
                crop,
                {"boxes": box[ok], "scores": torch.tensor([fp.score])[ok], "labels": torch.tensor([k])[ok]},
                class_names, ground_truth={"boxes": (rec.boxes.reshape(-1, 4)[gt_ok] - shift) * scale,
                                           "labels": rec.labels[gt_ok]},
                width=2, font_size=10)
            cell_w = round(1.5 * crop_height)
            if pic.shape[1] < cell_w:  # room for the caption under a narrow crop
                pic = np.concatenate([pic, np.full((pic.shape[0], cell_w - pic.shape[1], 3), 255, np.uint8)], 1)
            label = fp.cause + (", at the frame" if fp.at_border else "")
            row.append(caption(pic, [f"{c.name} {fp.score:.2f}", label, fp.image_id[:24]], font_size=11))
        if row:  # one row per class: pad it to the full width so the next class starts a row
            cells += row + [np.full((1, 1, 3), 255, np.uint8)] * (cols - len(row))
    if not cells:
        return None
    path = Path(path)
    picture = tile(cells, columns=cols)
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return path


def write_error_report(report: ErrorReport, out_dir: str | Path, extra: dict | None = None
                       ) -> tuple[Path, Path, Path]:
    """``errors.json``, ``errors.png`` and ``confusion.png`` into ``out_dir`` (atomically); returns the paths."""
    out_dir = Path(out_dir)
    js = out_dir / "errors.json"
    write_text(js, json.dumps({**(extra or {}), **report.to_dict()}, indent=1) + "\n")
    return js, plot_errors(report, out_dir / "errors.png"), plot_confusion(report, out_dir / "confusion.png")
