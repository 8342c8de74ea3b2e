"""Inputs of the timing benchmarks (tools/compare_rcnn.py, tools/benchmark.py): VOC-sized real
photos and ~2000 proposals per image.

Shape shorthand: R proposals in one image.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

from detector.bench.random_model import random_boxes

log = logging.getLogger(__name__)

VOC_SIZE = (375, 500)  # (H, W): the most common Pascal VOC 2007 image size (landscape)


def voc_sized_photos(n: int, size: tuple[int, int] = VOC_SIZE) -> list[tuple[str, np.ndarray]]:
    """``n`` real photos bundled with scikit-image / scikit-learn, resized to ``size`` (H, W).

    Returns:
        list of (name, uint8 RGB [H, W, 3]); photos repeat when ``n`` exceeds the 7 available.
    """
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    sources = [("coffee", skd.coffee), ("chelsea", skd.chelsea), ("rocket", skd.rocket),
               ("astronaut", skd.astronaut), ("motorcycle", lambda: skd.stereo_motorcycle()[0])]
    photos = []
    for name, fn in sources:
        try:
            photos.append((name, fn()))
        except Exception as e:  # noqa: BLE001 - a photo that needs a download is skipped
            log.warning("skipping skimage photo %s (%s)", name, type(e).__name__)
    sk = load_sample_images()
    photos += [(f"sklearn_{f.rsplit('/', 1)[-1].split('.')[0]}", im) for f, im in zip(sk.filenames, sk.images)]
    h, w = size
    out = []
    for i in range(n):
        name, im = photos[i % len(photos)]
        out.append((name, cv2.resize(np.ascontiguousarray(im[:, :, :3]), (w, h), interpolation=cv2.INTER_AREA)))
    return out


def proposals_for(image: np.ndarray, n: int = 2000, mode: str = "fast", seed: int = 0) -> tuple[torch.Tensor, int]:
    """About ``n`` proposals: selective search on the image, padded with random boxes up to ``n``.

    Args:
        image: uint8 RGB [H, W, 3].
        n: proposals wanted (the paper's ~2000); extra selective-search boxes are cut (they are
            ranked, the first kept).
        mode: selective search mode of ``proposals.selective_search``.
    Returns:
        (Tensor[n, 4] xyxy, number of them that came from selective search). When the proposals
        package has no ``selective_search`` yet, all boxes are random (logged).
    """
    h, w = image.shape[:2]
    try:
        from proposals import selective_search

        ss = torch.as_tensor(np.asarray(selective_search(image, mode=mode), dtype=np.float32)).reshape(-1, 4)
    except ImportError as e:
        log.warning("proposals.selective_search unavailable (%s); using %d random boxes", e, n)
        ss = torch.zeros((0, 4))
    ss = ss[:n]
    k = ss.shape[0]
    if k < n:
        pad = random_boxes(h, w, n - k, torch.Generator().manual_seed(seed))  # (n - k, 4)
        ss = torch.cat([ss, pad], dim=0)  # (n, 4)
    return ss, k
