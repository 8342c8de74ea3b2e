"""Crop data sets for pre-training the trunk as a classifier (paper §3 on crops).

Shape shorthand (one alphabet for the whole project):
    G: ground-truth boxes of one image      K: foreground classes (background label = K)
    M: crops in a set                        S: stored crop side (224)

Two sources:

* a VOC-layout split (:func:`crops_from_records`): *object crops* are ground-truth boxes with a small
  random shift and a little context, labelled with the object's class; *background crops* are
  random boxes whose IoU with every ground-truth box (difficult ones included) is below 0.3,
  labelled K. Held-out sets take every non-difficult object exactly once, unjittered.
* an image-folder data set ``root/<class>/*.jpg`` (:func:`crops_from_folder`): each image is one
  crop of its folder's class (no background crops; the classifier's background output stays unused).

Every image is read once. Each crop is cut straight to S x S (:func:`cut_crops`: bilinear at the
exact continuous box when enlarging, area-averaged when shrinking) and kept as uint8 (150 KB per
crop at 224), in memory or, with ``store``, in a temporary file (``detector.data.crop_store``);
smaller training sizes are resized from it per batch. Held-out sets also keep each crop at its own
pixel size and aspect (``native``) for the own-size evaluation.

Boxes here are project boxes (float32 xyxy, 0-based continuous pixels of the original image).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from detector.boxes import clip_boxes, pairwise_iou
from detector.data.crop_store import CropStore

__all__ = [
    "CropSet",
    "sample_object_boxes",
    "sample_background_boxes",
    "cut_crops",
    "cut_native",
    "crops_from_records",
    "crops_from_folder",
    "IMAGE_EXTS",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff")


@dataclass
class CropSet:
    """A set of crops.

    Attributes:
        images (Tensor[M, S, S, 3] uint8, or a CropStore that indexes like one): RGB crops warped
            to S x S.
        labels (Tensor[M] int64): 0..K-1 foreground, K background.
        class_names: the K foreground names.
        image_ids: M source image ids.
        native: M uint8 RGB arrays [h, w, 3] at the crop's own size (held-out sets), or None.
        windows (Tensor[M, 4] float32 | None): with context crops (``crops_from_records(...,
            windows=True)``), each object's own box inside its S x S crop (xyxy in crop pixels;
            background crops: the whole crop); None = pool the whole crop.
    """

    images: Tensor | CropStore
    labels: Tensor
    class_names: tuple[str, ...]
    image_ids: list[str] = field(default_factory=list)
    native: list[np.ndarray] | None = None
    windows: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def size(self) -> int:
        """S, the stored side."""
        return int(self.images.shape[1])

    def counts(self) -> dict[str, int]:
        """Crops per class name (background as ``__background__``)."""
        names = list(self.class_names) + ["__background__"]
        bc = torch.bincount(self.labels, minlength=len(names)).tolist()
        return {n: int(c) for n, c in zip(names, bc) if c}


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def sample_object_boxes(
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    num: int,
    generator: torch.Generator,
    jitter: float = 0.1,
    context: float = 1.3,
    min_iou: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Jittered object crops: each is one ground-truth box, shifted and enlarged a little.

    The centre moves by up to ``jitter`` of the box side in x and y; width and height are each scaled
    by a factor in ``[1, context]`` (context around the object, as the paper's crops include some).
    A candidate is kept when its IoU with its own box is at least ``min_iou`` and larger than with
    any other box (so the label is right); the unjittered box fills in when too few survive.

    Args:
        gt_boxes (Tensor[G, 4]): xyxy of the objects to sample from (G >= 1).
        image_size: (H, W); crops are clipped to the image.
        num: crops to return.
        generator: the only source of randomness.
        jitter, context, min_iou: see above.
    Returns:
        (Tensor[num, 4] xyxy, Tensor[num] int64): crop boxes and the index of their object.
    """
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4 or gt_boxes.shape[0] == 0:
        raise ValueError(f"gt_boxes must be a non-empty Tensor[G, 4], got {tuple(gt_boxes.shape)}")
    H, W = image_size
    gt = gt_boxes.double()
    n_cand = 4 * num
    idx = torch.randint(gt.shape[0], (n_cand,), generator=generator)
    b = gt[idx]  # (4num, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + _uniform(n_cand, -jitter, jitter, generator) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + _uniform(n_cand, -jitter, jitter, generator) * h
    nw = w * _uniform(n_cand, 1.0, context, generator)
    nh = h * _uniform(n_cand, 1.0, context, generator)
    cand = torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], dim=1).float()  # (4num, 4)
    cand = clip_boxes(cand, H, W)
    iou = pairwise_iou(cand, gt_boxes.float())  # (4num, G)
    own = iou.gather(1, idx[:, None]).squeeze(1)  # (4num,)
    ok = (own >= min_iou) & (own >= iou.max(dim=1).values) & ((cand[:, 2] - cand[:, 0]) >= 1) & (
        (cand[:, 3] - cand[:, 1]) >= 1)
    keep = torch.nonzero(ok).flatten()[:num]
    boxes, which = cand[keep], idx[keep]
    if boxes.shape[0] < num:  # fall back to the exact boxes, cycling
        extra = torch.arange(num - boxes.shape[0]) % gt.shape[0]
        boxes = torch.cat([boxes, clip_boxes(gt_boxes[extra].float(), H, W)])  # (num, 4)
        which = torch.cat([which, extra])  # (num,)
    return boxes, which.long()


def sample_background_boxes(
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    num: int,
    generator: torch.Generator,
    max_iou: float = 0.3,
    min_side: float = 16.0,
    tries: int = 20,
) -> Tensor:
    """Random boxes with IoU < ``max_iou`` to every ground-truth box.

    Half of the candidates take the size of a random object times a factor in [0.5, 2] (background
    at the scale of the objects, the hard case for a detector); the other half a side log-uniform
    in ``[min_side, min(H, W)]``. Aspect ratio (h / w) is log-uniform in [0.5, 2], position uniform.

    Args:
        gt_boxes (Tensor[G, 4]): xyxy of every object (G may be 0).
        image_size: (H, W).
        num: boxes wanted.
        generator: the only source of randomness.
        max_iou: the IoU bound (exclusive).
        min_side: smallest side in pixels.
        tries: candidates drawn per wanted box.
    Returns:
        Tensor[n, 4] xyxy with n <= num (fewer only when the image is crowded with objects).
    """
    H, W = image_size
    if num <= 0:
        return torch.zeros((0, 4))
    short = float(min(H, W))
    lo = min(float(min_side), short)
    n = num * tries
    side = torch.exp(_uniform(n, math.log(lo), math.log(short), generator))  # (n,)
    G = gt_boxes.shape[0]
    if G > 0:
        pick = torch.randint(G, (n,), generator=generator)
        wh = (gt_boxes[pick, 2:] - gt_boxes[pick, :2]).double().clamp(min=1.0)  # (n, 2)
        gsz = wh.prod(dim=1).sqrt()  # (n,) geometric-mean side of the picked object
        like = gsz * _uniform(n, 0.5, 2.0, generator)
        half = torch.arange(n) % 2 == 0
        side = torch.where(half, like.clamp(lo, short), side)
    ratio = torch.exp(_uniform(n, math.log(0.5), math.log(2.0), generator))
    w = (side / ratio.sqrt()).clamp(1.0, float(W))
    h = (side * ratio.sqrt()).clamp(1.0, float(H))
    x1 = _uniform(n, 0.0, 1.0, generator) * (W - w)
    y1 = _uniform(n, 0.0, 1.0, generator) * (H - h)
    cand = torch.stack([x1, y1, x1 + w, y1 + h], dim=1).float()  # (n, 4)
    if G > 0:
        ok = pairwise_iou(cand, gt_boxes.float()).max(dim=1).values < max_iou
        cand = cand[ok]
    return cand[:num]


def cut_crops(image: np.ndarray, boxes: Tensor, size: int) -> Tensor:
    """Crop and warp boxes of one image to ``size`` x ``size``.

    Enlarging (box side <= size): ``cv2.warpAffine``, bilinear, at the exact continuous box (output
    pixel ``u`` samples the box at ``x1 + (u + 0.5) * w / size``, the pixel-corner convention).
    Shrinking (a side > size): the box rounded outwards to whole pixels, then ``cv2.resize`` with
    ``INTER_AREA`` (antialiased). ``torchvision.ops.roi_align`` computes the same bilinear samples but
    is about a hundred times slower on the CPU (BENCHMARKS.md, note after the classifier section).

    Args:
        image: uint8 RGB [H, W, 3].
        boxes (Tensor[n, 4]): xyxy, continuous pixels of ``image``.
        size: output side S.
    Returns:
        Tensor[n, S, S, 3] uint8.
    """
    out = np.empty((boxes.shape[0], size, size, 3), np.uint8)
    H, W = image.shape[:2]
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        sx, sy = max(x2 - x1, 1e-3) / size, max(y2 - y1, 1e-3) / size
        if sx <= 1.0 and sy <= 1.0:
            M = np.array([[sx, 0.0, x1 + sx / 2 - 0.5], [0.0, sy, y1 + sy / 2 - 0.5]], np.float64)
            out[i] = cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REPLICATE)
        else:
            a, b = int(math.floor(max(0.0, x1))), int(math.floor(max(0.0, y1)))
            c, d = int(math.ceil(min(float(W), x2))), int(math.ceil(min(float(H), y2)))
            region = image[b:max(d, b + 1), a:max(c, a + 1)]
            out[i] = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out)  # (n, S, S, 3)


def cut_native(image: np.ndarray, boxes: Tensor) -> list[np.ndarray]:
    """Crops at their own pixel size: the pixels covered by each box (rounded outwards), copied.

    Args:
        image: uint8 RGB [H, W, 3].
        boxes (Tensor[n, 4]): xyxy.
    Returns:
        n arrays uint8 [h, w, 3], each at least 1 x 1.
    """
    H, W = image.shape[:2]
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        a, b = int(math.floor(max(0.0, x1))), int(math.floor(max(0.0, y1)))
        c, d = int(math.ceil(min(float(W), x2))), int(math.ceil(min(float(H), y2)))
        out.append(image[b:max(d, b + 1), a:max(c, a + 1)].copy())
    return out


def crops_from_records(
    records: Sequence,
    class_names: Sequence[str],
    read_image: Callable[[Path], np.ndarray],
    size: int = 224,
    objects_per_image: int = 8,
    bg_per_image: int = 2,
    seed: int = 0,
    jitter: float = 0.1,
    context: float = 1.3,
    bg_max_iou: float = 0.3,
    heldout: bool = False,
    progress: bool = False,
    windows: bool = False,
    heldout_context: float = 1.0,
    store: str | Path | None = None,
) -> CropSet:
    """Object and background crops of a VOC-layout split, each image read once.

    Args:
        records: ``detector.data.voc.ImageRecord`` list (``path``, ``height``, ``width``, ``boxes``,
            ``labels``, ``difficult``).
        class_names: K foreground names (labels index into it; background = K).
        read_image: path -> uint8 RGB [H, W, 3] (``proposals.imageio.read_image``).
        size: stored side S.
        objects_per_image: jittered object crops per image (training sets).
        bg_per_image: background crops per image.
        seed: seeds one ``torch.Generator`` per image (``seed * 1_000_003 + index``), so a set is
            reproducible whatever the order images are processed in.
        jitter, context: object-crop jitter (:func:`sample_object_boxes`).
        bg_max_iou: background IoU bound (0.3).
        heldout: every non-difficult object exactly once, unjittered, and keep ``native`` crops.
        windows: record each object's box inside its crop (``CropSet.windows``) so a classifier
            can pool the object's own conv5 cells while its crop shows real context around it, as
            a detection window inside a whole image does.
        heldout_context: held-out object crops are the exact box enlarged by this factor about its
            centre (1.0 = the box itself); use > 1 with ``windows``.
        progress: tqdm bar.
        store: keep the S x S crops in a :class:`~detector.data.crop_store.CropStore` (a temporary
            file in this folder) instead of memory, so the set's memory does not grow with it.
    Returns:
        CropSet.
    """
    K = len(class_names)
    disk = CropStore(size, store) if store is not None else None
    imgs: list[Tensor] = []
    labels: list[Tensor] = []
    ids: list[str] = []
    native: list[np.ndarray] = []
    wins: list[Tensor] = []
    n_short_bg = 0
    it = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="crops", unit="img", leave=False)
    for i, rec in enumerate(it):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        keep = ~rec.difficult.bool()
        gt, gl = rec.boxes[keep], rec.labels[keep]
        if heldout:
            obj_boxes, obj_labels = clip_boxes(gt.float(), rec.height, rec.width), gl.long()
            obj_of = gt.float()
        elif gt.shape[0] > 0 and objects_per_image > 0:
            obj_boxes, which = sample_object_boxes(gt, (rec.height, rec.width), objects_per_image, g, jitter,
                                                   context)
            obj_labels = gl[which].long()
            obj_of = gt[which].float()
        else:
            obj_boxes, obj_labels = torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long)
            obj_of = torch.zeros((0, 4))
        bg = sample_background_boxes(rec.boxes, (rec.height, rec.width), bg_per_image, g, bg_max_iou)
        n_short_bg += bg_per_image - bg.shape[0]
        boxes = torch.cat([obj_boxes.float(), bg])  # (n, 4)
        if boxes.shape[0] == 0:
            continue
        image = read_image(rec.path)
        if image.shape[:2] != (rec.height, rec.width):
            raise ValueError(f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but the annotation says "
                             f"{rec.width}x{rec.height}")
        warp_boxes = boxes
        if heldout and obj_boxes.shape[0] and heldout_context != 1.0:
            ob = obj_boxes.float()
            c, half = (ob[:, :2] + ob[:, 2:]) / 2, (ob[:, 2:] - ob[:, :2]) * heldout_context / 2
            warp_boxes = torch.cat([clip_boxes(torch.cat([c - half, c + half], dim=1), rec.height, rec.width), bg])
        cut = cut_crops(image, warp_boxes, size)  # (n, S, S, 3)
        if disk is not None:
            disk.append(cut)
        else:
            imgs.append(cut)
        if windows:
            wb = warp_boxes[: obj_boxes.shape[0]]
            scale = size / (wb[:, 2:] - wb[:, :2]).clamp(min=1e-3).repeat(1, 2)  # (n_obj, 4)
            ow = ((obj_of - wb[:, :2].repeat(1, 2)) * scale).clamp(0.0, float(size))  # (n_obj, 4)
            full = torch.tensor([[0.0, 0.0, float(size), float(size)]]).expand(bg.shape[0], 4)
            wins.append(torch.cat([ow, full]))
        labels.append(torch.cat([obj_labels, torch.full((bg.shape[0],), K, dtype=torch.long)]))
        ids += [rec.image_id] * boxes.shape[0]
        if heldout:
            native += cut_native(image, boxes)
    if n_short_bg:
        log.info("%d background crops could not be placed (crowded images)", n_short_bg)
    if not labels:
        raise ValueError("no crops: the records have no objects and no room for background crops")
    return CropSet(
        images=disk if disk is not None else torch.cat(imgs),  # (M, S, S, 3)
        labels=torch.cat(labels),  # (M,)
        class_names=tuple(class_names),
        image_ids=ids,
        native=native if heldout else None,
        windows=torch.cat(wins).float() if windows else None,
    )


def crops_from_folder(
    root: str | Path,
    read_image: Callable[[Path], np.ndarray],
    size: int = 224,
    class_names: Sequence[str] | None = None,
    holdout_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[CropSet, CropSet]:
    """Whole images of ``root/<class>/*`` as crops, split into training and held-out sets.

    Args:
        root: folder of class folders.
        read_image: path -> uint8 RGB [H, W, 3].
        size: stored side S.
        class_names: class folder names in id order; None = every sub-folder, sorted.
        holdout_fraction: share of each class's images held out (at least one when a class has two).
        seed: the hold-out draw.
    Returns:
        (train, heldout) CropSets; held-out crops keep ``native`` images.
    Raises:
        FileNotFoundError / ValueError: missing folder, no classes, a class without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image-folder data set not found: {root}")
    names = tuple(class_names) if class_names else tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not names:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/*.jpg)")
    rng = np.random.default_rng(seed)
    parts: dict[bool, tuple[list, list, list, list]] = {False: ([], [], [], []), True: ([], [], [], [])}
    for k, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTS) if (
            root / name).is_dir() else []
        if not files:
            raise ValueError(f"{root / name}: no images ({', '.join(IMAGE_EXTS)})")
        n_hold = int(round(holdout_fraction * len(files)))
        if holdout_fraction > 0 and len(files) >= 2:
            n_hold = max(1, n_hold)
        held = set(rng.permutation(len(files))[:n_hold].tolist())
        for j, f in enumerate(files):
            image = read_image(f)
            h, w = image.shape[:2]
            box = torch.tensor([[0.0, 0.0, float(w), float(h)]])
            imgs, labels, ids, nat = parts[j in held]
            imgs.append(cut_crops(image, box, size))
            labels.append(k)
            ids.append(f"{name}/{f.name}")
            nat.append(image)

    def make(heldout: bool) -> CropSet:
        imgs, labels, ids, nat = parts[heldout]
        return CropSet(
            images=torch.cat(imgs) if imgs else torch.zeros((0, size, size, 3), dtype=torch.uint8),
            labels=torch.tensor(labels, dtype=torch.long),
            class_names=names,
            image_ids=ids,
            native=nat if heldout else None,
        )

    return make(False), make(True)
