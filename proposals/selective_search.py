"""Selective search (OpenCV contrib) made deterministic and safe, plus the default "fast+" mode.

Shape shorthand (used across the project):
    R: proposals in one image      H x W: image height and width in pixels

Modes of :func:`selective_search`
---------------------------------
``"fast"``     OpenCV's ``switchToSelectiveSearchFast`` (HSV and Lab, k = 150, 300, 450, two
               strategy sets; close to the R-CNN / SPP-net "fast" setting, spec §9) on the image
               (downscaled only when its longer side exceeds ``max_side``).
``"quality"``  OpenCV's ``switchToSelectiveSearchQuality`` (5 colour spaces x 5 k x 4 strategies).
``"fast+"``    the default: OpenCV "fast" on a copy whose longer side is ``ss_side`` (320 px), unioned
               with a multi-scale grid of sliding windows (square by default; sides from
               ``grid_min`` px to the image size in steps of sqrt(2), stride half the side).
               Selective search merges touching objects of similar colour early (cells in a smear,
               digits on a page), so some objects never get a box of their own; the grid guarantees
               every object a window with IoU >= 0.5 in expectation, and selective search supplies
               the tight boxes. The recall and time of each mode on BCCD and digits, which chose
               "fast+" as the default, are in BENCHMARKS.md ("selective_search" notes).

Output and order (all modes)
----------------------------
float32 ``[R, 4]`` xyxy boxes of the input image (project convention, ``detector.boxes``), boxes
with a side under ``min_size`` removed, exact duplicates removed (first kept), then cut to
``max_boxes``. OpenCV ranks its boxes with ``std::rand`` and threads, so its order changes from run
to run (the set does not). We discard that order and sort selective-search boxes by a fixed
integer hash of their coordinates (:func:`_hash_order`): a deterministic shuffle that, like OpenCV's
random ranking, leaves the first k boxes unbiased in position and scale, so cutting to ``max_boxes``
keeps a fair sample. In "fast+" the selective-search boxes come first, then the grid windows, all
scales hash-shuffled together, so a cap thins every scale alike (a coarse-to-fine order lost the
smallest windows first and measured worse on small digits: recall@0.5 0.652 vs 0.667).

Threads: OpenCV's search is one thread; its parts (one per colour image and graph segmentation)
are independent, so ``threads=n`` runs them on n threads and unions their rectangles, which are
exactly the rectangles of the single call (:func:`_ss_tasks`). The detector passes its torch
thread count; the proposal worker processes of training run one thread each.

Failure cases handled
---------------------
* grayscale, RGBA, 16-bit and float input: normalised by :func:`proposals.imageio.to_rgb_uint8`;
* images over ``max_side``: downscaled for selective search, boxes mapped back;
* tiny images (a side under ``MIN_SS_SIDE`` px) and extreme aspect ratios (over ``MAX_SS_ASPECT``;
  old OpenCV builds crash there, opencv_contrib#2102): selective search runs on a copy padded with
  edge pixels to a safe shape and boxes are clipped back to the image (a warning says so);
* images under 2 px a side: :class:`proposals.imageio.ImageError`.
"""
from __future__ import annotations

import logging
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from proposals.imageio import ImageError, to_rgb_uint8

__all__ = ["selective_search", "grid_boxes", "edge_boxes", "propose", "METHODS", "MODES", "SS_SIDE", "GRID_MIN"]

log = logging.getLogger(__name__)

MODES = ("fast+", "fast", "quality")
METHODS = ("selective_search", "edge_boxes")  # what :func:`propose` computes
SS_SIDE = 320  # px: longer side of the copy that "fast+" runs selective search on (measured, see module doc)
GRID_MIN = 32  # px: smallest grid window side in "fast+"
MAX_SIDE = 1000  # px: larger images are downscaled before selective search ("fast"/"quality")
MIN_SS_SIDE = 32  # px: smaller sides are padded before selective search
MAX_SS_ASPECT = 2.4  # longer/shorter side; beyond it the image is padded (opencv_contrib#2102)


def _xywh_to_xyxy(rects: np.ndarray) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` rects -> xyxy float32, exactly ``detector.boxes.xywh_to_xyxy`` in numpy.

    Kept in numpy so that worker processes never import torch (10 s per spawned worker on a loaded
    2-core machine, measured); ``tests/test_proposals.py`` pins it to ``detector.boxes``.

    Args:
        rects (ndarray [R, 4]): x, y of the top-left corner, width, height.
    Returns:
        ndarray float32 [R, 4]: xyxy.
    """
    r = np.asarray(rects, dtype=np.float32).reshape(-1, 4)  # (R, 4)
    return np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1)  # (R, 4)


def _hash_order(boxes: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random permutation of boxes, from their coordinates only.

    Key: a 64-bit multiplicative hash (splitmix64 finaliser) of the four coordinates rounded to
    1/16 px; ties (equal keys) keep input order (stable sort).

    Args:
        boxes (ndarray [R, 4]): any box format.
    Returns:
        ndarray [R] int64: order.
    """
    q = np.round(boxes.astype(np.float64) * 16).astype(np.int64).view(np.uint64)  # (R, 4)
    with np.errstate(over="ignore"):
        h = np.full(len(boxes), 0x9E3779B97F4A7C15, dtype=np.uint64)
        for c in range(4):
            h = (h ^ q[:, c]) * np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(29)
    return np.argsort(h, kind="stable")


def _finish(boxes: np.ndarray, min_size: float, max_boxes: int | None) -> np.ndarray:
    """Drop boxes with a side under min_size, drop exact duplicates (first kept), cap."""
    boxes = boxes.astype(np.float32).reshape(-1, 4)  # (R, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    boxes = boxes[(w >= min_size) & (h >= min_size)]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    if max_boxes is not None and max_boxes > 0:
        boxes = boxes[:max_boxes]
    return np.ascontiguousarray(boxes)


# OpenCV's switchToSelectiveSearchFast / Quality defaults: graph segmentations with k = base_k,
# base_k + inc_k, ... (3 of them for "fast", 5 for "quality") and sigma 0.8.
_SS_BASE_K, _SS_INC_K, _SS_SIGMA = 150, 150, 0.8
_SS_N_K = {"fast": 3, "quality": 5}


def _ss_tasks(strategy: str) -> list[tuple[int | None, float]]:
    """The independent parts of one OpenCV selective search, as ``(colour conversion, k)`` pairs.

    ``process()`` runs the hierarchical grouping for every (colour image, graph segmentation) pair
    in turn, pools the regions of all pairs and removes duplicate rectangles; no pair depends on
    another, so the union of the pairs' rectangles is the set the whole call returns (its order,
    ranked with ``std::rand``, is discarded by :func:`_hash_order`). "fast" has 2 colour images (HSV,
    Lab) x 3 k: 6 parts. "quality" has 5 colour images x 5 k; it is split by k only (5 parts), its
    colour images being the ones OpenCV's switch builds (None: keep them).
    """
    import cv2

    ks = [float(_SS_BASE_K + i * _SS_INC_K) for i in range(_SS_N_K[strategy])]
    if strategy == "fast":
        return [(code, k) for code in (cv2.COLOR_BGR2HSV, cv2.COLOR_BGR2Lab) for k in ks]
    return [(None, k) for k in ks]


def _ss_part(bgr: np.ndarray, strategy: str, code: int | None, k: float) -> np.ndarray:
    """The rectangles of one part of :func:`_ss_tasks`: int32 [r, 4] x, y, w, h (OpenCV releases the
    GIL in ``process()``, so parts run side by side in threads)."""
    import cv2

    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if strategy == "quality":
        ss.switchToSelectiveSearchQuality(_SS_BASE_K, _SS_INC_K, _SS_SIGMA)
    else:
        ss.switchToSelectiveSearchFast(_SS_BASE_K, _SS_INC_K, _SS_SIGMA)
    if code is not None:  # this part's colour image only, converted as the switch converts it
        ss.clearImages()
        ss.addImage(cv2.cvtColor(bgr, code))
    # this part's k only, made as the switch makes it: its sigma argument is a C float, so the
    # switch's segmentations smooth with float32(0.8) = 0.800000011920929, not the double 0.8
    # (which changed 11-19 of ~300 rectangles on 3% of digits images); min_size 100 as there
    ss.clearGraphSegmentations()
    ss.addGraphSegmentation(seg.createGraphSegmentation(sigma=float(np.float32(_SS_SIGMA)), k=k))
    rects = ss.process()
    return np.zeros((0, 4), np.int32) if rects is None or len(rects) == 0 else np.asarray(rects).reshape(-1, 4)


def _opencv_ss(rgb: np.ndarray, strategy: str, threads: int = 1) -> np.ndarray:
    """OpenCV selective search on an RGB uint8 image that is known to be safe; xyxy float32 [R, 4].

    The search runs as the independent parts of :func:`_ss_tasks` on ``threads`` threads; the
    rectangles are those of one ``process()`` call for any ``threads`` (``tests/test_proposals.py``
    compares them), deduplicated, in lexicographic order.
    """
    import cv2

    if not hasattr(cv2, "ximgproc"):
        raise ImportError("cv2.ximgproc is missing: install opencv-contrib-python-headless and "
                          "uninstall opencv-python, which shadows it (opencv_contrib#3147)")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # OpenCV wants BGR
    tasks = _ss_tasks(strategy)
    if threads <= 1:
        parts = [_ss_part(bgr, strategy, code, k) for code, k in tasks]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(tasks))) as pool:
            parts = list(pool.map(lambda t: _ss_part(bgr, strategy, *t), tasks))
    rects = np.unique(np.concatenate(parts), axis=0)  # (R, 4) int32 x, y, w, h: each rectangle once
    if len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    return _xywh_to_xyxy(rects)  # (R, 4)


def _safe_ss(rgb: np.ndarray, strategy: str, max_side: int, threads: int = 1) -> np.ndarray:
    """Selective search with downscaling and padding around OpenCV's limits; boxes of ``rgb``.

    Returns:
        ndarray float32 [R, 4]: xyxy in ``rgb``'s pixels, clipped to it, hash-ordered.
    """
    import cv2

    H, W = rgb.shape[:2]
    scale = min(1.0, max_side / max(H, W))
    img = rgb
    if scale < 1.0:
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        img = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    # pad to a shape OpenCV handles: each side >= MIN_SS_SIDE, aspect <= MAX_SS_ASPECT
    ph = max(h, MIN_SS_SIDE, math.ceil(w / MAX_SS_ASPECT))
    pw = max(w, MIN_SS_SIDE, math.ceil(h / MAX_SS_ASPECT))
    if (ph, pw) != (h, w):
        log.warning("selective search: image %dx%d padded to %dx%d (tiny image or aspect ratio "
                    "over %.1f); boxes are clipped back to the image", w, h, pw, ph, MAX_SS_ASPECT)
        img = cv2.copyMakeBorder(img, 0, ph - h, 0, pw - w, cv2.BORDER_REPLICATE)
    boxes = _opencv_ss(img, strategy, threads)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    if scale < 1.0:
        boxes[:, 0::2] *= W / w
        boxes[:, 1::2] *= H / h
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, W)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, H)
    return boxes[_hash_order(boxes)]


def grid_boxes(height: int, width: int, min_side: float = GRID_MIN, step: float = math.sqrt(2.0),
               stride: float = 0.5, aspect_ratios: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """Multi-scale sliding windows covering the image, in hash order (all scales mixed).

    For each side ``s = min_side * step**i`` up to the longer image side and each aspect ratio
    ``a = w / h``, windows of ``s*sqrt(a) x s/sqrt(a)`` (skipped when larger than the image) are
    placed on a grid with about ``stride * s`` spacing, spread evenly so the first and last windows
    touch the image borders. The windows are hash-ordered (see :func:`_hash_order`), so the first k
    are a spatially and scale-uniform sample.

    Args:
        height, width: image size in pixels.
        min_side: smallest window side (square windows) in pixels.
        step: ratio between consecutive sides.
        stride: spacing as a fraction of the side.
        aspect_ratios: width / height of the windows.
    Returns:
        ndarray float32 [R, 4]: xyxy, inside the image.
    """
    if step <= 1.0 or stride <= 0 or min_side <= 0:
        raise ValueError(f"grid_boxes: need step > 1, stride > 0, min_side > 0; got {step}, {stride}, {min_side}")
    per_scale = []
    s = float(min_side)
    while s <= max(height, width) * 1.0001:
        level = []
        for a in aspect_ratios:
            bw, bh = s * math.sqrt(a), s / math.sqrt(a)
            if bw > width + 1e-3 or bh > height + 1e-3:
                continue
            d = stride * s
            nx = int(math.ceil((width - bw) / d)) + 1
            ny = int(math.ceil((height - bh) / d)) + 1
            xs = np.linspace(0.0, width - bw, nx)
            ys = np.linspace(0.0, height - bh, ny)
            X, Y = np.meshgrid(xs, ys)  # (ny, nx)
            X, Y = X.ravel(), Y.ravel()  # (ny*nx,)
            level.append(np.stack([X, Y, X + bw, Y + bh], axis=1))  # (ny*nx, 4)
        if level:
            per_scale.append(np.concatenate(level).astype(np.float32))  # (r, 4)
        s *= step
    if not per_scale:
        return np.zeros((0, 4), np.float32)
    grid = np.concatenate(per_scale)  # (R, 4)
    return grid[_hash_order(grid)]


def selective_search(image: np.ndarray, mode: str = "fast+", min_size: float = 20,
                     max_boxes: int | None = None, *, max_side: int = MAX_SIDE,
                     ss_side: int = SS_SIDE, grid_min: float = GRID_MIN,
                     grid_stride: float = 0.5,
                     grid_aspect_ratios: tuple[float, ...] = (1.0,), threads: int = 1) -> np.ndarray:
    """Object proposals for one image (see the module docstring for modes and order).

    Args:
        image (ndarray [H, W], [H, W, 1|3|4]): RGB(A) or gray, uint8 / uint16 / float in [0, 1].
        mode: "fast+" (default), "fast" or "quality".
        min_size: boxes with a side under this many pixels (original image) are dropped.
        max_boxes: keep at most this many (after dedup); None or 0 = all.
        max_side: "fast"/"quality": selective search runs on a copy downscaled to this longer side
            when the image is larger (boxes mapped back).
        ss_side: "fast+": longer side of the selective-search copy (never upscaled).
        grid_min, grid_stride, grid_aspect_ratios: "fast+" grid (:func:`grid_boxes`).
        threads: threads that OpenCV's search is split over (its independent colour-image and
            segmentation parts, :func:`_ss_tasks`); the boxes are the same for any value.
    Returns:
        ndarray float32 [R, 4]: xyxy, 0-based continuous pixels of ``image``; deterministic.
    Raises:
        ValueError: unknown mode. ImageError: unusable image (message says why).
    """
    if mode not in MODES:
        raise ValueError(f"selective_search: unknown mode {mode!r} (choose from {MODES})")
    if not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"selective_search: threads must be a positive int, got {threads!r}")
    threads = int(threads)
    rgb = to_rgb_uint8(image)
    H, W = rgb.shape[:2]
    if min(H, W) < 2:
        raise ImageError(f"selective_search: image of {W}x{H} px is too small")
    if mode == "fast+":
        ss = _safe_ss(rgb, "fast", max_side=ss_side, threads=threads)
        grid = grid_boxes(H, W, min_side=max(grid_min, min_size), stride=grid_stride,
                          aspect_ratios=tuple(grid_aspect_ratios))
        boxes = np.concatenate([ss, grid])  # (R, 4)
    else:
        boxes = _safe_ss(rgb, mode, max_side=max_side, threads=threads)
    return _finish(boxes, min_size, max_boxes)


def edge_boxes(image: np.ndarray, model_path: str | Path, max_boxes: int = 2000,
               min_size: float = 20, alpha: float = 0.65, beta: float = 0.75) -> np.ndarray:
    """EdgeBoxes (Zitnick & Dollar 2014) through ``cv2.ximgproc``, highest score first.

    Args:
        image: as for :func:`selective_search`.
        model_path: the structured-edge model ``model.yml.gz`` (not shipped in the OpenCV wheel).
        max_boxes: boxes asked from EdgeBoxes (before the min_size filter).
        min_size: boxes with a side under this are dropped.
        alpha, beta: EdgeBoxes step size and NMS threshold (OpenCV defaults).
    Returns:
        ndarray float32 [R, 4]: xyxy, by descending EdgeBoxes score (deterministic).
    Raises:
        FileNotFoundError: the model file is missing (the message says where to get it).
    """
    import cv2

    p = Path(model_path) if model_path else None
    if p is None or not p.is_file():
        raise FileNotFoundError(
            f"EdgeBoxes needs the structured-edge model file, not found: {model_path!r}. Download "
            "model.yml.gz from opencv_extra (testdata/cv/ximgproc/model.yml.gz, "
            "https://github.com/opencv/opencv_extra/raw/4.x/testdata/cv/ximgproc/model.yml.gz) "
            "and pass its path (ProposalConfig.edge_model).")
    rgb = to_rgb_uint8(image)
    sed = cv2.ximgproc.createStructuredEdgeDetection(str(p))
    edges = sed.detectEdges(rgb.astype(np.float32) / 255.0)  # expects RGB float in [0, 1]
    orient = sed.computeOrientation(edges)
    edges = sed.edgesNms(edges, orient)
    eb = cv2.ximgproc.createEdgeBoxes()
    eb.setMaxBoxes(int(max_boxes))
    eb.setAlpha(alpha)
    eb.setBeta(beta)
    out = eb.getBoundingBoxes(edges, orient)
    rects, scores = out if isinstance(out, tuple) else (out, None)  # (boxes, scores) since contrib#2060
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    boxes = _xywh_to_xyxy(rects)  # (R, 4)
    if scores is not None and len(scores) == len(boxes):
        boxes = boxes[np.argsort(-np.asarray(scores).ravel(), kind="stable")]
    return _finish(boxes, min_size, None)


def propose(image: np.ndarray, method: str = "selective_search", *, threads: int = 1, **options) -> np.ndarray:
    """Proposals of one image by ``method``: the one entry point of training, testing and the
    library call, so each uses the method a model was trained with.

    Args:
        image: as for :func:`selective_search`.
        method: "selective_search" (``options``: its keyword arguments) or "edge_boxes"
            (``options``: ``model_path``, ``max_boxes``, ``min_size``).
        threads: selective search's threads (:func:`selective_search`; the boxes do not depend on
            it); EdgeBoxes ignores it.
    Returns:
        ndarray float32 [R, 4] xyxy.
    """
    if method == "selective_search":
        return selective_search(image, threads=threads, **options)
    if method == "edge_boxes":
        return edge_boxes(image, **options)
    raise ValueError(f"unknown proposal method {method!r}; expected one of {', '.join(METHODS)}")
