"""The embedded default data set ``digits``: real handwritten digits on real photographs, VOC 2007 layout.

Shape shorthand (used across the project):
    G: ground-truth boxes in one image      K: foreground classes (here 10 digits)
    H x W: image size in pixels             h x w: one digit patch

Nothing is downloaded. Objects are the 1797 handwritten 8x8 digits bundled with scikit-learn
(``sklearn.datasets.load_digits``, UCI optical digits), upscaled with bicubic interpolation, sharpened by a
random contrast curve into an alpha mask, jittered (aspect, small rotation, colour, opacity) and alpha
composited onto random crops of the photographs bundled with scikit-image (``skimage.data``) and
scikit-learn (``load_sample_images``). The photographs in :data:`BACKGROUNDS` are all shipped inside the
wheels; :func:`load_backgrounds` fails with a clear message if one is missing rather than fetching it.

Layout written under ``out`` (exactly as Pascal VOC 2007)::

    Annotations/<id>.xml         size, objects (name, pose, truncated, difficult, bndbox 1-based inclusive)
    JPEGImages/<id>.jpg          fixed JPEG quality
    ImageSets/Main/{trainval,train,val,test}.txt
    ImageSets/Main/<class>_<split>.txt   "<id> <flag>", flag 1 / -1 / 0 (only difficult instances)
    .complete.json               stamp: version + parameters + summary; written last

Boxes: each object's box is the tight box of its *visible* ink (alpha >= 0.5 and not covered by the ink
of a later object), as VOC annotates the visible extent. Internally it is project xyxy (0-based,
continuous); :func:`detector.boxes.xyxy_to_voc` converts at the XML edge.

Determinism: every image draws from its own ``numpy.random.Generator`` seeded with
``(seed, split, index)``, so the output is byte-identical for a seed whatever the number of worker
processes (workers are spawned, never forked, and write only their own JPEG; the parent writes every
XML and list). The bytes also depend on the OpenCV / libjpeg build and the bundled photographs, whose
versions the stamp records under ``environment``. The 1797 digits are split first (stratified by class)
into disjoint train / val / test pools; trainval images use only train+val digits and test images only
test digits.

Legibility: the ink colour is drawn until it lies at least ``min_color_distance`` (RGB) and
``min_luma_distance`` (luma) from the mean of the background under the digit's patch; placements that
would hide more than ``max_hidden`` of an earlier digit's ink, or overlap its box by more than
``max_box_overlap`` of the smaller box, are redrawn.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

__all__ = [
    "DIGIT_CLASSES",
    "BACKGROUNDS",
    "DATASET_VERSION",
    "STAMP_NAME",
    "DigitsParams",
    "DatasetExistsError",
    "make_digits_dataset",
    "load_backgrounds",
    "split_digit_pools",
    "compose_image",
]

log = logging.getLogger(__name__)

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
DATASET_VERSION = 1  # bump when the rendering changes: a stamp with another version is not "already built"
STAMP_NAME = ".complete.json"
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_LAYOUT = {"Annotations", "JPEGImages", "ImageSets", STAMP_NAME}
_INK = 0.5  # alpha at or above which a pixel counts as ink (defines the box)
_UPSAMPLE = 8  # the 8x8 digit (padded to 12x12) is first upscaled to 96x96 with bicubic interpolation


@dataclass(frozen=True)
class DigitsParams:
    """Every knob of the generator; all of them (with the version) go into the stamp."""

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


class DatasetExistsError(RuntimeError):
    """``out`` holds something other than this exact data set and ``force`` was not given."""


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
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits: images float32 (1797, 8, 8) in [0, 1], labels int64 (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_digit_pools(labels: np.ndarray, weights: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split digit indices into disjoint pools, stratified by class, sizes proportional to ``weights``.

    Every pool with a positive weight gets at least one digit of each class.

    Args:
        labels (ndarray[M] int64): class of each digit.
        weights: one non-negative weight per pool (e.g. its number of images).
        seed: the data set seed.
    Returns:
        list of sorted int64 index arrays, one per pool, disjoint, together covering ``labels``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"pool weights must be non-negative with a positive sum, got {list(weights)}")
    rng = np.random.default_rng([seed, 0xD1617])
    pools: list[list[np.ndarray]] = [[] for _ in w]
    used = np.flatnonzero(w > 0)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(used):
            raise ValueError(f"class {c} has {len(idx)} digits, fewer than {len(used)} pools")
        # largest remainder on what is left after one digit per used pool
        counts = np.zeros(len(w), dtype=np.int64)
        counts[used] = 1
        rest = len(idx) - len(used)
        share = w / w.sum() * rest
        counts += np.floor(share).astype(np.int64)
        left = len(idx) - counts.sum()
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        counts[order[:left]] += 1
        starts = np.concatenate([[0], np.cumsum(counts)])
        for p in range(len(w)):
            pools[p].append(idx[starts[p]:starts[p + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pools]


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


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _xml(image_id: str, height: int, width: int, background: str, objects: list[dict]) -> str:
    """VOC 2007 annotation text; boxes go through the one xyxy -> VOC edge."""
    lines = [
        "<annotation>",
        "\t<folder>digits</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>digits (sklearn UCI handwritten digits on scikit-image/scikit-learn photos)</database>",
        "\t\t<annotation>detector.digits</annotation>",
        f"\t\t<image>{background}</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    if objects:
        from detector.boxes import xyxy_to_voc  # lazy: torch is not needed to check a stamp

        voc = xyxy_to_voc(np.stack([o["box"] for o in objects])).numpy()  # (G, 4) 1-based inclusive
    for o, b in zip(objects, voc if objects else []):
        xmin, ymin, xmax, ymax = (int(round(v)) for v in b)
        lines += [
            "\t<object>",
            f"\t\t<name>{DIGIT_CLASSES[o['label']]}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{int(o['difficult'])}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_WORKER: dict[str, Any] = {}  # sources handed to spawned workers by _init_worker


def _init_worker(images: np.ndarray, labels: np.ndarray, photos: tuple) -> None:
    """Spawned worker: receive the digits and photographs (no sklearn/skimage/torch import there)."""
    cv2.setNumThreads(1)
    _WORKER.update(images=images, labels=labels, photos=photos)


def _render_task(task: tuple) -> dict:
    """Render one image and write its JPEG (runs in a worker); returns its size and objects (xyxy)."""
    root, image_id, split, index, pool, params = task
    p: DigitsParams = params
    rng = np.random.default_rng([p.seed, _SPLIT_CODES[split], index])
    if _WORKER:
        photos, images, labels = _WORKER["photos"], _WORKER["images"], _WORKER["labels"]
    else:
        photos = load_backgrounds()
        images, labels = _load_digits()
    h = int(rng.integers(p.image_side[0], p.image_side[1] + 1))
    w = int(rng.integers(p.image_side[0], p.image_side[1] + 1))
    bg_name, bg = _background_crop(rng, photos, h, w)
    img, objects = compose_image(rng, bg, images, labels, pool, p)
    ok, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {image_id}.jpg")
    (Path(root) / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg.tobytes())
    return {
        "id": image_id,
        "split": split,
        "height": h,
        "width": w,
        "background": bg_name,
        "objects": [
            {"label": o["label"], "digit": o["digit"], "difficult": o["difficult"],
             "box": [float(v) for v in o["box"]]}
            for o in objects
        ],
    }


def _params_key(p: DigitsParams) -> dict:
    d = dataclasses.asdict(p)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _looks_like_dataset(path: Path) -> bool:
    return path.is_dir() and all(c.name in _LAYOUT for c in path.iterdir())


def _clean_stale_partials(out: Path) -> None:
    """Remove ``.<name>.partial-<pid>`` folders left by runs that were killed (their pid is gone)."""
    for d in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # that run is still going
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def make_digits_dataset(
    out: str | Path,
    seed: int = 0,
    n_trainval: int = 1000,
    n_test: int = 300,
    *,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
    params: DigitsParams | None = None,
) -> dict:
    """Build the ``digits`` data set in VOC 2007 layout under ``out`` (idempotent, atomic).

    The data set is rendered into a sibling temp folder and moved into place with ``os.replace`` only
    when complete, together with the stamp ``out/.complete.json``; an interrupted run leaves no ``out``
    that could be mistaken for a finished one.

    Args:
        out: destination folder.
        seed, n_trainval, n_test: data set seed and image counts (override ``params``' fields).
        workers: processes used for rendering (the output does not depend on it).
        force: rebuild even if ``out`` holds a data set made with other parameters (only a folder that
            holds nothing but the VOC layout is ever deleted).
        progress: show a tqdm bar.
        params: every other knob (defaults: :class:`DigitsParams`).
    Returns:
        summary dict: ``out``, ``skipped`` (True when already built), ``seconds``, ``params``,
        ``images`` / ``objects`` / ``difficult`` per split, ``per_class`` object counts,
        ``object_side_px`` (min/max of the visible boxes' longer side), ``image_side_px``.
    Raises:
        DatasetExistsError: ``out`` holds something else (other parameters without ``force``, or
            files that are not a VOC layout).
        ValueError: bad counts.
    """
    t0 = time.perf_counter()
    p = dataclasses.replace(params or DigitsParams(), seed=int(seed), n_trainval=int(n_trainval), n_test=int(n_test))
    if p.n_trainval < 2 or p.n_test < 1:
        raise ValueError(f"need n_trainval >= 2 and n_test >= 1, got {p.n_trainval} and {p.n_test}")
    if not (1 <= p.objects_per_image[0] <= p.objects_per_image[1]):
        raise ValueError(f"objects_per_image must be 1 <= lo <= hi, got {p.objects_per_image}")
    out = Path(out)
    stamp_path = out / STAMP_NAME
    want = {"version": DATASET_VERSION, "params": _params_key(p)}
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, json.JSONDecodeError):
            stamp = {}
        have = {"version": stamp.get("version"), "params": stamp.get("params")}
        if have == want:
            summary = dict(stamp.get("summary", {}))
            summary.update(skipped=True, seconds=round(time.perf_counter() - t0, 3), out=str(out))
            log.info("%s: already built (seed %d, %d trainval, %d test); nothing to do",
                     out, p.seed, p.n_trainval, p.n_test)
            return summary
        if not force:
            diff = {k: (have["params"].get(k) if isinstance(have["params"], dict) else None, v)
                    for k, v in want["params"].items()
                    if not isinstance(have["params"], dict) or have["params"].get(k) != v}
            if have["version"] != want["version"]:
                diff["version"] = (have["version"], want["version"])
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *ab) for k, ab in diff.items()))
            raise DatasetExistsError(
                f"{out} already holds a digits data set built with other parameters ({changes}); "
                f"pass --force (force=True) to rebuild it or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise DatasetExistsError(
                f"{out} exists and is not a finished digits data set (no {STAMP_NAME}); "
                "pass --force (force=True) to replace it or choose another --out"
            )
    if out.exists() and not _looks_like_dataset(out):
        raise DatasetExistsError(
            f"{out} holds files other than a VOC layout (Annotations/, JPEGImages/, ImageSets/); "
            "refusing to replace it: remove it yourself or choose another --out"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    try:
        summary = _build(tmp, p, workers, progress)
        summary["params"] = _params_key(p)
        stamp = {"version": DATASET_VERSION, "params": _params_key(p), "summary": summary,
                 "environment": _environment()}
        _atomic_write(tmp / STAMP_NAME, (json.dumps(stamp, indent=1) + "\n").encode())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = dict(summary)
    summary.update(skipped=False, seconds=round(time.perf_counter() - t0, 3), out=str(out))
    return summary


def _environment() -> dict:
    import sklearn
    import skimage

    return {"numpy": np.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__,
            "scikit-image": skimage.__version__}


def _build(root: Path, p: DigitsParams, workers: int, progress: bool) -> dict:
    images, labels = _load_digits()
    photos = load_backgrounds()
    n_train = p.n_trainval // 2
    n_val = p.n_trainval - n_train
    counts = {"train": n_train, "val": n_val, "test": p.n_test}
    pools = dict(zip(counts, split_digit_pools(labels, list(counts.values()), p.seed)))
    tasks = []
    next_id = 1
    for split, n in counts.items():
        for i in range(n):
            tasks.append((str(root), f"{next_id:06d}", split, i, pools[split], p))
            next_id += 1

    results: list[dict]
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process whose OpenCV / OpenMP threads hold locks can deadlock
        # the children (seen here under pytest). Workers get the sources as arrays.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(images, labels, photos)) as ex:
            it = ex.map(_render_task, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
            results = list(_maybe_tqdm(it, len(tasks), progress))
    else:
        results = [_render_task(t) for t in _maybe_tqdm(tasks, len(tasks), progress)]

    for r in results:  # XML in the parent: the xyxy -> VOC edge (detector.boxes, torch) runs here only
        objs = [{**o, "box": np.asarray(o["box"], np.float64)} for o in r["objects"]]
        xml = _xml(r["id"], r["height"], r["width"], r["background"], objs)
        (root / "Annotations" / f"{r['id']}.xml").write_text(xml)
    split_ids = {s: [r["id"] for r in results if r["split"] == s] for s in counts}
    split_ids["trainval"] = sorted(split_ids["train"] + split_ids["val"])
    main = root / "ImageSets" / "Main"
    for split in ("trainval", "train", "val", "test"):
        ids = split_ids[split]
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        by_id = {r["id"]: r for r in results}
        for k, name in enumerate(DIGIT_CLASSES):
            lines = []
            for i in ids:
                objs = [o for o in by_id[i]["objects"] if o["label"] == k]
                flag = 1 if any(not o["difficult"] for o in objs) else (0 if objs else -1)
                lines.append(f"{i} {flag:2d}\n")  # VOC devkit writes '%s %2d'
            (main / f"{name}_{split}.txt").write_text("".join(lines))
    return _summarize(results, split_ids)


def _maybe_tqdm(it, total: int, progress: bool):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="digits", unit="img")


def _summarize(results: list[dict], split_ids: dict[str, list[str]]) -> dict:
    by_id = {r["id"]: r for r in results}
    s: dict[str, Any] = {"images": {}, "objects": {}, "difficult": {}}
    for split in ("trainval", "train", "val", "test"):
        objs = [o for i in split_ids[split] for o in by_id[i]["objects"]]
        s["images"][split] = len(split_ids[split])
        s["objects"][split] = len(objs)
        s["difficult"][split] = sum(o["difficult"] for o in objs)
    all_objs = [o for r in results for o in r["objects"]]
    s["per_class"] = {name: sum(o["label"] == k for o in all_objs) for k, name in enumerate(DIGIT_CLASSES)}
    longer = [max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) for o in all_objs]
    s["object_side_px"] = {"min": min(longer), "max": max(longer)}
    per_image = [len(r["objects"]) for r in results]
    s["objects_per_image"] = {"min": min(per_image), "max": max(per_image)}
    sides = [v for r in results for v in (r["height"], r["width"])]
    s["image_side_px"] = {"min": min(sides), "max": max(sides)}
    tv = {o["digit"] for i in split_ids["trainval"] for o in by_id[i]["objects"]}
    te = {o["digit"] for i in split_ids["test"] for o in by_id[i]["objects"]}
    s["distinct_digits"] = {"trainval": len(tv), "test": len(te), "shared": len(tv & te)}
    h = hashlib.sha256()
    for r in sorted(results, key=lambda r: r["id"]):
        h.update(json.dumps(r, sort_keys=True).encode())
    s["annotation_sha256"] = h.hexdigest()
    return s
