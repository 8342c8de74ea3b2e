"""Plots of evaluations, drawn to PNGs: precision-recall curves of a detector, and proposal recall
against the number of proposals per image.

Shape shorthand (used across the project):
    N: detections of one class      K: foreground classes

Drawn with matplotlib's object-oriented API (a :class:`matplotlib.figure.Figure` on an Agg canvas),
never through ``pyplot``: the library does not switch the caller's backend (a notebook keeps its
own) and keeps no figure in pyplot's global registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from detector.artifacts import atomic_path
from detector.eval.voc_ap import EvalResult

__all__ = ["plot_pr_curves", "plot_recall_curve"]


def plot_pr_curves(result: EvalResult, path: str | Path) -> Path:
    """Precision-recall curve of every class into one PNG, AP in the legend; written atomically.

    Args:
        result: an evaluation (:func:`detector.eval.voc_ap.evaluate`); a class whose recall is
            empty or all NaN (no positives) gets no curve, NaN precision is drawn as 0.
        path: the PNG to write (parent folders are created).
    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg
    ax = fig.subplots()
    drawn = 0
    for c in result.classes:
        if c.rec.size and not np.isnan(c.rec).all():
            ax.plot(c.rec, np.nan_to_num(c.prec), label=f"{c.name} (AP {c.ap:.3f})")
            drawn += 1
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"PR curves ({'11-point' if result.metric == '07' else 'area'} mAP "
                 f"{result.mAP:.4f})")
    if drawn:  # a model with no detection at all has no curve to name
        ax.legend(loc="lower left", fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temp name has no .png suffix: format named
    return path


def plot_recall_curve(curve: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Recall@0.5, recall@0.7 and average recall against the first k proposals per image (log k).

    Args:
        curve: rows ``{"k": k, "recall@0.5": ..., "recall@0.7": ..., "AR": ...}`` in increasing k
            (:func:`proposals.proposal_recall`'s rows).
        path: the PNG to write, atomically (parent folders are created).
        title: the plot's title.
    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg
    ax = fig.subplots()
    for key in ("recall@0.5", "recall@0.7", "AR"):
        ax.plot([c["k"] for c in curve], [c[key] for c in curve], label=key)
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image (first k)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # the temp name has no .png suffix: format named
    return path
