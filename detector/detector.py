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
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from detector.bbox_reg import BoxRegressor
from detector.boxes import as_boxes, clip_boxes, valid_boxes_mask
from detector.conv_precision import CONV_PRECISIONS, conv_dtype, runnable_conv_precision
from detector.fc_precision import FC_PRECISIONS
from detector.head import FCHead
from detector.postprocess import detections_from_scores
from detector.pyramid import image_pyramid, preprocess, preprocess_float, pyramid_sizes, resized_size, trunk_pyramid
from detector.regions import Conv5Pyramid, ProjectionParams, distinct_windows, pool_regions
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

__all__ = ["SPPDetector", "DetectParams", "STAGES", "SCORES", "CHANNEL_ORDERS", "spare_cores"]

log = logging.getLogger(__name__)

STAGES = ("proposals", "conv", "pool", "fc", "svm", "bbox", "nms")
SCORES = ("svm", "svm+softmax")
CHANNEL_ORDERS = ("rgb", "bgr")  # of an array given to detect(); "bgr" is cv2.imread's


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
        fc_precision: ``"float32"``, ``"int8"`` (CPU), ``"float16"`` (CUDA) or ``"auto"`` (int8 on
            the CPU, float32 on a GPU): the arithmetic of fc6/fc7 at test time
            (:mod:`detector.fc_precision`); applied by :meth:`SPPDetector.load` after ``svd_rank``.
        conv_precision: ``"float32"`` or ``"bfloat16"`` (where the device has native bfloat16): the
            arithmetic of the trunk's convolutions at test time (:mod:`detector.conv_precision`).
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
    fc_precision: str = "float32"  # absent from checkpoints written before it existed
    conv_precision: str = "float32"  # as fc_precision
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
        if self.fc_precision not in FC_PRECISIONS:
            problems.append(f"fc_precision must be one of {', '.join(FC_PRECISIONS)}, got {self.fc_precision!r}")
        if self.conv_precision not in CONV_PRECISIONS:
            problems.append(f"conv_precision must be one of {', '.join(CONV_PRECISIONS)}, "
                            f"got {self.conv_precision!r}")
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
        self.fc_precision = "float32"  # the precision fc6/fc7 run at now (lower_fc)
        self.conv_precision = "float32"  # the precision the trunk runs at now (lower_conv)
        self.params = params  # checked by the setter
        self.last_timings: dict[str, float] = {}
        # windows scored by the last call, and how many of them pooled distinct conv5 cells
        self.last_counts: dict[str, int] = {}
        # (image size, batch size, device, dtype, threads, scaled sizes) -> whether a batch through the
        # trunk gives each image's own conv5 bits (see _trunk_pyramids)
        self._batch_exact: dict[tuple, bool] = {}
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
        fmaps = image_pyramid(self.backbone, image, scales, max_size=self.params.max_size, device=self.device,
                              conv_dtype=conv_dtype(self.conv_precision))
        return Conv5Pyramid(
            fmaps=[f[0] for f in fmaps],  # S x (C, Hs, Ws)
            scaled_sizes=[resized_size(h, w, s, self.params.max_size) for s in scales],
            image_size=(h, w),
        )

    def fc_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """fc7 features (unscaled; the SVMs apply their feature scale). pooled (Tensor[R, D]) -> Tensor[R, F]."""
        return self.head.features(pooled).float()  # (R, F)

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
        pooled_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Scores of all windows -> detections, in the spec's order (§8-9).

        Per class: keep scores above the threshold, NMS (IoU > ``nms``) on the proposals, the top
        ``max_per_class``; then box regression of only those kept boxes from their proposal's pooled
        features, clipping, and NMS again (the spec runs it at evaluation; here it is part of the
        output, so the library and the evaluation see the same boxes), again at most
        ``max_per_class``. Both SPP and R-CNN modes use this.

        Args:
            boxes (Tensor[R, 4]): xyxy proposals, original-image pixels.
            pooled (Tensor[R, D], or Tensor[U, D] with ``pooled_index``): their pooled conv5
                features (the regressors' input).
            scores (Tensor[R, K]): class scores.
            image_size: (H, W) of the original image.
            score_threshold: default ``params.score_thresh``.
            timed: optional context-manager factory ``timed(stage)`` that times "nms" and "bbox".
            pooled_index (Tensor[R] int64, optional): each window's row of ``pooled`` when it holds
                one row per distinct pooled window (:func:`detector.regions.distinct_windows`).
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
            rows = kept["window_index"]  # (N,)
            prow = None if pooled_index is None else pooled_index[rows]  # (N,)
            refined = self.bbox.refine(boxes, pooled, rows, lab, prow)  # (N, 4)
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

    def _prepare_image(self, image: Any, channel_order: str = "rgb") -> tuple[np.ndarray, str]:
        """One convenience input -> (uint8 RGB [H, W, 3], a name for messages)."""
        if isinstance(image, (str, Path)):
            img, name = read_image(image), str(image)
        elif hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image: any mode, converted by PIL
            name = f"<PIL image, mode {image.mode}>"
            img = pil_to_rgb(image, name=name)
        elif isinstance(image, torch.Tensor):
            raise ImageError(f"<tensor of shape {tuple(image.shape)}>: detect() takes a path, a PIL image or an "
                             "H x W x 3 uint8 array; call the model itself, model([tensor]), with CHW float "
                             "tensors in [0, 1] (torchvision's input)")
        else:
            name = "<array>" if isinstance(image, np.ndarray) else f"<{type(image).__name__}>"
            img = to_rgb_uint8(image if isinstance(image, np.ndarray) else np.asarray(image), name=name)
            if channel_order == "bgr":  # cv2.imread order; grey is unchanged, BGRA lost its alpha above
                img = np.ascontiguousarray(img[:, :, ::-1])  # (H, W, 3) RGB
        _check_side(img.shape[0], img.shape[1], name)
        return img, name

    def _given_boxes(self, proposals: Any, h: int, w: int, name: str) -> torch.Tensor:
        """Caller's proposals -> Tensor[R, 4] on the CPU (shape and finiteness checked, unusable ones warned)."""
        try:
            boxes = as_boxes(proposals, f"{name}: proposals")  # (R, 4) on the CPU
        except ValueError as e:  # wrong shape, NaN/inf, not numbers: the caller's input, named
            raise ProposalFileError(str(e)) from None
        _warn_unusable(boxes, h, w, name)
        if boxes.shape[0] == 0:
            log.warning("%s: no proposals given (an empty [0, 4] set); no detections", name)
        return boxes

    def _trunk_pyramids(self, x: torch.Tensor, image_size: tuple[int, int]) -> list[Conv5Pyramid]:
        """conv5 pyramids of N images of one size, the batch through the trunk together per scale.

        PyTorch picks its CPU convolution kernel by input shape, batch size included (a 3x3 conv on
        a small map of one image runs its native kernel, on a batch oneDNN's), and two kernels sum
        in another order, so a batch can differ from the images' own passes in the last bit. The
        first batch of each (image size, batch size, device, dtype, threads) is therefore checked
        against its first image's own pass, and where they differ the images go one at a time, so
        batching never changes a detection.

        Args:
            x (Tensor[N, 3, H, W]): trunk input (pre-processed), on the model's device.
            image_size: (H, W) of the original images (the projection's reference).
        Returns:
            N pyramids, in order.
        """
        n, (h, w) = x.shape[0], image_size
        sizes = pyramid_sizes(h, w, self.params.scales, self.params.max_size)
        dtype = conv_dtype(self.conv_precision)
        fmaps = trunk_pyramid(self.backbone, x, sizes, conv_dtype=dtype)  # S x (N, C, Hs, Ws)
        if n > 1:
            key = (h, w, n, str(self.device), str(x.dtype), str(dtype), torch.get_num_threads(), tuple(sizes))
            exact = self._batch_exact.get(key)
            if exact is None:
                first = trunk_pyramid(self.backbone, x[:1], sizes, conv_dtype=dtype)  # S x (1, C, Hs, Ws)
                exact = self._batch_exact[key] = all(torch.equal(f[:1], g) for f, g in zip(fmaps, first))
                if not exact:
                    log.info("trunk: a batch of %d images of %dx%d differs from single-image passes in the "
                             "last bits (another conv kernel); running them one at a time", n, w, h)
            if not exact:
                per = [trunk_pyramid(self.backbone, x[i:i + 1], sizes, conv_dtype=dtype)
                       for i in range(n)]  # N x S x (1, C, Hs, Ws)
                fmaps = [torch.cat([p[s] for p in per]) for s in range(len(sizes))]  # S x (N, C, Hs, Ws)
        return [Conv5Pyramid(fmaps=[f[i] for f in fmaps], scaled_sizes=list(sizes), image_size=(h, w))
                for i in range(n)]  # S x (C, Hs, Ws) each

    def _score_windows(self, pyr: Conv5Pyramid, boxes: torch.Tensor,
                       score_threshold: float | None) -> dict[str, torch.Tensor]:
        """Windows of one image -> detections (on the model's device), timing each stage."""
        if boxes.shape[0] == 0:
            return {k: v.to(self.device) for k, v in _empty_detections().items()}
        with self._timed("pool"):
            # windows that pool the same conv5 cells at the same scale share one pooled vector, one
            # fc pass and one score row (the scores are gathered back per window). Scale choice and
            # projection run on the CPU copy of the boxes (proposals come from the CPU), so a GPU
            # model waits for no device-to-host copy here.
            cpu_boxes = boxes.cpu()  # (R, 4)
            first, inverse = distinct_windows(pyr, cpu_boxes, self.proj)  # (U,), (R,)
            # consumed before the next image is pooled, so the kernel's reused buffer can hold it
            pooled = pool_regions(pyr, cpu_boxes[first], self.levels, self.proj,
                                  reuse_output=True)  # (U, D) float32 on the model's device
            boxes, inverse = boxes.to(self.device), inverse.to(self.device)
        self.last_counts["windows"] = self.last_counts.get("windows", 0) + boxes.shape[0]
        self.last_counts["distinct"] = self.last_counts.get("distinct", 0) + first.shape[0]
        with self._timed("fc"):
            feats = self.fc_features(pooled)  # (U, F)
        with self._timed("svm"):
            scores = self.svm_scores(feats)[inverse]  # (R, K)
        return self.postprocess(boxes, pooled, scores, pyr.image_size, score_threshold, timed=self._timed,
                                pooled_index=inverse)

    def _run(self, items: Iterable[_Item], score_threshold: float | None, batch_size: int | None,
             workers: int | None) -> Iterator[dict[str, torch.Tensor]]:
        """The pipeline behind detect, detect_batch, iter_detect and forward: chunks of up to
        ``batch_size`` images; the next chunk's proposals are computed in ``workers`` processes while
        this chunk's conv5 pyramids (same-size images together) and windows are scored. Yields the
        detections (on the model's device) in input order."""
        if batch_size is None:
            # a CPU runs the trunk faster one image at a time (BENCHMARKS.md, section batch)
            batch_size = 1 if self.device.type == "cpu" else 4
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0):
            raise ValueError(f"workers must be None or an int >= 0 (0 = proposals in this process), got {workers!r}")
        batch_size = int(batch_size)
        spare = spare_cores() if workers != 0 else 0  # detect() passes 0: no pool to size
        workers = (1 if spare else 0) if workers is None else int(workers)
        worker_threads = max(1, spare // workers) if workers else 1  # each worker's selective-search threads
        from collections import deque
        from itertools import islice

        self.last_timings = {s: 0.0 for s in STAGES}
        self.last_counts = {"windows": 0, "distinct": 0}
        it = iter(items)
        pool = None
        chunks: deque[list[_Item]] = deque()

        def next_chunk() -> list[_Item]:
            nonlocal pool
            chunk = list(islice(it, batch_size))
            for item in chunk:
                if item.boxes is None and workers > 0:
                    if pool is None:
                        from proposals import start_proposal_pool

                        pool = start_proposal_pool(workers)
                    item.future = pool.submit(propose, item.rgb_uint8(), threads=worker_threads,
                                              **self.params.proposal_options)
            return chunk

        try:
            chunks.append(next_chunk())
            while chunks[0]:
                chunks.append(next_chunk())  # its proposals run while this chunk is scored
                chunk = chunks.popleft()
                pyramids: dict[int, Conv5Pyramid] = {}
                with self._timed("conv"):
                    for size in dict.fromkeys(item.size for item in chunk):  # same-size images together
                        idx = [i for i, item in enumerate(chunk) if item.size == size]
                        x = torch.stack([chunk[i].trunk_input(self) for i in idx])  # (N, 3, H, W)
                        pyramids.update(zip(idx, self._trunk_pyramids(x, size)))
                for i, item in enumerate(chunk):
                    with self._timed("proposals"):
                        boxes = item.proposal_boxes(self.params.proposal_options)  # (R, 4)
                    yield self._score_windows(pyramids.pop(i), boxes, score_threshold)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @torch.inference_mode()
    def detect(
        self,
        image: Any,
        proposals: torch.Tensor | np.ndarray | None = None,
        score_threshold: float | None = None,
        channel_order: str = "rgb",
    ) -> dict[str, torch.Tensor]:
        """Detect objects in one image.

        Args:
            image: H x W x 3 uint8 array (RGB unless ``channel_order="bgr"``), a PIL image of any
                mode (palette, CMYK, YCbCr, ... are converted by PIL), or a file path (grayscale,
                RGBA and 16-bit images are converted; see proposals.imageio). A bare ndarray is taken
                as RGB. Sides must be within [32, 10000] px; an unreadable or out-of-range image
                raises ``ImageError`` naming it. For CHW float tensors call the model:
                ``model([tensor])``.
            proposals (Tensor[R, 4] | None): xyxy boxes in original-image pixels; None = run
                selective search on the image (the proposal time is then in ``last_timings``).
                Boxes of another shape, or with NaN/inf, raise ``ProposalFileError`` naming the
                image; an empty set, and boxes that are empty, inverted or outside the image, give
                no detections and a warning naming the image.
            score_threshold: keep detections scoring above this (default: ``params.score_thresh``;
                SVM scores are margins, 0 is the decision boundary; with ``score ==
                "svm+softmax"`` the class's log-probability is added).
            channel_order: ``"rgb"`` (default) or ``"bgr"`` for an array in OpenCV's order
                (``cv2.imread``), which is flipped to RGB. Paths and PIL images are decoded to RGB by
                the library whatever this says.
        Returns:
            dict with ``boxes`` (float32 Tensor[N, 4], xyxy, 0-based continuous pixels of the
            original image), ``scores`` (float32 Tensor[N]) and ``labels`` (int64 Tensor[N],
            indices into ``class_names``), sorted by descending score, on the CPU.
        """
        return self.detect_batch([image], None if proposals is None else [proposals], score_threshold,
                                 channel_order=channel_order, workers=0)[0]

    def detect_batch(
        self,
        images: Sequence[Any],
        proposals: Sequence[torch.Tensor | np.ndarray | None] | None = None,
        score_threshold: float | None = None,
        *,
        channel_order: str = "rgb",
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`detect` for many images, with the same detections as calling it on each.

        Images of one size go through the trunk together (up to ``batch_size`` at a time, at each
        scale; on a GPU by default). Selective search runs either here, before each image is
        scored, split over the torch threads, or in ``workers`` processes that compute the next
        ``batch_size`` images' proposals while the current ones are scored, on the cores that
        torch's threads leave free (:func:`spare_cores`). Overlapping pays only where such cores
        exist: on 2 cores running 2 torch threads, the worker and the network compete and the
        throughput fell to half of the in-process loop's (tools/benchmark.py, section ``peers``),
        so the default chooses by the machine.

        Args:
            images, score_threshold, channel_order: as :meth:`detect`, for each image.
            proposals: None, or one entry per image (an entry None = selective search).
            batch_size: images per chunk (memory grows with it: one conv1 map per image and scale);
                None (default) = 1 on a CPU, where a batch of 4 ran the trunk 1.45x slower than single
                images (BENCHMARKS.md, section batch), and 4 on a GPU.
            workers: proposal processes; 0 = compute proposals here, one image at a time, on the
                torch threads; None (default) = 1 when :func:`spare_cores` is at least 1, else 0.
        Returns:
            one dict per image, as :meth:`detect`, on the CPU. ``last_timings`` holds each stage's
            seconds summed over the images; ``proposals`` is the time spent waiting for them.
        """
        if proposals is not None and len(proposals) != len(images):
            raise ValueError(f"proposals has {len(proposals)} entries for {len(images)} images")
        return [{k: v.cpu() for k, v in d.items()}
                for d in self.iter_detect(images, proposals, score_threshold, channel_order=channel_order,
                                          batch_size=batch_size, workers=workers if len(images) > 1 else 0)]

    @torch.inference_mode()
    def iter_detect(
        self,
        images: Iterable[Any],
        proposals: Iterable[torch.Tensor | np.ndarray | None] | None = None,
        score_threshold: float | None = None,
        *,
        channel_order: str = "rgb",
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`detect_batch` as a generator over any iterable (a folder of any length): reads
        ``batch_size`` images ahead and yields each image's detections (on the model's device) in
        order."""
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {', '.join(map(repr, CHANNEL_ORDERS))}, "
                             f"got {channel_order!r}")
        props = iter(proposals) if proposals is not None else None

        def items() -> Iterator[_Item]:
            for image in images:
                img, name = self._prepare_image(image, channel_order)
                given = next(props, None) if props is not None else None
                boxes = None if given is None else self._given_boxes(given, img.shape[0], img.shape[1], name)
                yield _Item(name=name, size=(img.shape[0], img.shape[1]), uint8=img, boxes=boxes)

        yield from self._run(items(), score_threshold, batch_size, workers)

    def forward(
        self,
        images: list[torch.Tensor],
        proposals: list[torch.Tensor] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect objects in a list of images, as torchvision detection models are called.

        ``model([t])`` gives the same detections as ``model.detect(a)`` for ``t`` the CHW float
        version of the uint8 array ``a`` (``torch.from_numpy(a).permute(2, 0, 1).float() / 255``): the
        trunk sees the same numbers (:func:`detector.pyramid.preprocess_float`) and selective search
        runs on ``round(t * 255)``.

        Args:
            images: list of Tensor[3, H, W] float, RGB in [0, 1], on any device (moved to the
                model's for the computation). Sides within [32, 10000] px.
            proposals: None (selective search on each image, in the model's ``proposal_options``), or
                one Tensor[R, 4] xyxy per image (an entry None = selective search).
        Returns:
            one dict per image with ``boxes`` (float32 [N, 4], xyxy pixels), ``scores`` (float32
            [N]) and ``labels`` (int64 [N], into ``class_names``), by descending score, on that
            image's device. The model's test threshold (``params.score_thresh``) applies.
        Raises:
            ImageError: an image that is not a [3, H, W] float tensor in [0, 1] of a usable size.
            RuntimeError: the model is in training mode (it is trained stage by stage by
                ``detector.engine.train``; call ``model.eval()``).
        """
        if self.training:
            raise RuntimeError("SPPDetector has no training forward (it is trained stage by stage by "
                               "detector.engine.train); call model.eval() before model(images)")
        if not isinstance(images, (list, tuple)):
            raise ImageError(f"model(images): images must be a list of Tensor[3, H, W], got {type(images).__name__}")
        if proposals is not None and len(proposals) != len(images):
            raise ValueError(f"proposals has {len(proposals)} entries for {len(images)} images")
        with torch.inference_mode():
            items = []
            for i, t in enumerate(images):
                name = f"images[{i}]"
                _check_float_image(t, name)
                _check_side(t.shape[1], t.shape[2], name)
                given = None if proposals is None else proposals[i]
                boxes = None if given is None else self._given_boxes(given, t.shape[1], t.shape[2], name)
                items.append(_Item(name=name, size=(t.shape[1], t.shape[2]), float01=t, boxes=boxes))
            # selective search here, one image at a time: a worker pool would need the caller's script to
            # have a __main__ guard, which a torchvision-style call must not ask for (detect_batch has one)
            return [{k: v.to(t.device) for k, v in d.items()}
                    for t, d in zip(images, self._run(items, None, batch_size=None, workers=0))]

    def compress_fc(self, rank: int) -> "SPPDetector":
        """Replace fc6/fc7 by truncated-SVD factors of the given rank (in place; 0 = keep); returns self."""
        if rank > 0:
            self.head = self.head.compress_svd(rank).to(self.device).eval()
            self.svd_rank = int(rank)
        return self

    def lower_fc(self, precision: str) -> "SPPDetector":
        """Run fc6/fc7 (dense or SVD factors) at ``precision`` (:mod:`detector.fc_precision`; in place,
        once; "float32" = keep). int8 needs the CPU and float16 CUDA: elsewhere the layers stay
        float32 with a warning, and ``fc_precision`` says what runs. Returns self."""
        from detector.fc_precision import lower_fc_precision, runnable_precision

        if self.fc_precision != "float32":
            raise ValueError(f"fc6/fc7 already run at {self.fc_precision}")
        run = runnable_precision(precision, self.device)
        if run != "float32":
            self.head = lower_fc_precision(self.head, run).eval()
            self.fc_precision = run
        return self

    def lower_conv(self, precision: str) -> "SPPDetector":
        """Run the trunk at ``precision`` (:mod:`detector.conv_precision`; "float32" = as trained).
        bfloat16 needs native hardware support: elsewhere the trunk stays float32 with a warning,
        and ``conv_precision`` says what runs. The weights are untouched. Returns self."""
        self.conv_precision = runnable_conv_precision(precision, self.device)
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
        fc_precision: str | None = None,
        conv_precision: str | None = None,
    ) -> "SPPDetector":
        """Load a checkpoint (``torch.load(weights_only=True)``: loading can never run code).

        Args:
            path: ``model.pt``.
            device: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees one, else the CPU).
            scales: override the test scales stored in the checkpoint.
            svd_rank: compress fc6/fc7 to this rank after loading (0 = dense); None = the rank
                stored with the model (its training config's ``test.svd_rank``), so the library call
                scores like ``tools/test_net.py``.
            fc_precision: ``"float32"``, ``"int8"`` (CPU), ``"float16"`` (CUDA) or ``"auto"`` for
                fc6/fc7 after the SVD (:mod:`detector.fc_precision`); None = the stored
                ``test.fc_precision``.
            conv_precision: ``"float32"`` or ``"bfloat16"`` for the trunk
                (:mod:`detector.conv_precision`); None = the stored ``test.conv_precision``.
        Raises:
            detector.checkpoint.CheckpointError: missing file, a file that would need to run code
                to load, not an SPPDetector checkpoint, or one whose parts do not fit together
                (the file and the problem are named).
        """
        from detector.checkpoint import load_detector
        from detector.engine.run import resolve_device

        det = load_detector(path, device=resolve_device(device) if isinstance(device, str) else device)
        if scales:
            det.params = dataclasses.replace(det.params, scales=tuple(scales))
        asked = {"svd_rank": None if svd_rank is None else int(svd_rank), "fc_precision": fc_precision,
                 "conv_precision": conv_precision}
        given = {k: v for k, v in asked.items() if v is not None}
        if given:
            try:
                det.params = dataclasses.replace(det.params, **given)
            except ValueError as e:
                raise ValueError(f"SPPDetector.load({path}): {e}") from None
        p = det.params
        return det.compress_fc(p.svd_rank).lower_fc(p.fc_precision).lower_conv(p.conv_precision)


@dataclass
class _Item:
    """One image on its way through :meth:`SPPDetector._run`: the uint8 RGB array (detect) or the
    float CHW tensor (forward), and its proposals once known."""

    name: str
    size: tuple[int, int]  # (H, W)
    uint8: np.ndarray | None = None  # [H, W, 3] RGB
    float01: torch.Tensor | None = None  # [3, H, W] RGB in [0, 1]
    boxes: torch.Tensor | None = None  # [R, 4] xyxy, CPU
    future: Any = None  # a pending proposal job

    def rgb_uint8(self) -> np.ndarray:
        """The image as uint8 [H, W, 3] RGB (selective search's input): ``round(t * 255)`` of a tensor."""
        if self.uint8 is None:
            t = self.float01.detach().to(torch.float32)
            self.uint8 = (t * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
        return self.uint8

    def trunk_input(self, det: SPPDetector) -> torch.Tensor:
        """The trunk's input Tensor[3, H, W] on the model's device (equal for t = uint8 / 255)."""
        fmt = det.backbone.input_format
        if self.float01 is not None:
            return preprocess_float(self.float01.to(det.device, torch.float32), fmt)  # (3, H, W)
        return preprocess(self.uint8, fmt).to(det.device)  # (3, H, W)

    def proposal_boxes(self, options: dict) -> torch.Tensor:
        """Tensor[R, 4] on the CPU: the given boxes, the pool's result, or selective search here."""
        if self.boxes is None:
            if self.future is None:
                # here, selective search is split over the process's torch threads: the detection
                # that follows uses them too, and the boxes do not depend on the split
                arr = propose(self.rgb_uint8(), threads=torch.get_num_threads(), **options)
            else:
                from concurrent.futures.process import BrokenProcessPool

                try:
                    arr = self.future.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(
                        f"{self.name}: the proposal worker process ended before it returned. Worker processes "
                        "are spawned and import the calling script first: a script that calls detect_batch or "
                        "iter_detect with workers > 0 needs its code under 'if __name__ == \"__main__\":' "
                        "(or pass workers=0)") from e
            self.boxes = torch.from_numpy(np.asarray(arr, dtype=np.float32)).reshape(-1, 4)  # (R, 4)
        return self.boxes


def spare_cores() -> int:
    """CPU cores this process may run on (:func:`proposals.compute.usable_cores`) beyond torch's
    intra-op threads: the cores that proposal worker processes of :meth:`SPPDetector.detect_batch`
    can use without slowing the network down."""
    from proposals.compute import usable_cores

    return max(0, usable_cores() - torch.get_num_threads())


def _check_side(h: int, w: int, name: str) -> None:
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}; sides must be within [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] px")


def _check_float_image(t: Any, name: str) -> None:
    """A torchvision-style input: Tensor[3, H, W] float, RGB in [0, 1] (finite)."""
    if not isinstance(t, torch.Tensor):
        raise ImageError(f"{name}: expected a Tensor[3, H, W] float in [0, 1], got {type(t).__name__}")
    if t.ndim != 3 or t.shape[0] != 3 or not t.is_floating_point():
        raise ImageError(f"{name}: expected a Tensor[3, H, W] float in [0, 1] (RGB, channels first), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -0.01 or hi > 1.01:
        raise ImageError(f"{name}: pixel values must be finite and in [0, 1], got range [{lo:g}, {hi:g}] "
                         f"(divide 0..255 values by 255 first)")


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
