"""Precision-recall curves of an evaluation, drawn to a PNG.

Shape shorthand (used across the project):
    N: detections of one class      K: foreground classes

Drawn with matplotlib's object-oriented API (a :class:`matplotlib.figure.Figure` on an Agg canvas),
never through ``pyplot``: the library does not switch the caller's backend (a notebook keeps its
own) and keeps no figure in pyplot's global registry.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from detector.eval.voc_ap import EvalResult

__all__ = ["plot_pr_curves"]


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
    for c in result.classes:
        if c.rec.size and not np.isnan(c.rec).all():
            ax.plot(c.rec, np.nan_to_num(c.prec), label=f"{c.name} (AP {c.ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"PR curves ({'11-point' if result.metric == '07' else 'area'} mAP "
                 f"{result.mAP:.4f})")
    if result.classes:
        ax.legend(loc="lower left", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path
