"""The error analysis of comp4 result files on a split (``sppnet errors``): read, analyse, write.

Like :mod:`detector.eval.score_files` for the scores: the results may come from any detector that
writes devkit ``comp4_det_<split>_<class>.txt`` files; the analysis is :mod:`detector.eval.errors`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from detector.data.splits import Format, load_split
from detector.eval.comp4 import ResultsFileError, read_comp4
from detector.eval.errors import analyze_errors, false_positive_gallery, write_error_report

__all__ = ["error_report_from_files"]


def error_report_from_files(
    data_root: str | Path,
    split: str,
    results: str | Path,
    *,
    out: str | Path | None = None,
    metric: Literal["07", "area"] = "07",
    classes: Sequence[str] | None = None,
    border_px: float = 2.0,
    gallery: int = 8,
    proposals: str | Path | None = None,
    format: Format = "voc",
    argv: Sequence[str] = (),
) -> str:
    """Analyse ``<results>/comp4_det_<split>_<class>.txt`` and write ``errors.json``, ``errors.png``, ``confusion.png``
    and (with ``gallery`` > 0 and the images present) ``false_positives.png`` into ``out`` (default
    ``results``).

    ``proposals``: the proposal file the detector scored (``.npz`` / ``.mat`` / ``.pkl``, every image
    of the split; other images are allowed): the missed objects that no proposal reaches are counted.

    Returns:
        the printed report (:meth:`detector.eval.errors.ErrorReport.text` and the files written).
    Raises:
        VOCDataError / CocoDataError: the split cannot be read (named); ResultsFileError: ``results``
        is not a folder, a malformed line, or a detection on an image outside the split;
        ProposalFileError: a proposal file that lacks an image of the split (named).
    """
    results = Path(results)
    records, classes = load_split(data_root, split, tuple(classes) if classes else None, format=format,
                                  raw_boxes=True, require_images=False)
    if not results.is_dir():
        raise ResultsFileError(f"{results} is not a folder (of comp4 result files)")
    dets = read_comp4(results, split, classes, image_ids=[r.image_id for r in records])
    props = None
    if proposals is not None:
        from proposals.store import load_proposals

        props = load_proposals(proposals, [r.image_id for r in records], allow_extra=True)
    report = analyze_errors(records, classes, dets, metric=metric, border_px=border_px, keep_worst=gallery,
                            proposals=props)
    out_dir = Path(out) if out is not None else results
    written = list(write_error_report(report, out_dir, {"data_root": str(data_root), "split": split,
                                                        "results": str(results), "argv": list(argv)}))
    if gallery > 0:
        pic = false_positive_gallery(records, classes, report, out_dir / "false_positives.png")
        if pic is not None:
            written.append(pic)
    return report.text() + "\nwrote " + ", ".join(str(p) for p in written)
