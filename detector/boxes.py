"""The one box-format module: every box in the project is xyxy, 0-based, continuous.

Shape shorthand (used across the project):
    R: proposals in one image      G: ground-truth boxes      N: detections
    K: foreground classes          S: image scales            C: conv5 channels

Convention
----------
A box is a float32 ``Tensor[..., 4]`` ``(x1, y1, x2, y2)`` in continuous pixel coordinates of the
original, unresized image, with the origin at the top-left *corner* of the top-left pixel. Pixel
``i`` (0-based) covers ``[i, i + 1)``. Width is ``x2 - x1`` with no ``+1`` (torchvision,
detectron2).

Pascal VOC stores 1-based *inclusive* pixel indices ``xmin..xmax``; pixel ``xmin`` (1-based) is the
continuous interval ``[xmin - 1, xmin)``, so the VOC box ``(xmin, ymin, xmax, ymax)`` is exactly the
continuous box ``(xmin - 1, ymin - 1, xmax, ymax)`` and its VOC width ``xmax - xmin + 1`` equals the
continuous width. :func:`voc_to_xyxy` and :func:`xyxy_to_voc` are that conversion and its inverse;
they are the only places where the VOC offset lives (``data/voc.py``, ``eval/voc_ap.py`` and
``proposals/store.py`` call them at the edges).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

__all__ = [
    "as_boxes",
    "box_area",
    "pairwise_iou",
    "clip_boxes",
    "hflip_boxes",
    "voc_to_xyxy",
    "xyxy_to_voc",
    "xywh_to_xyxy",
    "valid_boxes_mask",
]


def _as_tensor(boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(boxes, np.ndarray):
        boxes = torch.from_numpy(np.ascontiguousarray(boxes))
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(boxes.shape)}")
    return boxes


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes.

    Args:
        boxes (Tensor[..., 4]): xyxy, continuous pixels.
    Returns:
        Tensor[...]: ``(x2 - x1) * (y2 - y1)``; negative extents count as 0.
    """
    boxes = _as_tensor(boxes)
    w = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    h = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return w * h


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair (torchvision.ops.box_iou, continuous widths, no +1).

    Args:
        boxes1 (Tensor[R, 4]): xyxy.
        boxes2 (Tensor[G, 4]): xyxy.
    Returns:
        Tensor[R, G]: IoU in [0, 1]; empty inputs give an empty matrix.
    """
    boxes1 = _as_tensor(boxes1).float()
    boxes2 = _as_tensor(boxes2).float()
    if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    return box_iou(boxes1, boxes2)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip xyxy boxes to the image ``[0, width] x [0, height]``.

    Args:
        boxes (Tensor[..., 4]): xyxy.
        height, width: image size in pixels.
    Returns:
        Tensor[..., 4]: a new tensor.
    """
    boxes = _as_tensor(boxes).clone()
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    return boxes


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes of the horizontally mirrored image: ``x' = W - x`` with x1 and x2 swapped.

    (The same mapping as the spec's 1-based ``W + 1 - x``, written in continuous coordinates.)

    Args:
        boxes (Tensor[..., 4]): xyxy.
        width: image width in pixels.
    Returns:
        Tensor[..., 4]: xyxy in the flipped image.
    """
    boxes = _as_tensor(boxes)
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def voc_to_xyxy(voc_boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """EDGE: Pascal VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` -> project xyxy.

    Subtracts 1 from xmin and ymin only (the inclusive right edge already equals the continuous
    right edge). Float coordinates are kept as they are.

    Args:
        voc_boxes (Tensor[..., 4] or ndarray): VOC coordinates.
    Returns:
        Tensor[..., 4] float32: xyxy, continuous, 0-based.
    """
    b = _as_tensor(voc_boxes).to(torch.float32).clone()
    b[..., 0] -= 1.0
    b[..., 1] -= 1.0
    return b


def xyxy_to_voc(boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """EDGE: project xyxy -> Pascal VOC 1-based inclusive; the exact inverse of :func:`voc_to_xyxy`.

    Args:
        boxes (Tensor[..., 4]): xyxy.
    Returns:
        Tensor[..., 4] float64: VOC coordinates (float64 so written result files round-trip).
    """
    b = _as_tensor(boxes).to(torch.float64).clone()
    b[..., 0] += 1.0
    b[..., 1] += 1.0
    return b


def xywh_to_xyxy(boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(x, y, w, h)`` (OpenCV rects, COCO) -> xyxy.

    Args:
        boxes (Tensor[..., 4]): x, y of the top-left corner, width, height.
    Returns:
        Tensor[..., 4] float32: xyxy.
    """
    b = _as_tensor(boxes).to(torch.float32)
    return torch.cat([b[..., :2], b[..., :2] + b[..., 2:]], dim=-1)  # (..., 4)


def valid_boxes_mask(boxes: torch.Tensor) -> torch.Tensor:
    """True where a box has positive width and height and finite coordinates.

    Args:
        boxes (Tensor[R, 4]): xyxy.
    Returns:
        Tensor[R] bool.
    """
    boxes = _as_tensor(boxes)
    finite = torch.isfinite(boxes).all(dim=-1)
    return finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def as_boxes(boxes: Any, name: str = "boxes") -> torch.Tensor:
    """Boxes from a caller (Tensor on any device, array or nested list) as a CPU float32 Tensor[R, 4].

    Raises:
        ValueError: naming ``name``, when the shape is not [R, 4] (an empty input is [0, 4]) or a
            value is NaN or inf.
    """
    if isinstance(boxes, torch.Tensor):  # any device: a CUDA tensor cannot go through numpy
        t = boxes.detach().to("cpu", torch.float32)
    else:
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
    t = t.reshape(-1, 4) if t.numel() == 0 else t
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must be [R, 4] xyxy, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or inf")
    return t
