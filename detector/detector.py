"""SPPDetector: the trained SPP-net detector as one module, and its test-time settings.

Shape shorthand:
    R: proposals in one image   S: scales   C: conv5 channels   B: SPP bins   D = C*B
    F: fc7 width                K: foreground classes           N: detections

Test-time chain (spec §9): proposals -> conv5 once per scale -> per-window scale choice and
projection -> SPP -> fc6/fc7 (no dropout) -> linear SVMs on fc7 x feature_scale [R, K] -> per-class
threshold, NMS, top-k -> box regression of the kept boxes from their pooled conv5 -> NMS again.

The detector holds its parts as submodules (``backbone``, ``head``, ``svms``, ``bbox``) and its
test-time settings as one frozen :class:`DetectParams`. The checkpoint file format lives in
``detector.checkpoint``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from detector.bbox_reg import BoxRegressor
from detector.boxes import as_boxes, clip_boxes, valid_boxes_mask
from detector.head import FCHead
from detector.postprocess import detections_from_scores
from detector.pyramid import image_pyramid, resized_size
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from detector.svm import LinearSVMs
from proposals import propose
from proposals.imageio import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    ImageError,
    pil_to_rgb,
    read_image,
    to_rgb_uint8,
)
from proposals.store import ProposalFileError

__all__ = ["SPPDetector", "DetectParams", "STAGES", "SCORES"]

log = logging.getLogger(__name__)

STAGES = ("proposals", "conv", "pool", "fc", "svm", "bbox", "nms")
SCORES = ("svm", "svm+softmax")


@dataclass(frozen=True)
class DetectParams:
    """Every test-time setting of a detector (config: ``test.*``, ``features.test_scales``,
    ``features.max_size``, ``features.target_side``, ``proposals.*``). Stored once in the checkpoint;
    change one with ``det.params = dataclasses.replace(det.params, nms=0.4)`` (checked when set).

    Attributes:
        scales: test scales (shorter side), e.g. (688,) or (480, 576, 688, 864, 1200).
        max_size: cap on the resized longer side (0 = none).
        target_side: window side (px) the per-window scale choice aims at (spec §5: 208).
        nms: per-class NMS IoU threshold (spec §9: 0.3).
        max_per_class: detections kept per class and image (spec §9: 100).
        score_thresh: windows scoring at or below this are dropped before NMS (spec §9: -1.5).
        score: ``"svm"`` (spec §7: the SVM margin) or ``"svm+softmax"`` (the margin plus the
            log-probability of the class under the fine-tuned (K+1)-way ``cls_score`` layer).
        svd_rank: truncated-SVD rank of fc6/fc7 the model runs with (0 = dense); applied by
            :meth:`SPPDetector.load`.
        proposal_options: keyword arguments of :func:`proposals.selective_search` used when
            ``detect`` is called without proposals (the training run's settings).
    """

    scales: tuple[int, ...]
    max_size: int
    target_side: float
    nms: float
    max_per_class: int
    score_thresh: float
    score: Literal["svm", "svm+softmax"]
    svd_rank: int
    proposal_options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        problems = []
        if not self.scales or any(s < 1 for s in self.scales):
            problems.append(f"scales must be positive pixel sizes, got {list(self.scales)}")
        if self.max_size < 0:
            problems.append(f"max_size must be >= 0 (0 = no cap), got {self.max_size}")
        if not (math.isfinite(self.target_side) and self.target_side > 0):
            problems.append(f"target_side must be a positive number of pixels, got {self.target_side!r}")
        if not 0.0 <= self.nms <= 1.0:
            problems.append(f"nms must be an IoU in [0, 1], got {self.nms!r}")
        if self.max_per_class < 0:
            problems.append(f"max_per_class must be >= 0 (0 = no limit), got {self.max_per_class}")
        if math.isnan(self.score_thresh):
            problems.append("score_thresh must be a number, got nan")
        if self.score not in SCORES:
            problems.append(f"score must be one of {SCORES}, got {self.score!r}")
        if self.svd_rank < 0:
            problems.append(f"svd_rank must be >= 0 (0 = dense), got {self.svd_rank}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples) for checkpoints and reports."""
        d = dataclasses.asdict(self)
        d["scales"] = list(self.scales)
        return d


class SPPDetector(nn.Module):
    """A trained SPP-net detector.

    Args:
        backbone: conv1..conv5 trunk with ``stride``, ``out_channels``, ``input_format``,
            ``proj_offset0``, ``proj_shrink`` attributes.
        head: fc6/fc7 (:class:`detector.head.FCHead`), with its fine-tuned ``cls_score`` when
            ``params.score`` is ``"svm+softmax"``.
        svms: the K per-class linear SVMs on fc7 (:class:`detector.svm.LinearSVMs`).
        bbox: the packed box regressors on pooled conv5 (:class:`detector.bbox_reg.BoxRegressor`),
            or None for none.
        class_names: K foreground names; labels index into it.
        levels: SPP levels in fc6's order.
        params: the test-time settings.
        arch, width_mult: how :func:`detector.backbones.build_backbone` rebuilds the trunk.
        meta: free-form dict saved with the checkpoint (resolved config, training figures).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: FCHead,
        svms: LinearSVMs,
        bbox: BoxRegressor | None,
        class_names: Sequence[str],
        levels: Sequence[int],
        params: DetectParams,
        arch: str,
        width_mult: float = 1.0,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        K = len(class_names)
        if svms.num_classes != K:
            raise ValueError(f"svms score {svms.num_classes} classes, but there are {K} class names")
        if svms.weight.shape[0] != head.out_dim:
            raise ValueError(f"svms expect {svms.weight.shape[0]}-d features, the head gives {head.out_dim}")
        if bbox is not None and bbox.num_classes != K:
            raise ValueError(f"bbox regressors are for {bbox.num_classes} classes, there are {K} class names")
        self.backbone = backbone.eval()
        self.head = head.eval()
        self.svms = svms
        self.bbox = bbox
        self.class_names = tuple(class_names)
        self.levels = tuple(int(n) for n in levels)
        self.arch = arch
        self.width_mult = float(width_mult)
        self.meta = dict(meta or {})
        self.svd_rank = 0  # the rank fc6/fc7 run at now (compress_fc)
        self.params = params  # checked by the setter
        self.last_timings: dict[str, float] = {}
        self.eval()

    # ------------------------------------------------------------------ settings

    @property
    def params(self) -> DetectParams:
        """The test-time settings (:class:`DetectParams`); checked against this model when set."""
        return self._params

    @params.setter
    def params(self, value: DetectParams) -> None:
        if not isinstance(value, DetectParams):
            raise TypeError(f"params must be a DetectParams, got {type(value).__name__}")
        if value.score == "svm+softmax" and getattr(self.head, "cls_score", None) is None:
            raise ValueError("score 'svm+softmax' needs the fine-tuned cls_score layer, which this head lacks")
        self._params = value
        self.proj = ProjectionParams.of(self.backbone, value.target_side)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.svms.weight.device

    # ------------------------------------------------------------------ building blocks

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_timings[stage] = self.last_timings.get(stage, 0.0) + time.perf_counter() - t0

    def compute_pyramid(self, image: np.ndarray, scales: Sequence[int] | None = None) -> Conv5Pyramid:
        """conv5 of one image at each scale (one forward pass per scale).

        Args:
            image: uint8 RGB [H, W, 3].
            scales: shorter-side scales (default: the detector's test scales).
        """
        scales = tuple(scales or self.params.scales)
        h, w = image.shape[:2]
        fmaps = image_pyramid(self.backbone, image, scales, max_size=self.params.max_size, device=self.device)
        return Conv5Pyramid(
            fmaps=[f[0] for f in fmaps],  # S x (C, Hs, Ws)
            scaled_sizes=[resized_size(h, w, s, self.params.max_size) for s in scales],
            image_size=(h, w),
        )

    def fc_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """fc7 features (unscaled; the SVMs apply their feature scale). pooled (Tensor[R, D]) -> Tensor[R, F]."""
        return self.head.features(pooled)  # (R, F)

    def svm_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Class scores of all windows (see :class:`DetectParams` ``score``).

        Args:
            feats (Tensor[R, F]): fc7 features from :meth:`fc_features`.
        Returns:
            Tensor[R, K]: the SVM margins; with ``"svm+softmax"`` plus the fine-tuned classifier's
            log-probability of each class (log-softmax over the K+1 logits, background last).
        """
        scores = self.svms(feats)  # (R, K)
        if self.params.score == "svm+softmax":
            logp = torch.log_softmax(self.head.cls_score(feats), dim=1)  # (R, K + 1)
            scores += logp[:, : self.num_classes]
        return scores

    def postprocess(
        self,
        boxes: torch.Tensor,
        pooled: torch.Tensor,
        scores: torch.Tensor,
        image_size: tuple[int, int],
        score_threshold: float | None = None,
        timed: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Scores of all windows -> detections, in the spec's order (§8-9).

        Per class: keep scores above the threshold, NMS (IoU > ``nms``) on the proposals, the top
        ``max_per_class``; then box regression of only those kept boxes from their proposal's pooled
        features, clipping, and NMS again (the spec runs it at evaluation; here it is part of the
        output, so the library and the evaluation see the same boxes), again at most
        ``max_per_class``. Both SPP and R-CNN modes use this.

        Args:
            boxes (Tensor[R, 4]): xyxy proposals, original-image pixels.
            pooled (Tensor[R, D]): their pooled conv5 features (the regressors' input).
            scores (Tensor[R, K]): class scores.
            image_size: (H, W) of the original image.
            score_threshold: default ``params.score_thresh``.
            timed: optional context-manager factory ``timed(stage)`` that times "nms" and "bbox".
        Returns:
            dict of ``boxes`` (float32 [N, 4]), ``scores`` (float32 [N]) and ``labels`` (int64 [N]),
            by descending score, on the model's device.
        """
        timed = timed or (lambda stage: contextlib.nullcontext())
        p = self.params
        thr = p.score_thresh if score_threshold is None else float(score_threshold)
        with timed("nms"):
            kept = detections_from_scores(
                boxes, scores, score_thresh=thr, nms_thresh=p.nms,
                max_per_class=p.max_per_class, image_size=image_size, return_indices=True,
            )
        if self.bbox is None:
            kept.pop("window_index")
            return kept
        with timed("bbox"):
            lab = kept["labels"]
            refined = self.bbox.refine(boxes, pooled, kept["window_index"], lab)  # (N, 4)
        with timed("nms"):
            # one "window" per kept detection, with its class's score only: the second NMS and
            # top-k stay per class
            n, k = lab.shape[0], self.num_classes
            sc = torch.full((n, k), -math.inf, device=scores.device, dtype=kept["scores"].dtype)
            sc[torch.arange(n, device=sc.device), lab] = kept["scores"]
            out = detections_from_scores(
                refined, sc, score_thresh=-math.inf, nms_thresh=p.nms,
                max_per_class=p.max_per_class, image_size=image_size,
            )
        return out

    # ------------------------------------------------------------------ public API

    def _prepare_image(self, image: Any) -> tuple[np.ndarray, str]:
        if isinstance(image, (str, Path)):
            return read_image(image), str(image)
        if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image: any mode, converted by PIL
            name = f"<PIL image, mode {image.mode}>"
            img = pil_to_rgb(image, name=name)
        else:
            name = "<array>" if isinstance(image, np.ndarray) else f"<{type(image).__name__}>"
            img = to_rgb_uint8(image if isinstance(image, np.ndarray) else np.asarray(image), name=name)
        h, w = img.shape[:2]
        if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_IMAGE_SIDE:
            raise ImageError(f"{name}: image is {w}x{h}; sides must be within [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] px")
        return img, name

    @torch.inference_mode()
    def detect(
        self,
        image: Any,
        proposals: torch.Tensor | np.ndarray | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Detect objects in one image.

        Args:
            image: H x W x 3 uint8 RGB array, a PIL image of any mode (palette, CMYK, YCbCr, ...
                are converted by PIL), or a file path (grayscale, RGBA and 16-bit images are
                converted; see proposals.imageio). A bare ndarray is taken as RGB. Sides must be within
                [32, 10000] px; an unreadable or out-of-range image raises ``ImageError`` naming it.
            proposals (Tensor[R, 4] | None): xyxy boxes in original-image pixels; None = run
                selective search on the image (the proposal time is then in ``last_timings``).
                Boxes of another shape, or with NaN/inf, raise ``ProposalFileError`` naming the
                image; an empty set, and boxes that are empty, inverted or outside the image, give
                no detections and a warning naming the image.
            score_threshold: keep detections scoring above this (default: ``params.score_thresh``;
                SVM scores are margins, 0 is the decision boundary; with ``score ==
                "svm+softmax"`` the class's log-probability is added).
        Returns:
            dict with ``boxes`` (float32 Tensor[N, 4], xyxy, 0-based continuous pixels of the
            original image), ``scores`` (float32 Tensor[N]) and ``labels`` (int64 Tensor[N],
            indices into ``class_names``), sorted by descending score, on the CPU.
        """
        self.last_timings = {}
        img, name = self._prepare_image(image)
        h, w = img.shape[:2]
        with self._timed("proposals"):
            if proposals is None:
                boxes = torch.from_numpy(
                    np.asarray(propose(img, **self.params.proposal_options), dtype=np.float32)
                ).reshape(-1, 4)
            else:
                try:
                    boxes = as_boxes(proposals, f"{name}: proposals")  # (R, 4) on the CPU
                except ValueError as e:  # wrong shape, NaN/inf, not numbers: the caller's input, named
                    raise ProposalFileError(str(e)) from None
                _warn_unusable(boxes, h, w, name)
        boxes = boxes.to(self.device)
        if boxes.shape[0] == 0:
            if proposals is not None:
                log.warning("%s: no proposals given (an empty [0, 4] set); no detections", name)
            return _empty_detections()
        with self._timed("conv"):
            pyr = self.compute_pyramid(img)
        with self._timed("pool"):
            pooled = pool_regions(pyr, boxes, self.levels, self.proj)  # (R, D)
        with self._timed("fc"):
            feats = self.fc_features(pooled)  # (R, F)
        with self._timed("svm"):
            scores = self.svm_scores(feats)  # (R, K)
        self.last_timings.update(bbox=0.0, nms=0.0)
        dets = self.postprocess(boxes, pooled, scores, (h, w), score_threshold, timed=self._timed)
        return {k: v.cpu() for k, v in dets.items()}

    def detect_batch(
        self,
        images: Sequence[Any],
        proposals: Sequence[torch.Tensor | np.ndarray | None] | None = None,
        score_threshold: float | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`detect` for many images; ``proposals`` is None or one entry per image."""
        if proposals is not None and len(proposals) != len(images):
            raise ValueError(f"proposals has {len(proposals)} entries for {len(images)} images")
        return [
            self.detect(im, None if proposals is None else proposals[i], score_threshold)
            for i, im in enumerate(images)
        ]

    def compress_fc(self, rank: int) -> "SPPDetector":
        """Replace fc6/fc7 by truncated-SVD factors of the given rank (in place; 0 = keep); returns self."""
        if rank > 0:
            self.head = self.head.compress_svd(rank).to(self.device).eval()
            self.svd_rank = int(rank)
        return self

    # ------------------------------------------------------------------ checkpoint

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (``detector.checkpoint``); fc6/fc7 must be dense."""
        from detector.checkpoint import save_detector

        return save_detector(self, path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        scales: Sequence[int] | None = None,
        svd_rank: int | None = None,
    ) -> "SPPDetector":
        """Load a checkpoint (``torch.load(weights_only=True)``: loading can never run code).

        Args:
            path: ``model.pt``.
            device: "cpu", "cuda", ...
            scales: override the test scales stored in the checkpoint.
            svd_rank: compress fc6/fc7 to this rank after loading (0 = dense); None = the rank
                stored with the model (its training config's ``test.svd_rank``), so the library call
                scores like ``tools/test_net.py``.
        Raises:
            detector.checkpoint.CheckpointError: missing file, a file that would need to run code
                to load, not an SPPDetector checkpoint, or one whose parts do not fit together
                (the file and the problem are named).
        """
        from detector.checkpoint import load_detector

        det = load_detector(path, device=device)
        if scales:
            det.params = dataclasses.replace(det.params, scales=tuple(scales))
        return det.compress_fc(det.params.svd_rank if svd_rank is None else int(svd_rank))


def _warn_unusable(boxes: torch.Tensor, h: int, w: int, name: str) -> None:
    """Warn when given proposals are empty, inverted or wholly outside the image: they cannot
    yield a detection (clipping to the image leaves them without area), so they drop out."""
    inside = clip_boxes(boxes, h, w)
    bad = ~valid_boxes_mask(inside)  # (R,)
    if bool(bad.any()):
        log.warning("%s: %d of %d given proposals are empty, inverted (x2 <= x1 or y2 <= y1) or outside the "
                    "%dx%d image; they cannot yield detections", name, int(bad.sum()), boxes.shape[0], w, h)


def _empty_detections() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "scores": torch.zeros((0,), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
    }
