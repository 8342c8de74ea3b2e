"""The detector checkpoint file (``model.pt``): write, read, check.

A checkpoint is a plain dict of tensors, numbers, strings and lists, written atomically and read
with ``torch.load(weights_only=True)``, so that loading can never run code::

    format        "sppnet-detector-v2"
    arch, width_mult, input_format, class_names, levels
    params        DetectParams as a dict (every test-time setting, once)
    backbone      trunk state_dict          head    FCHead state_dict (fc6, fc7[, cls_score])
    svms          {"weight" [F, K], "bias" [K], "feature_scale"}
    bbox          {"weight" [D+1, 4K], "feature_scale"} or None
    meta          free-form (resolved config, training figures)

Version 1 files (``sppnet-detector-v1``, flat fields) are converted when read. Every way a file
can fail (missing, unsafe, another format, missing fields, class names that are not distinct
strings, parts that do not fit together) raises :class:`CheckpointError` naming the file and the problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.artifacts import ArtifactError, load_torch, save_torch
from detector.backbones import WeightsError, build_backbone, load_backbone_weights
from detector.bbox_reg import BoxRegressor
from detector.detector import DetectParams, SPPDetector
from detector.head import FCHead
from detector.svm import LinearSVMs

__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "detector_state", "save_detector", "load_detector"]

CHECKPOINT_FORMAT = "sppnet-detector-v2"
_V1 = "sppnet-detector-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, unsafe, wrong format, inconsistent); names the file."""


def detector_state(det: SPPDetector) -> dict[str, Any]:
    """The checkpoint dict of a detector.

    Raises:
        ValueError: fc6/fc7 are SVD-compressed (the checkpoint holds the dense layers; set
            ``params.svd_rank`` and :meth:`SPPDetector.load` compresses them).
    """
    if det.svd_rank:
        raise ValueError("SPPDetector.save: fc6/fc7 are SVD-compressed; save the dense model with "
                         "params.svd_rank set (SPPDetector.load applies it)")
    if det.fc_precision != "float32":
        raise ValueError(f"SPPDetector.save: fc6/fc7 run at {det.fc_precision}; save the float32 model with "
                         "params.fc_precision set (SPPDetector.load applies it)")

    def cpu(sd: dict) -> dict:
        return {k: v.detach().cpu() for k, v in sd.items()}

    return {
        "format": CHECKPOINT_FORMAT,
        "arch": det.arch,
        "width_mult": det.width_mult,
        "input_format": det.backbone.input_format,
        "class_names": list(det.class_names),
        "levels": list(det.levels),
        "params": det.params.to_dict(),
        "backbone": cpu(det.backbone.state_dict()),
        "head": cpu(det.head.state_dict()),
        "svms": {**cpu(det.svms.state_dict()), "feature_scale": det.svms.feature_scale},
        "bbox": None if det.bbox is None else {**cpu(det.bbox.state_dict()), "feature_scale": det.bbox.feature_scale},
        "meta": det.meta,
    }


def save_detector(det: SPPDetector, path: str | Path) -> Path:
    """Write ``det``'s checkpoint to ``path`` atomically."""
    return save_torch(path, detector_state(det))


def _from_v1(st: dict) -> dict:
    """A version-1 checkpoint dict (flat fields) as a version-2 dict."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": st["arch"],
        "width_mult": st["width_mult"],
        "class_names": st["class_names"],
        "levels": st["levels"],
        "params": {"scales": st["scales"], "max_size": st["max_size"], "target_side": st.get("target_side", 208.0),
                   "nms": st["nms"], "max_per_class": st["max_per_class"], "score_thresh": st["score_thresh"],
                   "score": st.get("score", "svm"), "svd_rank": st.get("svd_rank", 0),
                   "proposal_options": st["proposal_options"]},
        "backbone": st["backbone"],
        "head": st["head"],
        "svms": {"weight": st["svm_weight"], "bias": st["svm_bias"], "feature_scale": st["feature_scale"]},
        "bbox": None if st["bbox_weight"] is None else {"weight": st["bbox_weight"], "feature_scale": st["pool_scale"]},
        "meta": st.get("meta", {}),
    }


class _BadField(ValueError):
    """A field whose value cannot be what it says (the message names the field)."""


def _class_names(names: Any) -> list[str]:
    """The checkpoint's ``class_names`` when they are distinct non-empty strings.

    A string would split into one "class" per character, and repeated or non-string names would
    mislabel detections: each raises :class:`_BadField`.
    """
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise _BadField(f"class_names must be a list of non-empty strings, got {names!r}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise _BadField(f"class_names repeats {repeated}")
    return list(names)


def _build(st: dict) -> SPPDetector:
    """A detector from a version-2 dict; raises KeyError/ValueError/RuntimeError/WeightsError when
    fields are missing or do not fit together (:class:`_BadField` for a field that is wrong alone)."""
    names = _class_names(st["class_names"])
    # files written before the format was stored used the arch's own ("auto")
    backbone = build_backbone(st["arch"], width_mult=float(st["width_mult"]), weights="none",
                              input_format=st.get("input_format", "auto"))
    load_backbone_weights(backbone, st["backbone"], "the checkpoint's backbone")
    head_sd = st["head"]
    fc6 = head_sd["fc6.weight"]  # (F, D)
    has_cls = "cls_score.weight" in head_sd
    # dropout acts only in training; a loaded detector only runs inference
    head = FCHead(int(fc6.shape[1]), fc_dim=int(fc6.shape[0]), num_classes=len(names) if has_cls else None,
                  dropout=0.0)
    head.load_state_dict(head_sd)
    sv = st["svms"]
    svms = LinearSVMs(sv["weight"], sv["bias"], float(sv["feature_scale"]))
    bb = st["bbox"]
    bbox = None if bb is None else BoxRegressor(bb["weight"], float(bb["feature_scale"]))
    params = DetectParams(**{**st["params"], "scales": tuple(st["params"]["scales"])})
    det = SPPDetector(backbone=backbone, head=head, svms=svms, bbox=bbox, class_names=names, levels=st["levels"],
                      params=params, arch=st["arch"], width_mult=float(st["width_mult"]), meta=st.get("meta", {}))
    d_pool = backbone.out_channels * sum(int(n) ** 2 for n in det.levels)
    if head.in_dim != d_pool:
        raise ValueError(f"fc6 takes {head.in_dim} inputs but the trunk and levels pool {d_pool}")
    if bbox is not None and bbox.in_dim != d_pool:
        raise ValueError(f"the box regressors take {bbox.in_dim} inputs but the trunk and levels pool {d_pool}")
    return det


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> SPPDetector:
    """Read a checkpoint written by :func:`save_detector` (or a version-1 file) onto ``device``.

    Raises:
        CheckpointError: naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        st = load_torch(path)
    except ArtifactError as e:
        raise CheckpointError(str(e)) from None
    fmt = st.get("format") if isinstance(st, dict) else type(st).__name__
    if fmt not in (CHECKPOINT_FORMAT, _V1):
        raise CheckpointError(f"{path}: not an SPPDetector checkpoint (format {fmt!r})")
    try:
        det = _build(_from_v1(st) if fmt == _V1 else st)
    except KeyError as e:
        raise CheckpointError(f"{path}: the checkpoint lacks the field {e}") from None
    except _BadField as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, RuntimeError, TypeError, WeightsError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: its parts do not fit together: {first}") from None
    return det.to(device)
