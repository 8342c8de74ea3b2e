"""Devkit results files ``comp4_det_<split>_<class>.txt``: write and read them exactly.

Shape shorthand (used across the project):
    N: detections      K: foreground classes

Lines are ``<image_id> <score> <x1> <y1> <x2> <y2>`` in the devkit's 1-based inclusive VOC
coordinates (the conversion from project xyxy is :func:`detector.eval.voc_ap.detections_by_class`);
numbers are written as the shortest text that reads back as the same double, so a written file
scores exactly like the in-memory detections.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from detector.artifacts import write_text
from detector.eval.voc_ap import ClassDetections, per_class_detections

__all__ = ["ResultsFileError", "comp4_path", "write_comp4", "read_comp4"]

log = logging.getLogger(__name__)


class ResultsFileError(ValueError):
    """A results file (or folder) that cannot be scored: names the file, line and problem."""


def comp4_path(results_dir: str | Path, split: str, class_name: str) -> Path:
    """``<results_dir>/comp4_det_<split>_<class>.txt`` (devkit naming)."""
    return Path(results_dir) / f"comp4_det_{split}_{class_name}.txt"


def _fmt(x: float) -> str:
    # repr: the shortest text that reads back as the same double, so a written file scores
    # exactly like the in-memory detections (ties stay ties, distinct scores stay distinct).
    return repr(float(x))


def write_comp4(
    results_dir: str | Path,
    split: str,
    class_names: Sequence[str],
    detections: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, ClassDetections],
) -> list[Path]:
    """Write one devkit results file per class (every class, empty files included).

    Lines are ``<image_id> <score> <x1> <y1> <x2> <y2>`` in 1-based inclusive VOC coordinates
    (converted from xyxy with ``boxes.xyxy_to_voc``), in results-file order (the tie order).
    Each file is written atomically (temp file + ``os.replace``).

    Args:
        detections: per-image detector output or ``{class_name: ClassDetections}``, as
            :func:`detector.eval.voc_ap.evaluate`.
    Returns:
        the K paths written.
    """
    class_names = tuple(class_names)
    per_class = per_class_detections(detections, class_names)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dets in zip(class_names, per_class):
        path = comp4_path(out, split, name)
        write_text(path, "".join(f"{i} {_fmt(s)} {_fmt(b[0])} {_fmt(b[1])} {_fmt(b[2])} {_fmt(b[3])}\n"
                                 for i, s, b in zip(dets.image_ids, dets.scores, dets.voc_boxes)))
        paths.append(path)
    return paths


def read_comp4(
    results_dir: str | Path,
    split: str,
    class_names: Sequence[str],
    *,
    image_ids: Sequence[str] | None = None,
) -> dict[str, ClassDetections]:
    """Read devkit results files ``comp4_det_<split>_<class>.txt``.

    Any whitespace separates fields (tabs, repeated spaces); blank lines are skipped; float
    coordinates are fine. A class whose file is missing gets no detections (warning).

    Args:
        image_ids: the split's ids; when given, a detection on any other image is an error.
    Returns:
        ``{class_name: ClassDetections}`` in file order.
    Raises:
        ResultsFileError: a malformed line (file and line number named), a non-finite number, or
            an image id not in ``image_ids`` (named).
    """
    known = set(image_ids) if image_ids is not None else None
    out: dict[str, ClassDetections] = {}
    for name in class_names:
        path = comp4_path(results_dir, split, name)
        if not path.is_file():
            log.warning("%s not found: class '%s' scored with no detections", path, name)
            out[name] = ClassDetections.empty()
            continue
        ids: list[str] = []
        vals: list[list[float]] = []
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ResultsFileError(f"{path}: not a text results file (byte {e.start} is not UTF-8)") from None
        for ln, line in enumerate(text.splitlines(), start=1):
            tok = line.split()
            if not tok:
                continue
            if len(tok) != 6:
                raise ResultsFileError(f"{path}:{ln}: expected '<image_id> <score> <x1> <y1> <x2> <y2>', "
                                   f"got {len(tok)} fields: {line.strip()!r}")
            try:
                v = [float(t) for t in tok[1:]]
            except ValueError:
                raise ResultsFileError(f"{path}:{ln}: not a number in {line.strip()!r}") from None
            if not all(math.isfinite(x) for x in v):
                raise ResultsFileError(f"{path}:{ln}: non-finite value in {line.strip()!r}")
            if known is not None and tok[0] not in known:
                raise ResultsFileError(f"{path}:{ln}: image '{tok[0]}' is not in split '{split}'")
            ids.append(tok[0])
            vals.append(v)
        arr = np.asarray(vals, dtype=np.float64).reshape(-1, 5)  # (N, 5)
        out[name] = ClassDetections(tuple(ids), arr[:, 0].copy(), arr[:, 1:].copy())
    return out

