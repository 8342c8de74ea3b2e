"""Random-weight models and random boxes for the timing benchmarks (timing does not depend on weights).

Shape shorthand (one alphabet for the whole project):
    R: proposals in one image      D = C * B: pooled width      F: fc7 width      K: foreground classes

:func:`random_detector` is a ZF-5 :class:`detector.detector.SPPDetector` of any width with random
SVMs and box regressors, so the paper's setting (full-width ZF-5, fc6/fc7 4096, ~2000 proposals)
can be timed without a trained model; :func:`random_boxes` pads proposal sets to a fixed count.
Tests use both as small, seeded fixtures.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from detector.detector import SPPDetector

__all__ = ["random_detector", "random_boxes"]


def random_detector(
    width_mult: float = 1.0,
    fc_dim: int | None = None,
    num_classes: int = 20,
    scales: Sequence[int] = (688,),
    levels: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    arch: str = "zf5",
) -> "SPPDetector":
    """A random-weight SPPDetector (ZF-5 unless ``arch`` says otherwise; width_mult for the trunks that take it) for
    timing only (timing does not depend on weights).

    Backbone with the spec §1 init, fc6/fc7 of width ``fc_dim`` and SPP ``levels`` (default: the
    paper's, ``detector.config`` defaults), random SVMs and box regressors, class names ``class0..``;
    scores are meaningless.
    """
    import dataclasses

    from detector.backbones import build_backbone
    from detector.bbox_reg import BoxRegressor
    from detector.config import Config
    from detector.detector import SPPDetector
    from detector.engine.train import detect_params
    from detector.head import FCHead
    from detector.spp import spp_out_dim
    from detector.svm import LinearSVMs

    fc_dim = fc_dim or Config().head.fc_dim
    levels = tuple(levels or Config().features.levels)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = build_backbone(arch, width_mult=width_mult, weights="none").eval()
    d = spp_out_dim(backbone.out_channels, levels)
    head = FCHead(d, fc_dim=fc_dim, num_classes=None, dropout=Config().head.dropout)
    k = num_classes
    svms = LinearSVMs(torch.randn(fc_dim, k, generator=g) * 1e-3, torch.zeros(k), 1.0)
    bbox = BoxRegressor(torch.randn(d + 1, 4 * k, generator=g) * 1e-4, 1.0)
    # the spec's test settings, fc6/fc7 in float32 (the reference arithmetic; callers lower it)
    params = dataclasses.replace(detect_params(Config()), scales=tuple(scales), fc_precision="float32")
    return SPPDetector(backbone=backbone, head=head, svms=svms, bbox=bbox, class_names=[f"class{i}" for i in range(k)],
                       levels=tuple(levels), params=params, arch=arch, width_mult=width_mult).to(device)


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
