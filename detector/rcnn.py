"""R-CNN baseline mode: every window warped to 227x227 and run through the conv layers (spec §10).

Shape shorthand:
    R: proposals in one image      C: conv5 channels          B = sum(n*n): SPP bins
    D = C * B: pooled width        F: fc7 width               K: foreground classes
    N: detections                  b: windows in one conv batch

The paper compared R-CNN and SPP-net with one ZF-5 model (spec §11, [P4] §4.2-4.3): R-CNN crops each
window, runs conv1..conv5 on the 227x227 crop (conv5 13x13 for ZF-5) and pools it; SPP-net runs the
conv layers once per image and pools each window's projection. Here both modes share the backbone,
the SPP levels, fc6/fc7, the SVMs, the box regressors and the post-processing of an
:class:`detector.detector.SPPDetector`; only the conv5 features of a window differ. A crop's conv5
is pooled over the whole 13x13 map with the spec §4 adaptive bins
(:class:`detector.spp.SpatialPyramidPool`), so its pooled width D equals the SPP-mode width and the
same fc6 applies.

Deviation from R-CNN: R-CNN subtracts the 227 centre crop of its ImageNet mean *image*
(spec §10 step 4). This mode instead applies the backbone's own input normalisation, the project's
one pre-processing :func:`detector.pyramid.preprocess` (ZF-5: BGR 0..255 minus the constant 128,
spec §2; torchvision trunks: RGB/255, ImageNet mean/std), so that the SPP-mode model applies
unchanged and crops see the same pixel values as the SPP-mode pyramid. The normalisation is a
per-channel affine map and bilinear weights sum to 1, so normalising the image once before warping
equals R-CNN's "warp, then subtract" up to float rounding. The zero canvas is zero *after*
normalisation (grey 128 for ZF-5), as in R-CNN.

The SPP-net vs R-CNN timing comparison lives with the benchmarks
(:mod:`detector.bench.rcnn_compare`).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from detector.boxes import as_boxes, xyxy_to_voc
from detector.pyramid import preprocess
from detector.spp import SpatialPyramidPool

if TYPE_CHECKING:  # pragma: no cover
    from detector.detector import SPPDetector

__all__ = [
    "RCNN_STAGES",
    "crop_geometry",
    "warp_crops",
    "rcnn_pooled_features",
    "detect_rcnn",
    "default_batch_size",
    "StageTimer",
]

RCNN_STAGES = ("crop", "conv", "pool", "fc", "svm", "bbox", "nms")


# ---------------------------------------------------------------------------------------- crops


def _mround(x: np.ndarray) -> np.ndarray:
    """MATLAB ``round``: halves away from zero (R-CNN's rcnn_im_crop.m runs in MATLAB)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def crop_geometry(boxes: torch.Tensor | np.ndarray, height: int, width: int, crop_size: int = 227,
                  padding: int = 16) -> np.ndarray:
    """Where each window's warped crop comes from and goes to (spec §10 steps 1-3, 5).

    R-CNN computes the crop in 1-based inclusive pixel indices; the boxes enter that frame once
    through :func:`detector.boxes.xyxy_to_voc` (continuous xyxy ``(x1, y1, x2, y2)`` covers the
    pixels ``x1+1 .. x2`` 1-based).

    Args:
        boxes (Tensor[R, 4]): xyxy, original-image pixels.
        height, width: image size.
        crop_size: output side (227).
        padding: context pixels on each side at the output scale (16).
    Returns:
        ndarray[R, 8] int64: per window ``(sx1, sy1, sx2, sy2, px, py, cw, ch)``: the 0-based
        end-exclusive source pixel slice ``[sy1:sy2, sx1:sx2]`` of the clipped, enlarged box; the
        paste offset ``(px, py)`` in the canvas (the off-image part, scaled); and the warped size
        ``(cw, ch)``. ``cw`` or ``ch`` <= 0 (a window entirely off the image) means an all-zero crop.
    """
    b = xyxy_to_voc(boxes).numpy().reshape(-1, 4)  # (R, 4) 1-based inclusive, float64
    scale = crop_size / (crop_size - 2 * padding)
    half_w = (b[:, 2] - b[:, 0] + 1) / 2
    half_h = (b[:, 3] - b[:, 1] + 1) / 2
    cx, cy = b[:, 0] + half_w, b[:, 1] + half_h
    # step 1: enlarge about the centre by 227 / (227 - 32), round
    x1 = _mround(cx - half_w * scale)
    y1 = _mround(cy - half_h * scale)
    x2 = _mround(cx + half_w * scale)
    y2 = _mround(cy + half_h * scale)
    unclipped_w, unclipped_h = x2 - x1 + 1, y2 - y1 + 1
    # step 2: clip, remembering the off-image part on the left/top
    pad_x1, pad_y1 = np.maximum(0, 1 - x1), np.maximum(0, 1 - y1)
    x1, y1 = np.maximum(1, x1), np.maximum(1, y1)
    x2, y2 = np.minimum(width, x2), np.minimum(height, y2)
    clipped_w, clipped_h = x2 - x1 + 1, y2 - y1 + 1
    # step 3: the clipped part is warped to round(clipped * 227 / unclipped)
    sx, sy = crop_size / unclipped_w, crop_size / unclipped_h
    cw, ch = _mround(clipped_w * sx), _mround(clipped_h * sy)
    px, py = _mround(pad_x1 * sx), _mround(pad_y1 * sy)
    cw = np.where(px + cw > crop_size, crop_size - px, cw)
    ch = np.where(py + ch > crop_size, crop_size - py, ch)
    geo = np.stack([x1 - 1, y1 - 1, x2, y2, px, py, cw, ch], axis=1)  # (R, 8)
    return geo.astype(np.int64)



def _channel_last_input(image: np.ndarray, input_format: str) -> np.ndarray:
    """:func:`detector.pyramid.preprocess` as a C-contiguous float32 ndarray[H, W, 3] (channel-last:
    OpenCV resizes interleaved channels in one call)."""
    return np.ascontiguousarray(preprocess(image, input_format).permute(1, 2, 0).numpy())  # (H, W, 3)


def warp_crops(
    image: np.ndarray,
    boxes: torch.Tensor | np.ndarray,
    input_format: str,
    crop_size: int = 227,
    padding: int = 16,
    normalized: np.ndarray | None = None,
) -> torch.Tensor:
    """R-CNN ``warp`` crops with context padding (spec §10), ready for the backbone.

    Each box is enlarged about its centre by ``crop_size / (crop_size - 2*padding)``, rounded,
    clipped to the image; the clipped part is resized bilinearly without antialiasing
    (``cv2.resize`` INTER_LINEAR on float32: half-pixel centres, edge replication, the same
    sampling as MATLAB ``imresize(..., 'bilinear', 'antialiasing', false)``) to
    ``round(clipped * crop_size / unclipped)`` and pasted into a zero canvas at the scaled offset
    of the part that fell off the image. Normalisation: see the module docstring (constant mean
    128 for ZF-5, not R-CNN's ImageNet mean image).

    Args:
        image: uint8 RGB [H, W, 3].
        boxes (Tensor[R, 4]): xyxy, original-image pixels.
        input_format: the backbone's ``input_format``.
        crop_size: 227. padding: 16.
        normalized (ndarray[H, W, 3] float32): the image already pre-processed channel-last
            (:func:`detector.pyramid.preprocess`, permuted) when the caller has it (batched callers
            normalise once per image).
    Returns:
        Tensor[R, 3, crop_size, crop_size] float32 (``torch.channels_last`` memory format).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"warp_crops: image must be [H, W, 3], got {tuple(image.shape)}")
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)) if not isinstance(boxes, torch.Tensor) else boxes
    if boxes_t.ndim != 2 or boxes_t.shape[1] != 4:
        raise ValueError(f"warp_crops: boxes must be [R, 4] xyxy, got {tuple(boxes_t.shape)}")
    h, w = image.shape[:2]
    src = _channel_last_input(image, input_format) if normalized is None else normalized  # (H, W, 3)
    geo = crop_geometry(boxes_t.detach().float().cpu(), h, w, crop_size, padding)  # (R, 8)
    r = geo.shape[0]
    canvas = np.zeros((r, crop_size, crop_size, 3), dtype=np.float32)  # (R, 227, 227, 3)
    for i, (sx1, sy1, sx2, sy2, px, py, cw, ch) in enumerate(geo.tolist()):
        if cw <= 0 or ch <= 0 or sx2 <= sx1 or sy2 <= sy1:
            continue  # window entirely off the image: all-zero crop
        patch = src[sy1:sy2, sx1:sx2]
        if patch.shape[0] == ch and patch.shape[1] == cw:
            canvas[i, py:py + ch, px:px + cw] = patch
        else:
            canvas[i, py:py + ch, px:px + cw] = cv2.resize(patch, (cw, ch), interpolation=cv2.INTER_LINEAR)
    # channels_last view, no copy: a contiguous NCHW copy costs more than all the resizes together
    # (BENCHMARKS.md, rcnn notes) and the convolutions accept either layout
    return torch.from_numpy(canvas).permute(0, 3, 1, 2)  # (R, 3, 227, 227) channels_last


# ---------------------------------------------------------------------------------------- scoring


def default_batch_size(device: torch.device | str) -> int:
    """Windows per conv batch: 256 on CUDA (R-CNN's batch); 64 on CPU, where a 256-crop batch of
    full-width ZF-5 holds several GB of conv1 activations and is slower per crop (measured)."""
    return 256 if torch.device(device).type == "cuda" else 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Adds the wall seconds of each ``with timer(stage):`` block to ``timings[stage]``.

    The device is synchronised before and after each block, so on CUDA the time is the stage's
    own work, not its launch.

    Args:
        timings: the dict to add to (created stages start at 0).
        device: the device whose queued work each block waits for.
    """

    def __init__(self, timings: dict[str, float], device: torch.device) -> None:
        self.timings, self.device = timings, device

    def __call__(self, stage: str) -> "StageTimer":
        self.stage = stage
        return self

    def __enter__(self) -> None:
        _sync(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        _sync(self.device)
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.t0


@torch.inference_mode()
def rcnn_pooled_features(
    det: "SPPDetector",
    image: np.ndarray,
    boxes: torch.Tensor,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
    crop_size: int = 227,
    padding: int = 16,
) -> torch.Tensor:
    """Pooled conv5 of each warped window: crop -> backbone per batch -> whole-map SPP.

    Args:
        det: the detector whose backbone and SPP levels are used.
        image: uint8 RGB [H, W, 3].
        boxes (Tensor[R, 4]): xyxy, original-image pixels.
        batch_size: windows per backbone call (default :func:`default_batch_size`).
        timings: if given, seconds are added under "crop", "conv", "pool".
    Returns:
        Tensor[R, D] float32 on ``det.device``, D = C * sum(n*n) as in SPP mode.
    """
    device = det.device
    bs = int(batch_size or default_batch_size(device))
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    timings = {} if timings is None else timings
    tm = StageTimer(timings, device)
    pool = SpatialPyramidPool(det.levels)
    fmt = det.backbone.input_format
    with tm("crop"):
        normalized = _channel_last_input(image, fmt)  # (H, W, 3)
    r = boxes.shape[0]
    out = torch.empty((r, pool.out_dim(det.backbone.out_channels)), dtype=torch.float32, device=device)  # (R, D)
    for s in range(0, r, bs):
        with tm("crop"):
            crops = warp_crops(image, boxes[s:s + bs], fmt, crop_size, padding, normalized=normalized)  # (b, 3, 227, 227)
            crops = crops.to(device, non_blocking=True)
        with tm("conv"):
            fmap = det.backbone(crops)  # (b, C, 13, 13) for ZF-5
        with tm("pool"):
            out[s:s + bs] = pool(fmap.float())  # (b, D)
    return out


@torch.inference_mode()
def detect_rcnn(
    det: "SPPDetector",
    image: Any,
    proposals: torch.Tensor | np.ndarray,
    score_threshold: float | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Detect one image in R-CNN mode with ``det``'s model (spec §10): same head, post-processing.

    Args:
        det: a loaded :class:`detector.detector.SPPDetector`.
        image: uint8 RGB [H, W, 3] (or anything ``det.detect`` accepts: PIL image, path).
        proposals (Tensor[R, 4]): xyxy, original-image pixels (R-CNN mode needs given windows).
        score_threshold: as :meth:`SPPDetector.detect` (default ``det.score_thresh``).
        batch_size: windows per backbone call (default :func:`default_batch_size`).
    Returns:
        (detections, timings): detections is a dict ``boxes`` (float32 Tensor[N, 4] xyxy),
        ``scores`` (float32 Tensor[N]), ``labels`` (int64 Tensor[N]) on the CPU, sorted by
        descending score; timings maps each of :data:`RCNN_STAGES` to seconds.
    """
    img, _ = det._prepare_image(image)
    h, w = img.shape[:2]
    boxes = as_boxes(proposals, "proposals").to(det.device)
    timings: dict[str, float] = {k: 0.0 for k in RCNN_STAGES}
    if boxes.shape[0] == 0:
        empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        return empty, timings
    tm = StageTimer(timings, det.device)
    pooled = rcnn_pooled_features(det, img, boxes, batch_size, timings)  # (R, D)
    with tm("fc"):
        feats = det.fc_features(pooled)  # (R, F)
    with tm("svm"):
        scores = det.svm_scores(feats)  # (R, K)
    dets = det.postprocess(boxes, pooled, scores, (h, w), score_threshold, timed=tm)
    return {k: v.cpu() for k, v in dets.items()}, timings
