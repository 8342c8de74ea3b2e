"""BatchNorm statistics re-estimated on whole images at the detector's scales.

Shape shorthand:
    H, W: an image's size      S: scales

A trunk pre-trained as a classifier on object crops (64-96 px, centred on objects) keeps the
running means and variances of those crops in its BatchNorm layers. The detector runs it, in eval
mode, on whole images at 240-1440 px, whose activations have other statistics: for the digits
config's CPU-width ResNet-18 the whole images' per-channel variance is 0.41-0.64 of the crops' (median
per layer) and their means are 0.12-0.34 running standard deviations away. :func:`recalibrate_batchnorm`
replaces the running statistics with the cumulative average over one pass per image and scale, the
passes the conv5 cache makes (:func:`detector.pyramid.trunk_pyramid`): the same as
``torch.optim.swa_utils.update_bn`` (running statistics reset, ``momentum=None``, train mode, no
gradients), with the cache's resize. Weights and biases do not change.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from detector.pyramid import preprocess, pyramid_sizes, trunk_pyramid

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]


def batchnorm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``net`` (any dimension), in module order."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_batchnorm(net: nn.Module, images: Iterable[np.ndarray], scales: Sequence[int], max_size: int = 0,
                          device: str | torch.device = "cpu") -> int:
    """Re-estimate every BatchNorm layer's running mean and variance from whole-image passes.

    For each image and scale the image is resized as the conv5 cache resizes it and passed through
    ``net`` in train mode without gradients (a batch of one: each pass contributes its own
    per-channel mean and unbiased variance); each layer's running statistics become the plain
    average over all passes. The layers' ``momentum`` and the net's train/eval mode are restored.

    Args:
        net: a trunk from :func:`detector.backbones.build_backbone` (``input_format``).
        images: uint8 RGB arrays [H, W, 3].
        scales: shorter sides, e.g. the config's ``features.train_scales``.
        max_size: cap on the resized longer side (0 = none).
        device: where the passes run.
    Returns:
        the number of passes (images x scales).
    Raises:
        ValueError: ``net`` has no BatchNorm layer, or ``images`` is empty.
    """
    layers = batchnorm_layers(net)
    if not layers:
        raise ValueError("recalibrate_batchnorm: the trunk has no BatchNorm layer")
    it = iter(images)
    first = next(it, None)
    if first is None:  # checked before the statistics are reset, so the trunk stays as it was
        raise ValueError("recalibrate_batchnorm: no images")
    momenta = [m.momentum for m in layers]
    was_training = net.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every pass weighs the same
    passes = 0
    try:
        net.train()
        for image in itertools.chain([first], it):
            x = preprocess(image, net.input_format)  # (3, H, W)
            trunk_pyramid(net, x.unsqueeze(0), pyramid_sizes(x.shape[1], x.shape[2], scales, max_size), device)
            passes += len(scales)
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        net.train(was_training)
    return passes
