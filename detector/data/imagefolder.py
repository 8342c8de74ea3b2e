"""ImageNet-layout classification data (``root/train/<class>/*.JPEG``, ``root/val/<class>/*``):
the paper's classifier training and its evaluation views (paper §3, Tables 1-4).

Shape shorthand:
    M: images of a split      N: images read at once      S: crop side (224)      L: resize side (256)

Files and labels come from torchvision's ``ImageFolder`` layout rules
(``torchvision.datasets.folder.find_classes`` / ``make_dataset``: class = sub-folder, sorted,
the usual image extensions). Images are decoded with OpenCV by a pool of worker threads (OpenCV
releases the GIL while it decodes and resizes, so N images are read in parallel without copying
them between processes).

Training (:class:`RandomCrops`): the image's shorter side resized to L = S * 256 / 224, then a
random S x S crop (AlexNet/ZF-5 training, paper §3.1); the training loop mirrors half of each batch
and resizes the 224 crop to 180 for the 180-size epochs of multi-size training (paper §3.2). The
crop of image i in epoch e is drawn from a generator seeded by (seed, e, i), so a run resumed at
an epoch boundary draws what an uninterrupted run draws. It indexes like the crop tensor of
:class:`~detector.data.crops.CropSet`, so the pre-training loop takes it unchanged.

Evaluation (:func:`evaluate_views`), the columns of the paper's tables: top-1 and top-5 error of
the centre S x S crop of the L-resized image (1 view), of the 4 corner and centre crops and their
mirrors with softmax averaged (10 views), and of the whole L-resized image through SPP (full
image, any aspect).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from detector.data.records import DataError

__all__ = ["is_imagenet_layout", "FolderSplit", "RandomCrops", "CentreCrops", "resize_side", "evaluate_views",
           "read_rgb"]


def is_imagenet_layout(root: str | Path) -> bool:
    """True when ``root`` has ``train/`` and ``val/`` folders of class folders."""
    root = Path(root)
    return all((root / s).is_dir() and any(p.is_dir() for p in (root / s).iterdir()) for s in ("train", "val"))


def resize_side(crop: int) -> int:
    """L: the shorter side images are resized to before an S x S crop (256 for 224)."""
    return int(round(crop * 256 / 224))


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3]; raises DataError naming an unreadable file."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DataError(f"{path}: not a readable image")
    return np.ascontiguousarray(img[:, :, ::-1])


def _resize_short(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = side / min(h, w)
    size = (max(side, int(round(w * s))), max(side, int(round(h * s))))  # cv2: (W, H)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


class FolderSplit:
    """One split of an ImageNet-layout folder: its files and labels.

    Args:
        folder: ``root/train`` or ``root/val``.
        classes: class names in id order (default: the sorted sub-folders of ``folder``); a split
            whose sub-folders are not these classes is refused.
    Raises:
        FileNotFoundError / DataError: a missing folder, other classes, no images (named).
    """

    def __init__(self, folder: str | Path, classes: Sequence[str] | None = None) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.folder}")
        found, _ = find_classes(str(self.folder))
        if classes is not None and list(found) != list(classes):
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DataError(f"{self.folder}: its class folders are not the classes asked for (data.classes, or "
                            f"the train split's for val): extra {extra[:5]}, missing {missing[:5]}")
        self.classes = tuple(classes or found)
        samples = make_dataset(str(self.folder), {c: i for i, c in enumerate(self.classes)},
                               extensions=IMG_EXTENSIONS)
        if not samples:
            raise DataError(f"{self.folder}: no images ({', '.join(IMG_EXTENSIONS)})")
        self.paths = [Path(p) for p, _ in samples]
        self.labels = torch.tensor([c for _, c in samples], dtype=torch.int64)  # (M,)

    def __len__(self) -> int:
        return len(self.paths)

    def ids(self) -> list[str]:
        """Each image as ``<class>/<file>`` (what keys a classifier trained on it)."""
        return [f"{p.parent.name}/{p.name}" for p in self.paths]


class _Crops:
    """Base of the crop views: index like ``Tensor[M, S, S, 3]`` uint8, decoded on demand."""

    def __init__(self, split: FolderSplit, size: int, workers: int = 4) -> None:
        self.split, self.size, self.workers = split, int(size), max(1, int(workers))
        self.resize = resize_side(self.size)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.split), self.size, self.size, 3)

    def crop(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int | slice | Tensor | np.ndarray | list) -> Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = np.arange(len(self.split))[index.numpy() if isinstance(index, Tensor) else index]  # (N,)
        out = np.empty((rows.shape[0], self.size, self.size, 3), dtype=np.uint8)  # (N, S, S, 3)
        if rows.shape[0]:
            with ThreadPoolExecutor(min(self.workers, rows.shape[0])) as pool:
                for j, c in enumerate(pool.map(self.crop, rows.tolist())):
                    out[j] = c
        return torch.from_numpy(out)


class RandomCrops(_Crops):
    """Training crops: shorter side to L, a random S x S crop seeded by (seed, epoch, image)."""

    def __init__(self, split: FolderSplit, size: int, seed: int, workers: int = 4) -> None:
        super().__init__(split, size, workers)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crops the next reads draw (the training loop calls it)."""
        self.epoch = int(epoch)

    def crop(self, i: int) -> np.ndarray:
        img = _resize_short(read_rgb(self.split.paths[i]), self.resize)
        h, w = img.shape[:2]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        y, x = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        return img[y:y + self.size, x:x + self.size]


class CentreCrops(_Crops):
    """Evaluation crops: shorter side to L, the centre S x S crop (the 1-view column)."""

    def crop(self, i: int) -> np.ndarray:
        return _views(_resize_short(read_rgb(self.split.paths[i]), self.resize), self.size)[4]


def _views(img: np.ndarray, size: int) -> list[np.ndarray]:
    """The 4 corner crops and the centre crop of an image (each [S, S, 3])."""
    h, w = img.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return [img[:size, :size], img[:size, w - size:], img[h - size:, :size], img[h - size:, w - size:],
            img[y0:y0 + size, x0:x0 + size]]


def _topk_errors(prob: Tensor, labels: Tensor) -> dict[str, float]:
    k = min(5, prob.shape[1])
    top = prob.topk(k, dim=1).indices  # (M, k)
    return {"top1": float((top[:, 0] != labels).float().mean()),
            "top5": float((~(top == labels[:, None]).any(dim=1)).float().mean())}


@torch.inference_mode()
def evaluate_views(model: torch.nn.Module, split: FolderSplit, size: int, device: str | torch.device = "cpu",
                   batch_size: int = 32, workers: int = 4, max_images: int = 0) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 error of an SPP classifier on ``split`` in the paper's three views.

    Only the K foreground logits count (the classifier's background output is dropped).

    Args:
        model: :class:`detector.classifier.SPPClassifier` (``input_format``, ``num_classes``).
        split: the validation split.
        size: S, the crop side (L = S * 256 / 224).
        max_images: evaluate the first this many images (0 = all).
    Returns:
        ``{"1 view": {...}, "10 views": {...}, "full image": {...}}``, each ``{"top1", "top5"}``
        (fractions), plus ``"n"`` (images).
    """
    from detector.pretrain import preprocess_crops

    model.eval().to(device)
    n = len(split) if not max_images else min(max_images, len(split))
    L = resize_side(size)
    K = model.num_classes
    fmt = model.input_format
    probs: dict[str, list[Tensor]] = {"1 view": [], "10 views": [], "full image": []}

    def load(i: int) -> np.ndarray:
        return _resize_short(read_rgb(split.paths[i]), L)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for lo in range(0, n, batch_size):
            imgs = list(pool.map(load, range(lo, min(n, lo + batch_size))))
            views = [_views(im, size) for im in imgs]
            centre = preprocess_crops([v[4] for v in views], fmt)  # (B, 3, S, S)
            ten = preprocess_crops([c for v in views for c in v], fmt)  # (5B, 3, S, S)
            ten = torch.cat([ten, ten.flip(-1)])  # (10B, 3, S, S): the mirrors
            p1 = model(centre.to(device))[:, :K].softmax(1).cpu()  # (B, K)
            p10 = model(ten.to(device))[:, :K].softmax(1).cpu()  # (10B, K)
            B = len(imgs)
            p10 = torch.cat([p10[:5 * B].view(B, 5, K), p10[5 * B:].view(B, 5, K)], dim=1).mean(1)  # (B, K)
            probs["1 view"].append(p1)
            probs["10 views"].append(p10)
            for im in imgs:  # the whole image at its own aspect, one at a time (any size, SPP)
                probs["full image"].append(model(preprocess_crops([im], fmt).to(device))[:, :K].softmax(1).cpu())
    labels = split.labels[:n]
    out: dict = {k: _topk_errors(torch.cat(v), labels) for k, v in probs.items()}
    out["n"] = n
    return out

