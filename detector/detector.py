"""SPPDetector: the trained SPP-net detector as one object, and its checkpoint format.

Shape shorthand:
    R: proposals in one image   S: scales   C: conv5 channels   B: SPP bins   D = C*B
    F: fc7 width                K: foreground classes           N: detections

Test-time chain (spec §9): proposals -> conv5 once per scale -> per-window scale choice and
projection -> SPP -> fc6/fc7 (no dropout) -> x feature_scale -> linear SVMs [R, K] -> box
regression on pooled conv5 [R, K, 4] -> per-class NMS 0.3, <= 100 per class.

Checkpoint (``model.pt``): a plain dict of tensors, numbers, strings and lists, loaded with
``torch.load(weights_only=True)`` so that loading can never run code.
"""
from __future__ import annotations

import contextlib
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from detector.backbones import build_backbone
from detector.bbox_reg import decode
from detector.boxes import as_boxes
from detector.head import FCHead
from detector.postprocess import detections_from_scores
from detector.pyramid import image_pyramid, resized_size
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from proposals import selective_search
from proposals.imageio import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, ImageError, read_image, to_rgb_uint8

__all__ = ["SPPDetector", "build_detector", "CheckpointError", "STAGES"]

STAGES = ("proposals", "conv", "pool", "fc", "svm", "bbox", "nms")
CHECKPOINT_FORMAT = "sppnet-detector-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, unsafe, wrong format); names the file."""


class SPPDetector:
    """A trained SPP-net detector.

    Args:
        backbone: conv1..conv5 trunk with ``stride``, ``out_channels``, ``input_format``,
            ``proj_offset0``, ``proj_shrink`` attributes.
        head: fc6/fc7 (:class:`detector.head.FCHead`).
        svm_weight (Tensor[F, K]), svm_bias (Tensor[K]): per-class linear SVMs.
        feature_scale: fc7 features are multiplied by this before the SVMs (spec §7).
        bbox_weight (Tensor[D + 1, 4K] | None): packed box regressors (whitening folded in),
            applied to ``[pool5 * pool_scale, 1]``; None = no box regression.
        pool_scale: pool5 features are multiplied by this before the regressors (spec §8).
        class_names: K foreground names; labels index into it.
        scales: test scales (shorter side), e.g. (688,) or (480, 576, 688, 864, 1200).
        levels: SPP levels in fc6's order.
        max_size: cap on the resized longer side (0 = none).
        target_side: window side (px) the per-window scale choice aims at (spec §5: 208).
        nms, max_per_class, score_thresh: spec §9 post-processing.
        score: ``"svm"`` (spec §7: the SVM margin) or ``"svm+softmax"`` (deviation option: the SVM
            margin plus the log-probability of the class under the fine-tuned (K+1)-way
            ``cls_score`` layer, which ``head`` must then have; see ``TestConfig.score``).
        svd_rank: the truncated-SVD rank of fc6/fc7 this model is meant to run with (config
            ``test.svd_rank``; 0 = dense). Stored in the checkpoint and applied by :meth:`load`;
            the head given here is used as it is. After loading it is the rank the head runs at.
        proposal_options: keyword arguments of :func:`proposals.selective_search` (mode,
            min_size, max_boxes, and the "fast+" grid settings) used when ``detect`` is called
            without proposals; the training run's settings are stored in the checkpoint.
        meta: free-form dict saved with the checkpoint (resolved config, training figures).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: FCHead,
        svm_weight: torch.Tensor,
        svm_bias: torch.Tensor,
        feature_scale: float,
        bbox_weight: torch.Tensor | None,
        pool_scale: float,
        class_names: Sequence[str],
        scales: Sequence[int],
        levels: Sequence[int] = (1, 2, 3, 6),
        max_size: int = 0,
        target_side: float = 208.0,
        nms: float = 0.3,
        max_per_class: int = 100,
        score_thresh: float = -1.5,
        score: str = "svm",
        svd_rank: int = 0,
        proposal_options: dict | None = None,
        arch: str = "zf5",
        width_mult: float = 1.0,
        meta: dict | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        K = len(class_names)
        if svm_weight.ndim != 2 or svm_weight.shape[1] != K:
            raise ValueError(f"svm_weight must be [F, K={K}], got {tuple(svm_weight.shape)}")
        if svm_bias.shape != (K,):
            raise ValueError(f"svm_bias must be [K={K}], got {tuple(svm_bias.shape)}")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.head = head.to(self.device).eval()
        self.svm_weight = svm_weight.float().to(self.device)
        self.svm_bias = svm_bias.float().to(self.device)
        self.feature_scale = float(feature_scale)
        self.bbox_weight = None if bbox_weight is None else bbox_weight.float().to(self.device)
        if self.bbox_weight is not None and self.bbox_weight.shape[1] != 4 * K:
            raise ValueError(f"bbox_weight must be [D+1, 4K={4 * K}], got {tuple(self.bbox_weight.shape)}")
        self.pool_scale = float(pool_scale)
        self.class_names = tuple(class_names)
        self.scales = tuple(int(s) for s in scales)
        self.levels = tuple(int(n) for n in levels)
        self.max_size = int(max_size)
        self.nms = float(nms)
        self.max_per_class = int(max_per_class)
        self.score_thresh = float(score_thresh)
        self.score = score  # validated by the property's setter
        self.svd_rank = int(svd_rank)
        self.proposal_options = dict(proposal_options or {})
        self.arch = arch
        self.width_mult = float(width_mult)
        self.meta = dict(meta or {})
        self.target_side = target_side  # sets self.proj; checked by the property's setter
        self.last_timings: dict[str, float] = {}

    # ------------------------------------------------------------------ building blocks

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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
        scales = tuple(scales or self.scales)
        h, w = image.shape[:2]
        fmaps = image_pyramid(self.backbone, image, scales, max_size=self.max_size, device=self.device)
        return Conv5Pyramid(
            fmaps=[f[0] for f in fmaps],  # S x (C, Hs, Ws)
            scaled_sizes=[resized_size(h, w, s, self.max_size) for s in scales],
            image_size=(h, w),
        )

    SCORES = ("svm", "svm+softmax")

    @property
    def target_side(self) -> float:
        """Window side (px) the per-window scale choice aims at (``proj.target_side``); settable
        at test time (config ``test.target_side``) without retraining."""
        return self.proj.target_side

    @target_side.setter
    def target_side(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"target_side must be a positive number of pixels, got {value!r}")
        self.proj = ProjectionParams.of(self.backbone, value)

    @property
    def score(self) -> str:
        """``"svm"`` or ``"svm+softmax"`` (see the class docstring); checked when set."""
        return self._score

    @score.setter
    def score(self, value: str) -> None:
        if value not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {value!r}")
        if value == "svm+softmax" and getattr(self.head, "cls_score", None) is None:
            raise ValueError("score 'svm+softmax' needs the fine-tuned cls_score layer, which this head lacks")
        self._score = value

    def fc_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """fc7 features (unscaled; :meth:`svm_scores` applies ``feature_scale``).

        pooled (Tensor[R, D]) -> Tensor[R, F].
        """
        return self.head.features(pooled)  # (R, F)

    def svm_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Class scores of all windows, all classes in one matmul each (see ``score``).

        The SVMs see fc7 scaled by ``feature_scale`` (spec §7); the scale is the matmul's alpha.
        With ``score == "svm+softmax"`` the fine-tuned classifier's log-probability of each class
        (log-softmax over the K+1 logits, background last) is added.

        Args:
            feats (Tensor[R, F]): fc7 features from :meth:`fc_features`.
        Returns:
            Tensor[R, K].
        """
        scores = torch.addmm(self.svm_bias, feats, self.svm_weight, alpha=self.feature_scale)  # (R, K)
        if self.score == "svm+softmax":
            logp = torch.log_softmax(self.head.cls_score(feats), dim=1)  # (R, K + 1)
            scores += logp[:, : self.num_classes]
        return scores

    def regress_kept(self, boxes: torch.Tensor, pooled: torch.Tensor, windows: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        """Refine kept detections, each with its own class's regressor (spec §8: only the kept boxes).

        Args:
            boxes (Tensor[R, 4]): xyxy proposals of the image.
            pooled (Tensor[R, D]): their pooled conv5 features.
            windows (Tensor[N] int64): proposal row of each kept detection.
            labels (Tensor[N] int64): class of each kept detection.
        Returns:
            Tensor[N, 4]: refined xyxy boxes (not clipped); the proposals when there are no regressors.
        """
        if self.bbox_weight is None or windows.shape[0] == 0:
            return boxes[windows]
        # a window kept for several classes is regressed once for all classes (U x D x 4K
        # multiply-adds), then each detection takes its own class's 4 deltas: cheaper than
        # gathering an [N, 4, D] weight block per detection
        uwin, inv = torch.unique(windows, return_inverse=True)  # (U,), (N,)
        # the features' scale goes into the matmul's alpha: no second [U, D] copy
        deltas = torch.addmm(self.bbox_weight[-1], pooled[uwin], self.bbox_weight[:-1],
                             alpha=self.pool_scale)  # (U, 4K)
        cols = (labels * 4)[:, None] + torch.arange(4, device=labels.device)  # (N, 4)
        return decode(boxes[windows], deltas[inv].gather(1, cols))  # (N, 4)

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
            scores (Tensor[R, K]): SVM scores.
            image_size: (H, W) of the original image.
            score_threshold: default ``self.score_thresh``.
            timed: optional context-manager factory ``timed(stage)`` that times "nms" and "bbox".
        Returns:
            dict of ``boxes`` (float32 [N, 4]), ``scores`` (float32 [N]) and ``labels`` (int64 [N]),
            by descending score, on the model's device.
        """
        timed = timed or (lambda stage: contextlib.nullcontext())
        thr = self.score_thresh if score_threshold is None else float(score_threshold)
        with timed("nms"):
            kept = detections_from_scores(
                boxes, scores, score_thresh=thr, nms_thresh=self.nms,
                max_per_class=self.max_per_class, image_size=image_size, return_indices=True,
            )
        if self.bbox_weight is None:
            kept.pop("window_index")
            return kept
        with timed("bbox"):
            lab = kept["labels"]
            refined = self.regress_kept(boxes, pooled, kept["window_index"], lab)  # (N, 4)
        with timed("nms"):
            # one "window" per kept detection, with its class's score only: the second NMS and
            # top-k stay per class
            n, k = lab.shape[0], self.num_classes
            sc = torch.full((n, k), -math.inf, device=scores.device, dtype=kept["scores"].dtype)
            sc[torch.arange(n, device=sc.device), lab] = kept["scores"]
            out = detections_from_scores(
                refined, sc, score_thresh=-math.inf, nms_thresh=self.nms,
                max_per_class=self.max_per_class, image_size=image_size,
            )
        return out

    # ------------------------------------------------------------------ public API

    def _prepare_image(self, image: Any) -> tuple[np.ndarray, str]:
        if isinstance(image, (str, Path)):
            return read_image(image), str(image)
        name = "<array>" if isinstance(image, np.ndarray) else f"<{type(image).__name__}>"
        if not isinstance(image, np.ndarray):
            image = np.asarray(image)  # PIL image -> ndarray
        img = to_rgb_uint8(image, name=name)
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
            image: H x W x 3 uint8 RGB array, a PIL image, or a file path (grayscale, RGBA and
                16-bit images are converted; see proposals.imageio). Sides must be within
                [32, 10000] px; an unreadable or out-of-range image raises ``ImageError`` naming it.
            proposals (Tensor[R, 4] | None): xyxy boxes in original-image pixels; None = run
                selective search on the image (the proposal time is then in ``last_timings``).
            score_threshold: keep detections scoring above this (default: the detector's
                ``score_thresh``, -1.5 as in spec §9; SVM scores are margins, 0 is the decision
                boundary; with ``score == "svm+softmax"`` the class's log-probability is added).
        Returns:
            dict with ``boxes`` (float32 Tensor[N, 4], xyxy, 0-based continuous pixels of the
            original image), ``scores`` (float32 Tensor[N]) and ``labels`` (int64 Tensor[N],
            indices into ``class_names``), sorted by descending score.
        """
        self.last_timings = {}
        img, name = self._prepare_image(image)
        h, w = img.shape[:2]
        with self._timed("proposals"):
            if proposals is None:
                boxes = torch.from_numpy(
                    np.asarray(selective_search(img, **self.proposal_options), dtype=np.float32)
                ).reshape(-1, 4)
            else:
                boxes = as_boxes(proposals, f"{name}: proposals")  # (R, 4) on the CPU
        boxes = boxes.to(self.device)
        if boxes.shape[0] == 0:
            return _empty_detections(self.device)
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
        """Replace fc6/fc7 by truncated-SVD factors of the given rank (in place); returns self."""
        if rank > 0:
            self.head = self.head.compress_svd(rank).to(self.device).eval()
            self.svd_rank = int(rank)
        return self

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        """The checkpoint dict (tensors, numbers, strings, lists only).

        Raises:
            ValueError: fc6/fc7 are SVD-compressed (the checkpoint holds the dense layers; set
                ``svd_rank`` and :meth:`load` compresses them).
        """
        if not (isinstance(self.head.fc6, nn.Linear) and isinstance(self.head.fc7, nn.Linear)):
            raise ValueError("SPPDetector.save: fc6/fc7 are SVD-compressed; save the dense model with "
                             "svd_rank set (SPPDetector.load applies it)")
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "width_mult": self.width_mult,
            "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "head_in_dim": int(self.head.fc6.in_features),
            "head_fc_dim": int(self.head.fc6.out_features),
            "svm_weight": self.svm_weight.cpu(),
            "svm_bias": self.svm_bias.cpu(),
            "feature_scale": self.feature_scale,
            "bbox_weight": None if self.bbox_weight is None else self.bbox_weight.cpu(),
            "pool_scale": self.pool_scale,
            "class_names": list(self.class_names),
            "scales": list(self.scales),
            "levels": list(self.levels),
            "max_size": self.max_size,
            "target_side": self.proj.target_side,
            "nms": self.nms,
            "max_per_class": self.max_per_class,
            "score_thresh": self.score_thresh,
            "score": self.score,
            "svd_rank": self.svd_rank,
            "proposal_options": self.proposal_options,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        scales: Sequence[int] | None = None,
        svd_rank: int | None = None,
    ) -> "SPPDetector":
        """Load a checkpoint written by :meth:`save` (``torch.load(weights_only=True)``).

        Args:
            path: ``model.pt``.
            device: "cpu", "cuda", ...
            scales: override the test scales stored in the checkpoint.
            svd_rank: compress fc6/fc7 to this rank after loading (0 = dense); None = the rank
                stored with the model (its training config's ``test.svd_rank``), so the library call
                scores like ``tools/test_net.py``.
        Raises:
            CheckpointError: missing file, a file that would need to run code to load, or not
                an SPPDetector checkpoint.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for code-carrying files, others for corrupt ones
            raise CheckpointError(
                f"{path}: refused or unreadable as a safe (weights_only) checkpoint: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not an SPPDetector checkpoint (format {st.get('format') if isinstance(st, dict) else type(st).__name__})")
        backbone = build_backbone(st["arch"], width_mult=st["width_mult"], weights="none")
        backbone.load_state_dict(st["backbone"])
        # the fine-tuned (K+1)-way classifier is kept when the checkpoint has it ("svm+softmax" scores)
        has_cls = "cls_score.weight" in st["head"]
        head = FCHead(st["head_in_dim"], fc_dim=st["head_fc_dim"],
                      num_classes=len(st["class_names"]) if has_cls else None)
        head.load_state_dict(st["head"], strict=False)
        det = cls(
            backbone=backbone, head=head, svm_weight=st["svm_weight"], svm_bias=st["svm_bias"],
            feature_scale=st["feature_scale"], bbox_weight=st["bbox_weight"], pool_scale=st["pool_scale"],
            class_names=st["class_names"], scales=scales or st["scales"], levels=st["levels"],
            max_size=st["max_size"], target_side=st.get("target_side", 208.0), nms=st["nms"], max_per_class=st["max_per_class"],
            score_thresh=st["score_thresh"], score=st.get("score", "svm"), svd_rank=st.get("svd_rank", 0), proposal_options=st["proposal_options"],
            arch=st["arch"], width_mult=st["width_mult"], meta=st.get("meta", {}), device=device,
        )
        rank = det.svd_rank if svd_rank is None else int(svd_rank)
        det.svd_rank = 0  # the head is dense until compress_fc
        return det.compress_fc(rank)


def _empty_detections(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "scores": torch.zeros((0,), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
    }


def build_detector(cfg: Any, checkpoint: str | Path, device: str | None = None) -> SPPDetector:
    """The one library function that reads a Config: load ``checkpoint`` with the config's test settings.

    Args:
        cfg: a :class:`detector.config.Config`.
        checkpoint: ``model.pt`` written by training.
        device: overrides ``cfg.device``.
    """
    det = SPPDetector.load(checkpoint, device=device or cfg.device, scales=cfg.features.test_scales,
                           svd_rank=cfg.test.svd_rank)
    det.nms = cfg.test.nms
    det.max_per_class = cfg.test.max_per_class
    det.score_thresh = cfg.test.score_thresh
    try:
        det.score = cfg.test.score
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: test.score: {e}") from None
    det.max_size = cfg.features.max_size
    if cfg.test.target_side:
        try:
            det.target_side = cfg.test.target_side
        except ValueError as e:
            raise CheckpointError(f"{checkpoint}: test.target_side: {e}") from None
    return det
