"""Which scale sees each box, and which conv5 cells the box covers there (spec §5 and §3).

Shape shorthand (one alphabet for the whole project):
    R: proposals in one image      S: image scales      Hs x Ws: conv5 size at scale s

The spec is written in 1-based inclusive VOC pixels; the project's boxes are continuous 0-based
xyxy (``detector.boxes``). Pixel ``i`` (0-based) covers ``[i, i + 1)``, so the VOC box
``(x1_voc, .., x2_voc)`` of a project box ``(x1, .., x2)`` has ``x1_voc = x1 + 1`` and
``x2_voc = x2``; in 0-based pixel *indices* the first covered pixel is ``x1`` and the last is
``x2 - 1``. Every formula below is the spec's, rewritten with those substitutions (derivation in
:func:`project_boxes`); ``windows`` come out as int64 inclusive 0-based conv5 cells.

The public functions check their arguments and call :func:`scale_choice` / :func:`project_windows`,
the arithmetic alone in TorchScript's subset, which the exported program (``detector.export``)
calls too.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["select_scales", "project_boxes", "scale_choice", "project_windows"]



def _check_boxes(boxes: Tensor, where: str) -> Tensor:
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{where}: boxes must be Tensor[R, 4] xyxy, got {shape}")
    return boxes.detach().to(device="cpu", dtype=torch.float64)


def _scale_tensor(scale_sizes: Sequence[int] | Tensor, where: str) -> Tensor:
    sizes = torch.as_tensor(list(scale_sizes) if not isinstance(scale_sizes, Tensor) else scale_sizes,
                            dtype=torch.float64).flatten()
    if sizes.numel() == 0 or bool((sizes <= 0).any()):
        raise ValueError(f"{where}: scale_sizes must be a non-empty list of positive sides, got "
                         f"{sizes.tolist()}")
    return sizes


def _nearest(values: Tensor, targets: Tensor) -> Tensor:
    """Index of the entry of ``values`` [S] nearest to each target [R]; ties -> the smaller value."""
    order = torch.argsort(values, stable=True)  # ascending, so argmin's first hit is the smaller
    diff = (values[order].unsqueeze(0) - targets.unsqueeze(1)).abs()  # (R, S)
    return order[diff.argmin(dim=1)]  # (R,)


def select_scales(boxes: Tensor, image_size: tuple[int, int], scale_sizes: Sequence[int] | Tensor,
                  target_side: float) -> Tensor:
    """Per-box scale choice of the released code (spec §5).

    ``s* = round(208 * S_min / sqrt(area))`` with ``S_min`` the image's shorter side and ``area``
    the VOC area ``(x2_voc - x1_voc + 1)(y2_voc - y1_voc + 1)``, which equals the continuous
    ``(x2 - x1)(y2 - y1)``; the scale with the smallest ``|s - s*|`` wins, ties going to the smaller
    scale (the code takes the first of its ascending list). Rounding is half up (MATLAB ``round`` on
    positive numbers). Degenerate boxes (zero area) get the largest scale.

    The paper states another rule, the scale whose scaled box area is nearest 224² [P1 §4.1]; this
    follows the released code (the two differ: a 100x100 box at S_min 375 with scales 480, 576, 688,
    864, 1200 gets 688 here, 864 by the paper's rule).

    Args:
        boxes (Tensor[R, 4]): xyxy, original-image pixels.
        image_size: (height, width) of the original image.
        scale_sizes: the resized shorter side of each scale, as actually used (e.g. 480, 576, 688,
            864, 1200; smaller where a max-size cap applied).
        target_side: the window side aimed at (spec §5: sz_conv_standard 13 x step_standard 16 = 208;
            config ``features.target_side``).
    Returns:
        Tensor[R] int64: index into ``scale_sizes``.

    Examples (S_min = 375, scales 480..1200): 100x100 -> s* 780 -> 688; 200x150 -> 450 -> 480;
    31x31 -> 2516 -> 1200.
    """
    b = _check_boxes(boxes, "select_scales")
    sizes = _scale_tensor(scale_sizes, "select_scales")
    return scale_choice(b, float(min(image_size)), sizes, float(target_side))


def scale_choice(boxes: Tensor, s_min: float, sizes: Tensor, target_side: float) -> Tensor:
    """The arithmetic of :func:`select_scales` on checked inputs.

    Args:
        boxes (Tensor[R, 4] float64): xyxy, original-image pixels.
        s_min: the original image's shorter side.
        sizes (Tensor[S] float64): resized shorter side of each scale.
        target_side: px.
    Returns:
        Tensor[R] int64: index into ``sizes``.
    """
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)  # (R,)
    s_star = torch.floor(target_side * s_min / area.sqrt() + 0.5)  # (R,) inf for empty boxes
    # +inf -> twice the largest scale (no host read of the value, so torch.export can trace it)
    s_star = torch.nan_to_num(torch.where(torch.isposinf(s_star), sizes.max() * 2, s_star))
    return _nearest(sizes, s_star)


def project_boxes(boxes: Tensor, image_size: tuple[int, int], scaled_size: tuple[int, int],
                  fmap_size: tuple[int, int], stride: int, offset0: float, shrink: float) -> Tensor:
    """Image boxes -> inclusive conv5 windows on one scale's map (spec §3, 0-based).

    The spec, 1-based: rescale ``b' = (b - 1) * r + 1`` with ``r = (s - 1)/(S_min - 1)``, then
    ``L = floor((x1' - offset0 + shrink)/S + 0.5) + 1`` and
    ``R = ceil((x2' - offset0 - shrink)/S - 0.5) + 1`` (offset0 = 21, shrink = 6.5, S = 16 for ZF-5);
    if ``L > R`` both become ``trunc((L + R)/2)``; clamp to ``[1, W5]``.

    The same in the project's convention: ``x1_voc = x1 + 1`` and ``x2_voc = x2`` give the scaled
    0-based pixel indices ``p1 = x1 * r`` and ``p2 = (x2 - 1) * r``; with ``offset0`` here the
    0-based RF centre of cell 0 (the spec's value minus 1, so 20 for ZF-5) and 0-based cells
    ``l = L - 1``, ``rr = R - 1``::

        l  = floor((p1 - offset0 + shrink) / S + 0.5)
        rr = ceil((p2 - offset0 - shrink) / S - 0.5)
        if l > rr: l = rr = trunc((l + rr + 2) / 2) - 1      # the spec's midpoint, shifted
        clamp l, rr to [0, W5 - 1] (y alike to [0, H5 - 1])

    ``r`` uses the shorter sides: ``(short_s - 1)/(short - 1)`` (the code's ``(s - 1)/(S_min - 1)``,
    also right when a max-size cap made the resized short side smaller than the scale).

    Args:
        boxes (Tensor[R, 4]): xyxy, original-image pixels.
        image_size: (height, width) of the original image.
        scaled_size: (height, width) of the image resized to this scale.
        fmap_size: (Hs, Ws) of this scale's conv5 map.
        stride: backbone stride (16).
        offset0: backbone ``proj_offset0``, the 0-based pixel index of cell 0's RF centre.
        shrink: backbone ``proj_shrink`` (6.5).
    Returns:
        Tensor[R, 4] int64: windows (x1, y1, x2, y2), inclusive 0-based conv5 cells with
        ``0 <= x1 <= x2 < Ws`` and ``0 <= y1 <= y2 < Hs``; never empty (a box outside the image
        collapses onto a border cell).
    """
    b = _check_boxes(boxes, "project_boxes")
    h5, w5 = int(fmap_size[0]), int(fmap_size[1])
    if h5 < 1 or w5 < 1:
        raise ValueError(f"project_boxes: fmap_size must be positive, got {tuple(fmap_size)}")
    short, short_s = float(min(image_size)), float(min(scaled_size))
    if short <= 0 or short_s <= 0:
        raise ValueError(f"project_boxes: image sizes must be positive, got {tuple(image_size)} -> "
                         f"{tuple(scaled_size)}")
    return project_windows(b, short, short_s, h5, w5, int(stride), float(offset0), float(shrink))


def project_windows(boxes: Tensor, short: float, short_s: float, h5: int, w5: int, stride: int, offset0: float,
                    shrink: float) -> Tensor:
    """The arithmetic of :func:`project_boxes` on checked inputs.

    Args:
        boxes (Tensor[R, 4] float64): xyxy, original-image pixels.
        short, short_s: shorter side of the original and of the resized image.
        h5, w5: conv5 map size at this scale.
        stride, offset0, shrink: as :func:`project_boxes`.
    Returns:
        Tensor[R, 4] int64: inclusive 0-based conv5 windows.
    """
    r = (short_s - 1.0) / (short - 1.0) if short > 1 else short_s / short
    first = boxes[:, :2] * r  # (R, 2) scaled 0-based index of the first covered pixel (x, y)
    last = (boxes[:, 2:] - 1.0) * r  # (R, 2) scaled 0-based index of the last covered pixel
    lo = torch.floor((first - offset0 + shrink) / stride + 0.5)  # (R, 2)
    hi = torch.ceil((last - offset0 - shrink) / stride - 0.5)  # (R, 2)
    mid = torch.trunc((lo + hi + 2.0) / 2.0) - 1.0  # (R, 2) spec midpoint in 1-based, shifted back
    empty = lo > hi
    lo = torch.where(empty, mid, lo)
    hi = torch.where(empty, mid, hi)
    limit = torch.tensor([w5 - 1, h5 - 1], dtype=torch.float64, device=boxes.device)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(hi.clamp(min=0), limit)
    return torch.cat([lo, hi], dim=1).to(torch.int64)  # (R, 4) x1, y1, x2, y2
