"""Recall of a proposal file against a VOC-layout split's ground truth (``tools/proposal_recall.py``).

Recall@0.5, recall@0.7 and average recall (IoU 0.50:0.05:0.95) of the first 100, 300, 1000, 2000
and all proposals of each image, and per class with every proposal (the cap on each class's
detection recall, and so on its AP); optionally ``recall.json`` and ``recall.png`` (recall against
the number of proposals). Objects marked <difficult> are left out of the ground truth, as the VOC
devkit leaves them out of npos. The recall arithmetic is :func:`proposals.proposal_recall`; this
module adds the VOC reading, which ``proposals`` may not import.

Shape shorthand (used across the project):
    R: proposals in one image      G: ground-truth boxes in one image      K: foreground classes
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detector.artifacts import write_text
from detector.data.splits import Format, load_split
from detector.eval.plots import plot_recall_curve
from proposals.recall import proposal_recall
from proposals.store import load_proposals

__all__ = ["PROPOSAL_BUDGETS", "RecallReport", "proposal_recall_report"]

log = logging.getLogger(__name__)

PROPOSAL_BUDGETS = (100, 300, 1000, 2000)  # proposal budgets of the printed table (plus "all")


@dataclass
class RecallReport:
    """What :func:`proposal_recall_report` measured.

    Attributes:
        proposals: the proposal file.
        split: the split's name.
        result: what ``recall.json`` holds: :func:`proposals.proposal_recall`'s ``num_images``,
            ``num_gt``, ``mean_boxes`` and ``rows`` (budgets of ``PROPOSAL_BUDGETS`` and "all"), plus
            ``per_class`` rows (every proposal); with an output folder also ``curve`` (about 40
            budgets from 1 to the largest count), ``proposals``, ``split``, ``data_root`` and
            ``difficult_excluded``.
        difficult_excluded: objects left out as <difficult>.
    """

    proposals: Path
    split: str
    result: dict[str, Any]
    difficult_excluded: int

    def text(self) -> str:
        """The printed report: a summary line, the recall table and the per-class table."""
        res = self.result
        lines = [f"{self.proposals} on {self.split}: {res['num_images']} images, {res['num_gt']} objects "
                 f"({self.difficult_excluded} difficult excluded), {res['mean_boxes']:.1f} boxes/image",
                 f"{'top k':>8} {'recall@0.5':>11} {'recall@0.7':>11} {'AR':>7}"]
        for row in res["rows"]:
            lines.append(f"{row['k']!s:>8} {row['recall@0.5']:11.4f} {row['recall@0.7']:11.4f} {row['AR']:7.4f}")
        w = max([5] + [len(c["class"]) for c in res["per_class"]])
        lines.append(f"{'class':<{w}} {'objects':>8} {'recall@0.5':>11} {'recall@0.7':>11} {'AR':>7}   (all proposals)")
        for c in res["per_class"]:
            lines.append(f"{c['class']:<{w}} {c['objects']:>8d} {c['recall@0.5']:11.4f} {c['recall@0.7']:11.4f} "
                         f"{c['AR']:7.4f}")
        return "\n".join(lines)


def proposal_recall_report(
    data_root: str | Path,
    split: str,
    proposals: str | Path,
    *,
    out: str | Path | None = None,
    allow_extra: bool = False,
    top_ks: Sequence[int] = PROPOSAL_BUDGETS,
    format: Format = "voc",
) -> RecallReport:
    """Recall of the proposal file ``proposals`` on ``split``, difficult objects excluded.

    Args:
        data_root: the data set's folder.
        split: ``ImageSets/Main/<split>.txt`` (VOC) or ``annotations/instances_<split>.json`` (COCO).
        proposals: ``.npz`` / ``.mat`` / ``.pkl`` proposal file (:func:`proposals.load_proposals`).
        out: folder for ``recall.json`` and ``recall.png`` (both written atomically); None: none.
        allow_extra: the file may hold other images too.
        top_ks: budgets of the table.
        format: the data set's layout, "voc" or "coco".
    Returns:
        :class:`RecallReport`.
    Raises:
        VOCDataError / CocoDataError / ProposalFileError: the split or the proposal file cannot be
            used (named).
    """
    proposals = Path(proposals)
    records, class_names = load_split(data_root, split, format=format, log_summary=False)
    props = load_proposals(proposals, [r.image_id for r in records], allow_extra=allow_extra)
    gts = [r.boxes[~r.difficult].numpy() for r in records]  # (G, 4) each, difficult objects excluded
    plist = [props[r.image_id] for r in records]  # (R, 4) each
    res = proposal_recall(plist, gts, top_ks=top_ks)
    n_diff = sum(int(r.difficult.sum()) for r in records)
    # per class, every proposal: the cap on each class's detection recall (and AP)
    res["per_class"] = []
    for k, name in enumerate(class_names):
        gk = [r.boxes[(~r.difficult) & (r.labels == k)].numpy() for r in records]
        row = proposal_recall(plist, gk, top_ks=())["rows"][-1]
        res["per_class"].append({"class": name, "objects": sum(len(g) for g in gk),
                                 **{c: row[c] for c in ("recall@0.5", "recall@0.7", "AR")}})
    if out is not None:
        out = Path(out)
        ks = sorted({int(k) for k in np.unique(np.geomspace(1, max(2, max(len(p) for p in plist)), 40).astype(int))})
        curve = proposal_recall(plist, gts, top_ks=ks)
        res["curve"] = [{"k": r["k"], "recall@0.5": r["recall@0.5"], "recall@0.7": r["recall@0.7"],
                         "AR": r["AR"]} for r in curve["rows"][:-1]]
        res.update(proposals=str(proposals), split=split, data_root=str(data_root), difficult_excluded=n_diff)
        write_text(out / "recall.json", json.dumps(res, indent=1))
        plot_recall_curve(res["curve"], out / "recall.png", title=f"{proposals.name} on {split}")
        log.info("wrote %s and %s", out / "recall.json", out / "recall.png")
    return RecallReport(proposals=proposals, split=split, result=res, difficult_excluded=n_diff)
