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
unchanged and crops see the same pixel values as the SPP-mode pyramid. The normalisation is a per-channel affine map and bilinear
weights sum to 1, so normalising the image once before warping equals R-CNN's "warp, then subtract"
up to float rounding. The zero canvas is zero *after* normalisation (grey 128 for ZF-5), as in
R-CNN.

Timing (:func:`compare_rcnn`) follows spec §10: "conv time" is the full-image conv at 1 or 5 scales
(SPP) or crop + conv of all windows (R-CNN); "fc time" is pooling + fc6/fc7 for all windows;
proposals are excluded.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING, Any, Sequence

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
    "random_detector",
    "random_boxes",
    "compare_rcnn",
    "format_comparison",
]

log = logging.getLogger(__name__)

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
    # (measured 0.44 s per 256 crops vs 0.15 s) and the convolutions accept either layout
    return torch.from_numpy(canvas).permute(0, 3, 1, 2)  # (R, 3, 227, 227) channels_last


# ---------------------------------------------------------------------------------------- scoring


def default_batch_size(device: torch.device | str) -> int:
    """Windows per conv batch: 256 on CUDA (R-CNN's batch); 64 on CPU, where a 256-crop batch of
    full-width ZF-5 holds several GB of conv1 activations and is slower per crop (measured)."""
    return 256 if torch.device(device).type == "cuda" else 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, timings: dict[str, float], device: torch.device) -> None:
        self.timings, self.device = timings, device

    def __call__(self, stage: str) -> "_Timer":
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
    tm = _Timer(timings, device)
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
    tm = _Timer(timings, det.device)
    pooled = rcnn_pooled_features(det, img, boxes, batch_size, timings)  # (R, D)
    with tm("fc"):
        feats = det.fc_features(pooled)  # (R, F)
    with tm("svm"):
        scores = det.svm_scores(feats)  # (R, K)
    dets = det.postprocess(boxes, pooled, scores, (h, w), score_threshold, timed=tm)
    return {k: v.cpu() for k, v in dets.items()}, timings


# ---------------------------------------------------------------------------------------- timing models


def random_detector(
    width_mult: float = 1.0,
    fc_dim: int = 4096,
    num_classes: int = 20,
    scales: Sequence[int] = (688,),
    levels: Sequence[int] = (1, 2, 3, 6),
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> "SPPDetector":
    """A random-weight ZF-5 SPPDetector for timing only (timing does not depend on weights).

    Backbone with the spec §1 init, fc6/fc7 of width ``fc_dim``, random SVMs and box regressors,
    class names ``class0..``; scores are meaningless.
    """
    from detector.backbones import build_backbone
    from detector.detector import SPPDetector
    from detector.head import FCHead
    from detector.spp import spp_out_dim

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = build_backbone("zf5", width_mult=width_mult, weights="none")
    d = spp_out_dim(backbone.out_channels, levels)
    head = FCHead(d, fc_dim=fc_dim, num_classes=None)
    k = num_classes
    return SPPDetector(
        backbone=backbone, head=head,
        svm_weight=torch.randn(fc_dim, k, generator=g) * 1e-3, svm_bias=torch.zeros(k),
        feature_scale=1.0, bbox_weight=torch.randn(d + 1, 4 * k, generator=g) * 1e-4, pool_scale=1.0,
        class_names=[f"class{i}" for i in range(k)], scales=tuple(scales), levels=tuple(levels),
        arch="zf5", width_mult=width_mult, device=device,
    )


def random_boxes(height: int, width: int, n: int, generator: torch.Generator, min_size: int = 20) -> torch.Tensor:
    """``n`` random xyxy boxes inside the image, sides uniform in [min_size, side] (proposal padding).

    Returns:
        Tensor[n, 4] float32, integer-valued xyxy.
    """
    ms_w, ms_h = min(min_size, width), min(min_size, height)
    bw = ms_w + torch.rand(n, generator=generator) * (width - ms_w)
    bh = ms_h + torch.rand(n, generator=generator) * (height - ms_h)
    x1 = torch.rand(n, generator=generator) * (width - bw)
    y1 = torch.rand(n, generator=generator) * (height - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1).round()  # (n, 4)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def _scale_label(scales: Sequence[int]) -> str:
    return f"{len(scales)}-sc" if len(scales) > 1 else f"1-sc ({scales[0]})"


@torch.inference_mode()
def compare_rcnn(
    det: "SPPDetector",
    images: Sequence[np.ndarray],
    proposals: Sequence[torch.Tensor | np.ndarray],
    scale_sets: Sequence[Sequence[int]] = ((688,), (480, 576, 688, 864, 1200)),
    batch_size: int | None = None,
    warmup: bool = True,
    progress: bool = False,
    svd_ranks: Sequence[int] = (),
) -> dict[str, Any]:
    """SPP-net vs R-CNN mode, per image, like with like (spec §10 timing definitions).

    For every image and scale set: SPP conv (one backbone pass per scale), pool (projection + SPP)
    and fc (fc6/fc7 of all windows). R-CNN: crop, conv (per 227x227 window in batches), pool
    (whole-map SPP of each crop) and fc. Proposals are given (their time excluded). A warm-up
    (SPP on the first image at every scale set, R-CNN on one batch) runs first and is not timed.

    Args:
        det: the model (a trained checkpoint or :func:`random_detector`).
        images: uint8 RGB arrays [H, W, 3].
        proposals: per image Tensor[R_i, 4] xyxy.
        scale_sets: SPP scale sets to time (paper: 688 and the 5 scales).
        batch_size: R-CNN windows per conv batch.
        svd_ranks: also time fc6/fc7 compressed by truncated SVD at these ranks
            (:meth:`FCHead.compress_svd`), on the same pooled features in both modes, so the conv
            passes are not repeated; reported under ``svd``.
    Returns:
        dict with ``images``, ``proposals`` (R per image), ``threads``, ``device``, ``image_sizes``;
        ``spp`` = {label: {"conv"|"pool"|"fc"|"conv_time"|"fc_time"|"total": stats}} per scale set;
        ``rcnn`` = {"crop"|"conv"|"pool"|"fc"|"conv_time"|"fc_time"|"total": stats}; and
        ``speedup`` = {label: {"conv": x, "overall": x}} from the medians. conv_time = conv (SPP) or
        crop + conv (R-CNN); fc_time = pool + fc; total = conv_time + fc_time. Stats are dicts of
        median / min / max / values, in seconds. ``svd`` = {rank: {"spp": {label: stats as above with
        "fc" the compressed head's}, "rcnn": {...}, "speedup": {label: {"overall": x}}}} when ``svd_ranks``.
    """
    from detector.regions import pool_regions

    if len(images) != len(proposals):
        raise ValueError(f"compare_rcnn: {len(images)} images but {len(proposals)} proposal sets")
    if not images:
        raise ValueError("compare_rcnn: no images")
    boxes_list = [as_boxes(p, f"proposals[{i}]").to(det.device) for i, p in enumerate(proposals)]
    bs = int(batch_size or default_batch_size(det.device))
    labels = [_scale_label(s) for s in scale_sets]
    svd_heads = {int(r): det.head.compress_svd(int(r)).to(det.device).eval() for r in svd_ranks}
    svd_t: dict[int, dict[str, list[float]]] = {r: {lab: [] for lab in labels + ["rcnn"]} for r in svd_heads}

    def time_svd(key: str, pooled: torch.Tensor) -> None:
        for r, head in svd_heads.items():
            t_svd: dict[str, float] = {}
            with _Timer(t_svd, det.device)("fc"):
                head.features(pooled)  # (R, F)
            svd_t[r][key].append(t_svd["fc"])

    if warmup:
        for scales in scale_sets:
            pyr = det.compute_pyramid(images[0], scales)
            det.fc_features(pool_regions(pyr, boxes_list[0][:bs], det.levels, det.proj))
        warm = rcnn_pooled_features(det, images[0], boxes_list[0][:bs], bs)  # (bs, D)
        det.fc_features(warm)
        for head in svd_heads.values():
            head.features(warm)
    spp_t: dict[str, dict[str, list[float]]] = {lab: {"conv": [], "pool": [], "fc": []} for lab in labels}
    rc_t: dict[str, list[float]] = {"crop": [], "conv": [], "pool": [], "fc": []}
    it = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="compare R-CNN", unit="img")
    for i in it:
        img, boxes = images[i], boxes_list[i]
        for lab, scales in zip(labels, scale_sets):
            t: dict[str, float] = {}
            tm = _Timer(t, det.device)
            with tm("conv"):
                pyr = det.compute_pyramid(img, scales)
            with tm("pool"):
                pooled = pool_regions(pyr, boxes, det.levels, det.proj)  # (R, D)
            with tm("fc"):
                det.fc_features(pooled)  # (R, F)
            time_svd(lab, pooled)
            del pyr, pooled
            for k, v in t.items():
                spp_t[lab][k].append(v)
        t = {}
        pooled = rcnn_pooled_features(det, img, boxes, bs, t)  # (R, D)
        tm = _Timer(t, det.device)
        with tm("fc"):
            det.fc_features(pooled)  # (R, F)
        time_svd("rcnn", pooled)
        del pooled
        for k in rc_t:
            rc_t[k].append(t.get(k, 0.0))

    def derived(d: dict[str, list[float]], rcnn: bool, fc_only: list[float] | None = None) -> dict[str, Any]:
        """Stats of every stage plus conv_time, fc_time and total; ``fc_only`` replaces d["fc"]
        (the SVD rows: same conv and pool times, another fc)."""
        if fc_only is not None:
            d = {**d, "fc": fc_only}
        n = len(d["conv"])
        conv = [d["conv"][j] + (d["crop"][j] if rcnn else 0.0) for j in range(n)]
        fc = [d["pool"][j] + d["fc"][j] for j in range(n)]
        out = {k: _stats(v) for k, v in d.items()}
        out["conv_time"] = _stats(conv)
        out["fc_time"] = _stats(fc)
        out["total"] = _stats([a + b for a, b in zip(conv, fc)])
        return out

    spp = {lab: derived(v, False) for lab, v in spp_t.items()}
    rcnn = derived(rc_t, True)
    speedup = {
        lab: {
            "conv": rcnn["conv_time"]["median"] / spp[lab]["conv_time"]["median"],
            "overall": rcnn["total"]["median"] / spp[lab]["total"]["median"],
        }
        for lab in labels
    }
    svd: dict[int, dict[str, Any]] = {}
    for r, per in svd_t.items():
        sp = {lab: derived(spp_t[lab], False, per[lab]) for lab in labels}
        rc = derived(rc_t, True, per["rcnn"])
        svd[r] = {"spp": sp, "rcnn": rc,
                  "speedup": {lab: {"overall": rc["total"]["median"] / sp[lab]["total"]["median"]} for lab in labels}}
    return {
        "svd": svd,
        "images": len(images),
        "proposals": [int(b.shape[0]) for b in boxes_list],
        "image_sizes": [list(im.shape[:2]) for im in images],
        "threads": torch.get_num_threads(),
        "device": str(det.device),
        "batch_size": bs,
        "scale_sets": [list(s) for s in scale_sets],
        "spp": spp,
        "rcnn": rcnn,
        "speedup": speedup,
    }


def format_comparison(cmp: dict[str, Any]) -> str:
    """Markdown table shaped like the paper's (spec §11): SPP columns, then R-CNN; medians with
    [min-max] in seconds per image; speedups = R-CNN median / SPP median."""
    labels = list(cmp["spp"])
    head = "| seconds per image (median [min-max]) | " + " | ".join(f"SPP {lab}" for lab in labels) + " | R-CNN |"
    sep = "|---" * (len(labels) + 2) + "|"

    def cell(s: dict[str, Any]) -> str:
        return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"

    rows = [head, sep]
    spec = [("conv time", "conv_time"), ("  of which crop (R-CNN)", "crop"), ("fc time (pool + fc6/fc7)", "fc_time"),
            ("  of which pool", "pool"), ("total (conv + fc)", "total")]
    for name, key in spec:
        spp_cells = [cell(cmp["spp"][lab][key]) if key in cmp["spp"][lab] else "–" for lab in labels]
        rows.append(f"| {name} | " + " | ".join(spp_cells) + f" | {cell(cmp['rcnn'][key])} |")
    rows.append("| speedup, conv only | " + " | ".join(f"{cmp['speedup'][lab]['conv']:.1f}x" for lab in labels) + " | – |")
    rows.append("| speedup, overall | " + " | ".join(f"{cmp['speedup'][lab]['overall']:.1f}x" for lab in labels) + " | – |")
    for r, sv in cmp.get("svd", {}).items():
        rows.append(f"| fc time, fc6/fc7 SVD rank {r} (pool + fc) | "
                    + " | ".join(cell(sv["spp"][lab]["fc_time"]) for lab in labels) + f" | {cell(sv['rcnn']['fc_time'])} |")
        rows.append(f"| total, SVD rank {r} | "
                    + " | ".join(cell(sv["spp"][lab]["total"]) for lab in labels) + f" | {cell(sv['rcnn']['total'])} |")
        rows.append(f"| speedup, overall, SVD rank {r} | "
                    + " | ".join(f"{sv['speedup'][lab]['overall']:.1f}x" for lab in labels) + " | – |")
    n_props = cmp["proposals"]
    foot = (f"{cmp['images']} images, {statistics.median(n_props):.0f} proposals per image (median), "
            f"{cmp['threads']} threads, device {cmp['device']}, R-CNN batch {cmp['batch_size']}; proposals excluded.")
    return "\n".join(rows) + "\n\n" + foot
