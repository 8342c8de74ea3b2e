"""Region features: boxes of one image -> SPP vectors from that image's conv5 pyramid.

Shape shorthand:
    R: proposals in one image      S: image scales          C: conv5 channels
    Hs x Ws: conv5 size at scale s B = sum(n*n) SPP bins    D = C * B pooled width

This is the only place that chains scale choice (spec §5), projection (spec §3) and the SPP layer
(spec §4), so training and testing pool windows the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from detector.projection import project_boxes, select_scales
from detector.spp import spp_pool

__all__ = ["ProjectionParams", "Conv5Pyramid", "pool_regions"]


@dataclass(frozen=True)
class ProjectionParams:
    """Backbone geometry the projection needs (see detector.backbones), and the window side the
    per-window scale choice aims at (spec §5: 208 px = 13 conv5 cells)."""

    stride: int
    offset0: float
    shrink: float
    target_side: float

    @staticmethod
    def of(backbone: torch.nn.Module, target_side: float) -> "ProjectionParams":
        return ProjectionParams(int(backbone.stride), float(backbone.proj_offset0), float(backbone.proj_shrink),
                                float(target_side))


@dataclass
class Conv5Pyramid:
    """conv5 maps of one image at S scales.

    Attributes:
        fmaps: S tensors [C, Hs, Ws] (float32 or float16).
        scaled_sizes: S pairs (h_s, w_s): the resized image size at each scale.
        image_size: (H, W) of the original image.
    """

    fmaps: list[torch.Tensor]
    scaled_sizes: list[tuple[int, int]]
    image_size: tuple[int, int]

    def short_sides(self) -> list[int]:
        return [min(h, w) for h, w in self.scaled_sizes]


def pool_regions(
    pyramid: Conv5Pyramid,
    boxes: torch.Tensor,
    levels: Sequence[int],
    proj: ProjectionParams,
    scale_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPP-pool each box on the conv5 map of its scale.

    Args:
        pyramid: the image's conv5 maps.
        boxes (Tensor[R, 4]): xyxy, original-image pixels.
        levels: pyramid levels, e.g. (1, 2, 3, 6).
        proj: stride / offset constants of the backbone.
        scale_index (Tensor[R] int64 | None): scale per box; None = the spec §5 choice
            (``select_scales`` aiming at ``proj.target_side`` px). Fine-tuning passes random
            scales here.
    Returns:
        Tensor[R, D] float32.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [R, 4], got {tuple(boxes.shape)}")
    R = boxes.shape[0]
    C = pyramid.fmaps[0].shape[0]
    B = sum(n * n for n in levels)
    device = pyramid.fmaps[0].device
    out = torch.zeros((R, C * B), dtype=torch.float32, device=device)  # (R, D)
    if R == 0:
        return out
    boxes = boxes.to(torch.float32)
    if scale_index is None:
        scale_index = select_scales(boxes, pyramid.image_size, pyramid.short_sides(), target_side=proj.target_side)
    scale_index = scale_index.to(torch.int64).cpu()
    for s in torch.unique(scale_index).tolist():
        idx = torch.nonzero(scale_index == s).flatten()  # (R_s,)
        fmap = pyramid.fmaps[s]
        windows = project_boxes(
            boxes[idx], pyramid.image_size, pyramid.scaled_sizes[s], tuple(fmap.shape[-2:]),
            proj.stride, proj.offset0, proj.shrink,
        )  # (R_s, 4) int64
        out[idx.to(device)] = spp_pool(fmap.float(), windows.to(device), levels)  # (R_s, D)
    return out
