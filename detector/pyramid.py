"""Image pyramid: the whole image resized to each scale, one trunk pass per scale (spec §2).

Shape shorthand (one alphabet for the whole project):
    S: image scales      C: conv5 channels      Hs x Ws: conv5 size at scale s

Resizing: the shorter side becomes exactly the scale and the longer side ``round(long * s / short)``
(round half up; :func:`resized_size` is the one rounding rule of the project), unless an optional cap
on the longer side applies. Interpolation is bilinear with no antialiasing (spec §2, "to match
OpenCV"), done on the pre-processed float tensor (resizing commutes with the per-channel affine
pre-processing because bilinear weights sum to 1).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["preprocess", "preprocess_float", "resized_size", "pyramid_sizes", "image_pyramid", "trunk_pyramid",
           "hwc_layout", "INPUT_FORMATS", "IMAGENET_MEAN", "IMAGENET_STD"]

INPUT_FORMATS = ("bgr255_mean128", "rgb_imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision ImageNet weights (RGB, 0..1)
IMAGENET_STD = (0.229, 0.224, 0.225)
ZF_MEAN = 128.0  # spec §2: constant mean on every channel, no std scaling


def preprocess(image: np.ndarray, input_format: str) -> Tensor:
    """uint8 RGB image -> the trunk's float input.

    Args:
        image (ndarray[H, W, 3] uint8): RGB; grey ``[H, W]`` or ``[H, W, 1]`` is replicated to 3
            channels (spec §2).
        input_format: ``"bgr255_mean128"`` (ZF-5: BGR order, 0..255, minus 128) or
            ``"rgb_imagenet"`` (torchvision: RGB / 255, minus ImageNet mean, divided by std).
    Returns:
        Tensor[3, H, W] float32.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"preprocess: image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess: expected an RGB image [H, W, 3] (or grey [H, W]), got shape "
                         f"{image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"preprocess: expected uint8 pixels in 0..255, got {image.dtype}")
    if not (image.flags.writeable and image.flags.c_contiguous):
        image = np.array(image, order="C")  # torch.from_numpy needs a writable contiguous array
    x = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32)  # (3, H, W)
    if input_format == "bgr255_mean128":
        return x.flip(0) - ZF_MEAN  # (3, H, W) BGR
    if input_format == "rgb_imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x / 255.0 - mean) / std  # (3, H, W) RGB
    raise ValueError(f"preprocess: unknown input_format {input_format!r}; expected one of "
                     f"{', '.join(INPUT_FORMATS)}")


def preprocess_float(images: Tensor, input_format: str) -> Tensor:
    """Float RGB images in [0, 1] (torchvision's detection input) -> the trunk's float input.

    For ``images = uint8 / 255`` (float32) the result equals :func:`preprocess` of the uint8 image
    bit for bit: ``fl(fl(k / 255) * 255) == k`` for every k in 0..255 in float32
    (tests/test_pyramid.py checks all 256 values in both formats), so ``model([tensor])`` and
    ``detect(array)`` feed the trunk the same numbers.

    Args:
        images (Tensor[..., 3, H, W] float): RGB in [0, 1], any device.
        input_format: as :func:`preprocess`.
    Returns:
        Tensor[..., 3, H, W]: same dtype and device.
    """
    # the constants are written out (TorchScript compiles this function and cannot read module
    # globals); tests/test_pyramid.py pins them to ZF_MEAN, IMAGENET_MEAN and IMAGENET_STD
    if input_format == "bgr255_mean128":
        return (images * 255.0).flip(-3) - 128.0  # (..., 3, H, W) BGR
    if input_format == "rgb_imagenet":
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=images.dtype, device=images.device).view(3, 1, 1)
        return (images - mean) / std  # (..., 3, H, W) RGB
    raise ValueError("preprocess_float: unknown input_format '" + input_format + "'; expected one of "
                     "bgr255_mean128, rgb_imagenet")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def resized_size(height: int, width: int, scale: int, max_size: int = 0) -> tuple[int, int]:
    """Size of the image resized so its shorter side is ``scale`` (spec §2).

    The longer side is ``round_half_up(long * scale / short)``. With ``max_size > 0`` and a longer
    side that would exceed it, the longer side becomes ``max_size`` and the shorter
    ``round_half_up(short * max_size / long)`` instead.

    Args:
        height, width: original image size in pixels.
        scale: target shorter side.
        max_size: cap on the longer side; 0 = none (the paper has none).
    Returns:
        (height, width) of the resized image, each >= 1.
    """
    if height < 1 or width < 1 or scale < 1 or max_size < 0:
        raise ValueError(f"resized_size: bad sizes (height={height}, width={width}, scale={scale}, "
                         f"max_size={max_size})")
    short, long = min(height, width), max(height, width)
    new_short, new_long = int(scale), _round_half_up(long * scale / short)
    if max_size > 0 and new_long > max_size:
        new_long, new_short = int(max_size), _round_half_up(short * max_size / long)
    new_short, new_long = max(1, new_short), max(1, new_long)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def pyramid_sizes(height: int, width: int, scales: Sequence[int], max_size: int = 0) -> list[tuple[int, int]]:
    """:func:`resized_size` for every scale: ``[(h_s, w_s), ...]`` in scale order."""
    return [resized_size(height, width, s, max_size) for s in scales]


def hwc_layout(x: Tensor) -> Tensor:
    """One image's trunk input in the memory layout of :func:`preprocess`'s HWC view.

    The CPU convolution picks its kernel by the input's strides, and kernels sum in different
    orders: a contiguous NCHW copy of the same numbers gives conv5 maps that differ in the last
    bit. Every single-image pass (the training cache, ``detect``, ``model([t])``, the exported
    program) runs in this one layout, so an image's features at test time are the bits it was
    trained on.

    Args:
        x (Tensor[1, 3, H, W]): any layout.
    Returns:
        Tensor[1, 3, H, W]: the same values, strides ``(3, 1, 3W, 3)``.
    """
    return x[0].permute(1, 2, 0).contiguous().permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)


def image_pyramid(backbone: nn.Module, image: np.ndarray, scales: Sequence[int], max_size: int = 0,
                  device: str | torch.device = "cpu", conv_dtype: torch.dtype | None = None) -> list[Tensor]:
    """conv5 maps of one image at every scale: one forward pass per scale, no gradients.

    The backbone is used as it is (call ``.eval()`` first for trunks with BatchNorm).

    Args:
        backbone: a trunk from :func:`detector.backbones.build_backbone` (``input_format``).
        image (ndarray[H, W, 3] uint8): RGB (grey is replicated).
        scales: shorter sides, e.g. (480, 576, 688, 864, 1200).
        max_size: optional cap on the resized longer side (0 = none).
        device: where the forward passes run.
        conv_dtype: as for :func:`trunk_pyramid`.
    Returns:
        list of S Tensor[1, C, Hs, Ws] (the backbone's dtype, on ``device``), in scale order; the
        resized image sizes are :func:`pyramid_sizes`.
    """
    if len(scales) == 0:
        raise ValueError("image_pyramid: scales is empty")
    x = preprocess(image, backbone.input_format)  # (3, H, W)
    h, w = x.shape[1:]
    return trunk_pyramid(backbone, x.unsqueeze(0), pyramid_sizes(h, w, scales, max_size), device, conv_dtype)


def trunk_pyramid(backbone: nn.Module, x: Tensor, sizes: Sequence[tuple[int, int]],
                  device: str | torch.device | None = None, conv_dtype: torch.dtype | None = None) -> list[Tensor]:
    """conv5 maps of N pre-processed images of one size at every resized size, one forward pass of
    the batch per size, no gradients.

    Args:
        backbone: the trunk (call ``.eval()`` first for trunks with BatchNorm).
        x (Tensor[N, 3, H, W]): the trunk's input (:func:`preprocess` / :func:`preprocess_float`), any
            memory layout: one image runs in :func:`hwc_layout`, a batch contiguous.
        sizes: (h_s, w_s) per scale (:func:`pyramid_sizes`); a size equal to (H, W) is not resized.
        device: where the passes run (default: x's device).
        conv_dtype: run the trunk under ``torch.autocast`` in this dtype (``torch.bfloat16``:
            :mod:`detector.conv_precision`) and return its maps as the last layer gives them (in
            ``conv_dtype`` where autocast runs it there: pooling takes them as they are, exactly);
            None = the backbone's own arithmetic and dtype.
    Returns:
        list of S Tensor[N, C, Hs, Ws], in ``sizes`` order. Each image's maps
        equal its own N = 1 pass wherever the convolution kernels PyTorch picks do not depend on N
        (``SPPDetector`` checks that before it batches).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"trunk_pyramid: x must be Tensor[N, 3, H, W], got {tuple(x.shape)}")
    h, w = x.shape[2:]
    param = next(backbone.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = x.to(device=device or x.device, dtype=dtype)  # (N, 3, H, W)
    x = hwc_layout(x) if x.shape[0] == 1 else x.contiguous()  # (N, 3, H, W)
    out = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=conv_dtype or dtype, enabled=conv_dtype is not None):
        for hs, ws in sizes:
            xs = x if (hs, ws) == (h, w) else F.interpolate(
                x, size=(hs, ws), mode="bilinear", align_corners=False, antialias=False)  # (N, 3, hs, ws)
            out.append(backbone(xs))  # (N, C, Hs, Ws)
    return out
