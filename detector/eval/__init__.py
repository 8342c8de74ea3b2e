"""Detection evaluation: exact Pascal VOC AP (the only ``+1`` arithmetic of the project), devkit
comp4 results files, COCO AP through pycocotools, precision-recall plots, proposal recall on a split.

Modules:
    voc_ap   the devkit's ``VOCevaldet``: per-class matching, 11-point and area AP, mAP
    comp4    ``comp4_det_<split>_<class>.txt`` writing and reading
    coco     COCO ground truth / results dicts and ``COCOeval`` bbox AP
    plots    precision-recall and proposal-recall curves to PNGs (matplotlib, object-oriented API)
    score_files      comp4 result files of a split scored: AP, COCO AP, eval.json, PR curves
    errors           false positives by cause (duplicate, localization, confusion, background) and the
                     AP each costs, with errors.png, confusion.png and a gallery of the worst; error_files: the same
                     from comp4 files (``sppnet errors``)
    proposal_report  recall of a proposal file on a split: tables, recall.json, recall.png
    jitter           synthetic comp4 files made from a split's ground truth (to exercise scoring)

pycocotools and matplotlib are imported only when a COCO figure or a plot is asked for.
"""
from __future__ import annotations

from detector.eval import coco, comp4, errors, jitter, plots, proposal_report, score_files, voc_ap
from detector.eval.coco import coco_detections, coco_evaluate, coco_ground_truth
from detector.eval.comp4 import ResultsFileError, comp4_path, read_comp4, write_comp4
from detector.eval.errors import ErrorReport, analyze_errors, false_positive_gallery, plot_errors
from detector.eval.jitter import jitter_detections, write_jittered_comp4
from detector.eval.plots import plot_pr_curves, plot_recall_curve
from detector.eval.proposal_report import PROPOSAL_BUDGETS, RecallReport, proposal_recall_report
from detector.eval.score_files import ScoreReport, score_comp4_files
from detector.eval.voc_ap import (
    RECALL_LEVELS_11,
    ClassDetections,
    ClassEval,
    EvalResult,
    ap_11point,
    ap_area,
    class_ground_truth,
    detections_by_class,
    eval_class,
    evaluate,
    per_class_detections,
)

__all__ = [*voc_ap.__all__, *comp4.__all__, *coco.__all__, *plots.__all__, *score_files.__all__,
           *proposal_report.__all__, *jitter.__all__, "ErrorReport", "analyze_errors", "plot_errors",
           "false_positive_gallery"]
