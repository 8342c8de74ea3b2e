"""Drawing one image of the embedded ``digits`` data set: real handwritten digits on a real photograph.

Shape shorthand (used across the project):
    G: ground-truth boxes in one image      K: foreground classes (here 10 digits)
    H x W: image size in pixels             h x w: one digit patch

Nothing is downloaded. Objects are the 1797 handwritten 8x8 digits bundled with scikit-learn
(``sklearn.datasets.load_digits``, UCI optical digits), upscaled with bicubic interpolation, sharpened by a
random contrast curve into an alpha mask, jittered (aspect, small rotation, colour, opacity) and alpha
composited onto random crops of the photographs bundled with scikit-image (``skimage.data``) and
scikit-learn (``load_sample_images``). The photographs in :data:`BACKGROUNDS` are all shipped inside the
wheels; :func:`load_backgrounds` fails with a clear message if one is missing rather than fetching it.

Boxes: each object's box is the tight box of its *visible* ink (alpha >= 0.5 and not covered by the ink
of a later object), as VOC annotates the visible extent. It is project xyxy (0-based, continuous);
:mod:`detector.data.digits_build` converts it at the XML edge.

Legibility: the ink colour is drawn until it lies at least ``min_color_distance`` (RGB) and
``min_luma_distance`` (luma) from the mean of the background under the digit's patch; placements that
would hide more than ``max_hidden`` of an earlier digit's ink, or overlap its box by more than
``max_box_overlap`` of the smaller box, are redrawn.

Every draw comes from the generator passed in, in a fixed order, so one generator state gives one
image. A change to what is drawn changes the data set's bytes: bump
``detector.data.digits_build.DATASET_VERSION`` with it. This module imports only numpy and OpenCV
(scikit-learn / scikit-image when loading the sources), so the build's spawned workers stay light.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

__all__ = [
    "DIGIT_CLASSES",
    "BACKGROUNDS",
    "DigitsParams",
    "load_backgrounds",
    "load_digit_images",
    "compose_image",
    "draw_image",
]

DIGIT_CLASSES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # foreground ids 0..9 = the digit value
# Photographs bundled with the installed wheels (checked to load with no network): skimage.data
# function names, plus "sklearn:<file>" for sklearn.datasets.load_sample_images. Excluded on purpose:
# text/page (printed characters), horse/logo/colorwheel/clock (synthetic), cat (= chelsea).
BACKGROUNDS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel", "coins", "moon",
    "immunohistochemistry", "hubble_deep_field", "retina", "cell", "stereo_motorcycle",
    "sklearn:china.jpg", "sklearn:flower.jpg",
)
_INK = 0.5  # alpha at or above which a pixel counts as ink (defines the box)
_UPSAMPLE = 8  # the 8x8 digit (padded to 12x12) is first upscaled to 96x96 with bicubic interpolation


@dataclass(frozen=True)
class DigitsParams:
    """Every knob of the generator, drawing and building alike (``seed``, the image counts and
    ``jpeg_quality`` are read by :mod:`detector.data.digits_build`); all of them, with the version,
    go into the stamp."""

    seed: int = 0
    n_trainval: int = 1000  # trainval images (train = first half, val = second half)
    n_test: int = 300
    image_side: tuple[int, int] = (320, 500)  # image height and width each uniform in this range, px
    object_side: tuple[float, float] = (16.0, 160.0)  # ink height, log-uniform, px (10x range; the issue: "about 16 to 160")
    objects_per_image: tuple[int, int] = (2, 8)  # target count uniform in this range (inclusive)
    max_rotation: float = 12.0  # degrees, uniform in [-max, max]
    aspect_jitter: float = 1.3  # width multiplier log-uniform in [1/a, a]
    max_hidden: float = 0.6  # placement rejected if it would hide more than this of an object's ink
    max_box_overlap: float = 0.5  # placement rejected if box intersection / smaller box area exceeds this
    difficult_side: float = 12.0  # visible box with longer side under this (px) -> difficult
    difficult_hidden: float = 0.5  # more than this fraction of the ink covered -> difficult
    min_color_distance: float = 140.0  # ink colour: RGB distance from the local background mean
    min_luma_distance: float = 60.0  # ink colour: luma (BT.601) difference from the local background mean
    opacity: tuple[float, float] = (0.85, 1.0)  # ink opacity uniform in this range (contrast jitter)
    jpeg_quality: int = 92  # fixed, so the bytes are reproducible


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_backgrounds() -> tuple[tuple[str, np.ndarray], ...]:
    """The bundled photographs as ``(name, uint8 RGB (H, W, 3))`` in :data:`BACKGROUNDS` order.

    Raises:
        RuntimeError: a photograph is not bundled with the installed scikit-image / scikit-learn
            (never downloaded).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    sk = None
    for name in BACKGROUNDS:
        try:
            if name.startswith("sklearn:"):
                if sk is None:
                    s = load_sample_images()
                    sk = {Path(f).name: im for f, im in zip(s.filenames, s.images)}
                img = sk[name.split(":", 1)[1]]
            elif name == "stereo_motorcycle":
                img = skimage.data.stereo_motorcycle()[0]
            else:
                img = getattr(skimage.data, name)()
        except Exception as e:  # missing attribute, pooch asking for a download, ...
            raise RuntimeError(
                f"background photograph '{name}' is not bundled with the installed scikit-image/"
                f"scikit-learn ({type(e).__name__}: {e}); the digits data set needs the bundled images"
            ) from None
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)  # (H, W, 3)
        img = np.ascontiguousarray(img[:, :, :3].astype(np.uint8))
        out.append((name, img))
    return tuple(out)


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits: images float32 (1797, 8, 8) in [0, 1], labels int64 (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _background_crop(rng: np.random.Generator, photos, height: int, width: int) -> tuple[str, np.ndarray]:
    """A random crop of a random photograph, resized to (height, width) and maybe mirrored."""
    name, src = photos[int(rng.integers(len(photos)))]
    sh, sw = src.shape[:2]
    aspect = width / height
    max_h = min(sh, sw / aspect)  # largest crop of the target aspect that fits
    frac = rng.uniform(0.35, 1.0)
    ch = max(8, int(round(max_h * frac)))
    cw = max(8, min(sw, int(round(ch * aspect))))
    y0 = int(rng.integers(0, sh - ch + 1))
    x0 = int(rng.integers(0, sw - cw + 1))
    crop = src[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if ch > height else cv2.INTER_LINEAR
    img = cv2.resize(crop, (width, height), interpolation=interp)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return name, np.ascontiguousarray(img)


def _digit_alpha(rng: np.random.Generator, digit: np.ndarray, side: float, p: DigitsParams) -> np.ndarray:
    """Alpha mask float32 (h, w) in [0, 1] of one digit whose ink is about ``side`` px tall.

    8x8 -> pad -> bicubic x8 -> random contrast curve (smoothstep) -> crop -> aspect/scale -> rotation.
    """
    src = np.pad(digit, 2)  # (12, 12)
    n = src.shape[0] * _UPSAMPLE
    up = cv2.resize(src, (n, n), interpolation=cv2.INTER_CUBIC)  # (96, 96)
    lo = rng.uniform(0.35, 0.6)  # contrast jitter: where the stroke edge sits and how soft it is
    soft = rng.uniform(0.05, 0.25)
    a = np.clip((up - lo) / soft, 0.0, 1.0)
    a = a * a * (3.0 - 2.0 * a)
    ys, xs = np.nonzero(a > 0.0)
    if len(ys) == 0:
        return np.zeros((1, 1), np.float32)
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    iy, ix = np.nonzero(a >= _INK)
    ink_h = (iy.max() - iy.min() + 1) if len(iy) else a.shape[0]
    scale_y = side / ink_h
    scale_x = scale_y * float(np.exp(rng.uniform(-1.0, 1.0) * np.log(p.aspect_jitter)))
    th = max(1, int(round(a.shape[0] * scale_y)))
    tw = max(1, int(round(a.shape[1] * scale_x)))
    interp = cv2.INTER_AREA if th < a.shape[0] else cv2.INTER_CUBIC
    a = np.clip(cv2.resize(a, (tw, th), interpolation=interp), 0.0, 1.0)
    angle = rng.uniform(-p.max_rotation, p.max_rotation)
    rad = np.deg2rad(angle)
    c, s = abs(np.cos(rad)), abs(np.sin(rad))
    ow = int(np.ceil(tw * c + th * s)) + 2
    oh = int(np.ceil(tw * s + th * c)) + 2
    m = cv2.getRotationMatrix2D(((tw - 1) / 2.0, (th - 1) / 2.0), angle, 1.0)
    m[0, 2] += (ow - tw) / 2.0
    m[1, 2] += (oh - th) / 2.0
    a = cv2.warpAffine(a, m, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def _ink_color(rng: np.random.Generator, mean: np.ndarray, p: DigitsParams) -> np.ndarray:
    """A random RGB colour far from the local background mean (float64 (3,))."""
    luma = np.array([0.299, 0.587, 0.114])
    cand = rng.integers(0, 256, size=(24, 3)).astype(np.float64)
    dist = np.linalg.norm(cand - mean, axis=1)
    dluma = np.abs((cand - mean) @ luma)
    ok = np.flatnonzero((dist >= p.min_color_distance) & (dluma >= p.min_luma_distance))
    if len(ok):
        return cand[ok[0]]
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], np.float64)
    score = np.linalg.norm(corners - mean, axis=1) + 2.0 * np.abs((corners - mean) @ luma)
    return corners[int(np.argmax(score))]


def _box_of(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box (0-based continuous, float64 (4,)) of the True pixels of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def compose_image(
    rng: np.random.Generator,
    background: np.ndarray,
    digit_images: np.ndarray,
    digit_labels: np.ndarray,
    pool: np.ndarray,
    params: DigitsParams,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Composite 2..8 digits from ``pool`` onto ``background``.

    Args:
        rng: the image's generator (consumed).
        background (ndarray[H, W, 3] uint8): RGB; not modified.
        digit_images (ndarray[M, 8, 8] float32): digits in [0, 1].
        digit_labels (ndarray[M] int64): their classes.
        pool (ndarray int64): indices of the digits this image may use.
        params: the generator's knobs.
    Returns:
        image (ndarray[H, W, 3] uint8): RGB.
        objects: one dict per object in paint order (bottom first): ``label`` (int), ``digit`` (index
        into the 1797), ``box`` (ndarray[4] float64 xyxy 0-based continuous, tight box of the visible
        ink), ``hidden`` (fraction of the ink covered by later objects), ``difficult`` (bool).
    """
    p = params
    img = background.astype(np.float32)
    H, W = img.shape[:2]
    target = int(rng.integers(p.objects_per_image[0], p.objects_per_image[1] + 1))
    lo, hi = np.log(p.object_side[0]), np.log(p.object_side[1])
    inks: list[np.ndarray] = []  # full-image bool masks of each object's ink
    covered: list[np.ndarray] = []  # full-image bool: ink of object i covered by later objects
    ink_total: list[int] = []
    hidden_px: list[int] = []  # covered ink pixels of object i so far
    boxes: list[np.ndarray] = []
    digits: list[int] = []
    for k in range(target):
        must = k < p.objects_per_image[0]  # the minimum count is guaranteed: shrink until it fits
        digit = int(pool[int(rng.integers(len(pool)))])
        side = float(np.exp(rng.uniform(lo, hi)))
        placed = False
        for shrink in range(12 if must else 3):
            alpha = _digit_alpha(rng, digit_images[digit], side, p)
            ah, aw = alpha.shape
            ink = alpha >= _INK
            if ah > H or aw > W or not ink.any():
                side *= 0.8
                continue
            ink_box = _box_of(ink)
            for _ in range(25):
                y0 = int(rng.integers(0, H - ah + 1))
                x0 = int(rng.integers(0, W - aw + 1))
                box = ink_box + np.array([x0, y0, x0, y0], np.float64)
                if not _box_overlap_ok(box, boxes, p.max_box_overlap):
                    continue
                region = (slice(y0, y0 + ah), slice(x0, x0 + aw))
                if not all(
                    (hidden_px[i] + (inks[i][region] & ~covered[i][region] & ink).sum()) <= p.max_hidden * ink_total[i]
                    for i in range(len(inks))
                    if _overlaps(boxes[i], box)
                ):
                    continue
                placed = True
                break
            if placed:
                break
            side *= 0.8
        if not placed:
            continue
        full_ink = np.zeros((H, W), bool)
        full_ink[region] = ink
        for i in range(len(inks)):
            newly = inks[i][region] & ~covered[i][region] & ink
            hidden_px[i] += int(newly.sum())
            covered[i][region] |= newly
        mean = img[region].reshape(-1, 3).mean(axis=0)  # local background (earlier digits included)
        color = _ink_color(rng, mean, p)
        a = (alpha * rng.uniform(*p.opacity))[:, :, None]  # (h, w, 1) opacity jitter
        img[region] = img[region] * (1.0 - a) + color[None, None, :] * a
        inks.append(full_ink)
        covered.append(np.zeros((H, W), bool))
        ink_total.append(int(ink.sum()))
        hidden_px.append(0)
        boxes.append(box)
        digits.append(digit)
    objects = []
    for i in range(len(inks)):
        visible = inks[i] & ~covered[i]
        hidden = 1.0 - visible.sum() / ink_total[i]
        vbox = _box_of(visible)
        longer = max(vbox[2] - vbox[0], vbox[3] - vbox[1])
        objects.append(
            {
                "label": int(digit_labels[digits[i]]),
                "digit": digits[i],
                "box": vbox,
                "hidden": float(hidden),
                "difficult": bool(longer < p.difficult_side or hidden > p.difficult_hidden),
            }
        )
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, objects


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _box_overlap_ok(box: np.ndarray, others: list[np.ndarray], limit: float) -> bool:
    """Intersection over the smaller box's area stays at most ``limit`` against every other box."""
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw <= 0 or ih <= 0:
            continue
        small = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
        if iw * ih > limit * small:
            return False
    return True


def draw_image(
    rng: np.random.Generator,
    photos: Sequence[tuple[str, np.ndarray]],
    digit_images: np.ndarray,
    digit_labels: np.ndarray,
    pool: np.ndarray,
    params: DigitsParams,
) -> tuple[str, np.ndarray, list[dict[str, Any]]]:
    """One whole image: its size, a background crop, then :func:`compose_image` on it.

    Args:
        rng: the image's generator (consumed: the height, the width, the crop, the digits).
        photos: ``(name, uint8 RGB (H, W, 3))`` pairs to crop from (:func:`load_backgrounds`).
        digit_images, digit_labels, pool, params: as :func:`compose_image`; the height and width
            are each uniform in ``params.image_side``.
    Returns:
        (background name, image ndarray[H, W, 3] uint8 RGB, objects as :func:`compose_image`).
    """
    p = params
    h = int(rng.integers(p.image_side[0], p.image_side[1] + 1))
    w = int(rng.integers(p.image_side[0], p.image_side[1] + 1))
    bg_name, bg = _background_crop(rng, photos, h, w)
    img, objects = compose_image(rng, bg, digit_images, digit_labels, pool, p)
    return bg_name, img, objects
