"""Convolutional trunks that turn an image into the conv5 map that SPP pools (spec §1).

Shape shorthand (one alphabet for the whole project):
    C: conv5 channels            Hs x Ws: conv5 size at scale s
    N: images in a batch (classification pre-training only; detection uses N = 1)

Three trunks, all with a total stride of 16 and the same public attributes:

``stride`` (int)
    Pixels of the input per conv5 cell (16).
``out_channels`` (int)
    C, the channels of the conv5 map.
``input_format`` (str)
    What :func:`detector.pyramid.preprocess` must feed it: ``"bgr255_mean128"`` (ZF-5, spec §2) or
    ``"rgb_imagenet"`` (torchvision: RGB / 255, then ImageNet mean / std).
``proj_offset0`` (float)
    **0-based** pixel index of the receptive-field centre of conv5 cell 0; cell ``m`` (0-based) is
    centred on input pixel ``stride * m + proj_offset0``. For ZF-5 this is 20, the spec's 1-based
    ``offset0 = 21`` minus one (spec §3 and "Known pitfalls"). Derived from the layer geometry by
    :func:`rf_geometry` (and checked against the gradient support in tests/test_backbones.py).
``proj_shrink`` (float)
    Pixels each window edge moves inwards before rounding to a cell (spec §3: 6.5, kept for every
    trunk as the spec advises for re-implementations with other paddings).
``tail_units`` (int) and ``forward_prefix(x, n)`` / ``forward_tail(x, n)`` / ``tail_modules(n)``
    A split of the trunk into a frozen prefix and its last ``n`` stride-16 units (ZF-5: conv5,
    conv4-5 or conv3-5; VGG-16: up to conv5_1-5_3; ResNet-50 C4: up to the last 5 blocks of
    layer3), with ``forward_tail(forward_prefix(x, n), n) == forward(x)``. Fine-tuning conv layers
    on detection windows (``finetune.conv_layers``) caches the prefix and trains the tail.
``geometry`` (tuple of :class:`Layer`)
    Kernel / stride / padding / ceil-mode of every spatial layer on the longest path; used by
    :func:`conv5_size`, :func:`rf_geometry` and :func:`rf_size` (ZF-5: 139 px as in the paper, its
    two 3x3 LRNs keep the centre and scale values within a slightly wider field; VGG-16: 196;
    ResNet-50 C4: 267).

Derivation of ``proj_offset0``: a layer with kernel k, stride s, padding p maps output index i to
input pixels ``i*s - p .. i*s - p + k - 1``, centred on ``i*s - p + (k - 1)/2``. Composing the layers
from conv5 back to the image gives ``centre(m) = stride * m + offset0``:

* ZF-5 (7/2/1, pool 3/2/0, 5/2/0, pool 3/2/0, three 3/1/1): 16 m + 20.
* VGG-16 conv5_3 (3x3 pad 1 convs, four 2x2/2 pools): 16 m + 7.5.
* ResNet-50 through layer3 (7/2/3, pool 3/2/1, stride-2 3x3 pad 1 and 1x1 convs): 16 m + 0.
* ResNet-18 through layer3 (the same stem, 3x3 pad 1 convs, two of them stride 2): 16 m + 0.
* MobileNetV3-Large to stride 16 (3/2/1 stem, depthwise k/s/(k-1)/2 convs, four of stride 2): 16 m + 0.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.workspace import scratch

__all__ = [
    "Layer",
    "ZF5",
    "ZF5BN",
    "VGG16Conv5",
    "ResNet50C4",
    "ResNet18C4",
    "MobileNetV3C4",
    "WeightsError",
    "build_backbone",
    "conv5_size",
    "rf_geometry",
    "rf_size",
    "load_backbone_weights",
    "ARCHS",
]

log = logging.getLogger(__name__)

ARCHS = ("zf5", "zf5_bn", "vgg16", "resnet50", "resnet18", "mobilenet_v3")
WIDTH_ARCHS = ("zf5", "zf5_bn", "resnet18")  # the trunks with a width_mult (detector.config checks it too)
PROJ_SHRINK = 6.5  # spec §3: window edges move 6.5 px inwards before rounding to a cell


class WeightsError(RuntimeError):
    """Backbone weights that cannot be found, read or matched to the model."""


@dataclass(frozen=True)
class Layer:
    """Spatial geometry of one layer: kernel, stride, padding and Caffe/PyTorch ceil mode."""

    kernel: int
    stride: int
    pad: int
    ceil: bool = False

    def out_size(self, n: int) -> int:
        """Output side for an input side ``n`` (floor for conv, ceil for ceil-mode pooling)."""
        num = n + 2 * self.pad - self.kernel
        out = (-(-num // self.stride) if self.ceil else num // self.stride) + 1
        if self.ceil and (out - 1) * self.stride >= n + self.pad:
            out -= 1  # the last window may not start inside the right padding (PyTorch and Caffe)
        return max(out, 0)


def rf_geometry(layers: Sequence[Layer]) -> tuple[int, float]:
    """Total stride and 0-based receptive-field centre of output cell 0.

    Args:
        layers: the spatial layers in forward order.
    Returns:
        (stride, offset0): output cell ``m`` (0-based) is centred on input pixel ``stride*m + offset0``
        (0-based pixel index).
    """
    stride, offset = 1, 0.0
    # walk backwards: the centre of cell m in layer l's input is s*m - p + (k-1)/2
    for layer in reversed(layers):
        offset = layer.stride * offset - layer.pad + (layer.kernel - 1) / 2
        stride *= layer.stride
    return stride, offset


def rf_size(layers: Sequence[Layer]) -> int:
    """Receptive-field side in input pixels of one output cell (every layer on the longest path)."""
    rf = 1
    for layer in reversed(layers):
        rf = (rf - 1) * layer.stride + layer.kernel
    return rf


def _geometry_size(layers: Sequence[Layer], side: int) -> int:
    n = int(side)
    for layer in layers:
        n = layer.out_size(n)
    return n


# ----------------------------------------------------------------------------------------------
# ZF-5


def _tracing() -> bool:
    """Whether a tracer (torch.jit.trace, torch.export, torch.compile) records this call: a traced
    program must not capture this thread's scratch buffers as constants."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling()
                or getattr(torch.compiler, "is_exporting", lambda: False)())


# elements per float32 chunk of _pow_neg_three_quarters_bf16_ (4 MB: the chunk's passes stay in cache)
_POW_CHUNK = 1 << 20


def _pow_neg_three_quarters_bf16_(y: Tensor) -> Tensor:
    """``y.pow_(-0.75)`` for a bfloat16 ``y``, in place, with the same bits, about twice as fast on a CPU.

    ``pow`` with a non-integer exponent goes through exp and log per element; here each chunk is
    widened to float32 and ``y ** -0.75 = rsqrt(y) * sqrt(rsqrt(y))`` is rounded back. The float32
    chain is within a few float32 ulps of the true value, far inside one bfloat16 ulp, and rounds to
    ``pow``'s bfloat16 result for every bfloat16 value but -0.0 and -inf (all 65536 bit patterns
    compared in tests/test_backbones.py; the LRN's ``1 + alpha * mean`` with ``alpha >= 0`` is at
    least 1 or NaN). On conv1's 1 x 96 x 342 x 457 map at 2 threads: 22 ms -> 9 ms. A ``y`` that is
    not dense in some memory format falls back to ``pow_``.
    """
    if y.is_contiguous():
        flat = y.view(-1)
    elif y.ndim == 4 and y.is_contiguous(memory_format=torch.channels_last):
        flat = y.permute(0, 2, 3, 1).reshape(-1)  # a view: the channels-last storage in order
    else:
        return y.pow_(-0.75)
    n = flat.numel()
    chunk = min(n, _POW_CHUNK)
    a = scratch("pow_a", chunk, torch.float32, y.device)
    b = scratch("pow_b", chunk, torch.float32, y.device)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        part, fa, fb = flat[start:start + m], a[:m], b[:m]
        fa.copy_(part).rsqrt_()  # y^-1/2
        torch.sqrt(fa, out=fb)  # y^-1/4
        part.copy_(fa.mul_(fb))  # y^-3/4, rounded to bfloat16
    return y


class WithinChannelLRN(nn.Module):
    """Caffe ``WITHIN_CHANNEL`` LRN (spec §1): ``y = x * (1 + alpha/9 * sum_{3x3} x^2) ** -beta``.

    The 3x3 sum is over the spatial neighbourhood of the same channel, zeros outside the map; the
    mean over 9 cells with zero padding counted is exactly ``avg_pool2d(x^2, 3, 1, 1,
    count_include_pad=True)``. Not torch's cross-channel ``nn.LocalResponseNorm``.

    Args:
        size: neighbourhood side (3).
        alpha: 5e-5.
        beta: 0.75.
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    # Largest map (bytes) whose square and mean the inference path keeps in this thread's reused
    # buffers, so at most 64 MB stay allocated between images: conv1 of full-width ZF-5 at 688 px
    # is 30.3 MB in bfloat16 (kept) and 60.6 MB in float32 (fresh temporaries, as before). Keeping
    # the float32 ones saved as much time but raised a detection's peak memory by 114 MB (8.5%;
    # BENCHMARKS.md "huge pages").
    SCRATCH_CAP_BYTES = 32 << 20

    def forward(self, x: Tensor, overwrite_input: bool = False) -> Tensor:
        """Tensor[N, C, H, W] -> the normalised map, same shape and dtype.

        ``overwrite_input``: at inference (no gradients) on a channels-last CPU map, the result is
        written into ``x`` itself and the squared map and its mean go to this thread's reused
        buffers (:mod:`detector.workspace`) instead of two fresh map-sized tensors, with the same
        values; for a caller that owns ``x``, as ZF-5's prefix owns its fresh ReLU output.
        """
        if torch.is_grad_enabled() and x.requires_grad:
            mean_sq = F.avg_pool2d(x * x, self.size, 1, self.size // 2, count_include_pad=True)
            return x * (1.0 + self.alpha * mean_sq).pow(-self.beta)
        # inference: the same arithmetic in place on mean_sq: no three fresh map-sized temporaries
        # (conv1's LRN is a large share of ZF-5's time on a CPU; BENCHMARKS.md "detect")
        overwrite = (overwrite_input and x.device.type == "cpu" and x.ndim == 4
                     and x.is_contiguous(memory_format=torch.channels_last) and not _tracing())
        if overwrite:
            n, c, h, w = x.shape
            sq, mean_sq = (scratch(f"lrn_{k}", x.numel(), x.dtype, x.device, self.SCRATCH_CAP_BYTES)
                           .view(n, h, w, c).permute(0, 3, 1, 2) for k in ("sq", "mean"))  # (N, C, H, W) channels-last
            torch.mul(x, x, out=sq)
            p = self.size // 2
            torch.ops.aten.avg_pool2d.out(sq, [self.size, self.size], [1, 1], [p, p], False, True, None, out=mean_sq)
        else:
            mean_sq = F.avg_pool2d(x * x, self.size, 1, self.size // 2, count_include_pad=True)
        y = mean_sq.mul_(self.alpha).add_(1.0)
        fast_pow = (self.beta == 0.75 and self.alpha >= 0 and y.dtype == torch.bfloat16 and y.device.type == "cpu"
                    and not _tracing())
        g = _pow_neg_three_quarters_bf16_(y) if fast_pow else y.pow_(-self.beta)
        # x * g equals g * x (IEEE products commute): both ways give the same values
        return x.mul_(g) if overwrite else g.mul_(x)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, within_channel"


class ZF5(nn.Module):
    """ZF-5 trunk conv1..conv5 exactly as the released Caffe model (spec §1).

    conv1 7/2/1 -> ReLU -> LRN -> maxpool 3/2 (ceil) -> conv2 5/2/0 -> ReLU -> LRN -> maxpool 3/2
    (ceil) -> conv3, conv4, conv5 3/1/1 each with ReLU. conv5 is 13x13 for 224 px, 10 for 180,
    29 for 480, 35 for 576, 42 for 688, 53 for 874, 74 for 1200.

    Init: Gaussian std 0.01 for every weight; bias 0 for conv1 and conv3, 1 for conv2, conv4, conv5.

    Args:
        width_mult: channel multiplier; 1.0 gives 96/256/384/384/256, 0.25 gives 24/64/96/96/64
            (CPU-sized variants).
    Input: Tensor[N, 3, H, W] float, BGR in 0..255 minus 128 (``input_format = "bgr255_mean128"``).
    Output: Tensor[N, C, Hs, Ws], post-ReLU.
    """

    stride = 16
    input_format = "bgr255_mean128"
    proj_shrink = PROJ_SHRINK
    geometry = (
        Layer(7, 2, 1),  # conv1
        Layer(3, 2, 0, ceil=True),  # pool1
        Layer(5, 2, 0),  # conv2
        Layer(3, 2, 0, ceil=True),  # pool2
        Layer(3, 1, 1),  # conv3
        Layer(3, 1, 1),  # conv4
        Layer(3, 1, 1),  # conv5
    )
    proj_offset0 = rf_geometry(geometry)[1]  # 20.0 (0-based); spec's 1-based offset0 = 21
    base_channels = (96, 256, 384, 384, 256)

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        if not (width_mult > 0 and math.isfinite(width_mult)):
            raise ValueError(f"ZF5: width_mult must be a positive number, got {width_mult!r}")
        self.width_mult = float(width_mult)
        c1, c2, c3, c4, c5 = (max(1, int(round(c * width_mult))) for c in self.base_channels)
        self.channels = (c1, c2, c3, c4, c5)
        self.out_channels = c5
        self.conv1 = nn.Conv2d(3, c1, 7, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 5, stride=2, padding=0)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=1, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, stride=1, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, stride=1, padding=1)
        self.lrn = WithinChannelLRN(3, 5e-5, 0.75)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §1 init: weights N(0, 0.01²); biases 0 (conv1, conv3) or 1 (conv2, conv4, conv5)."""
        for conv, bias in ((self.conv1, 0.0), (self.conv2, 1.0), (self.conv3, 0.0), (self.conv4, 1.0),
                           (self.conv5, 1.0)):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.constant_(conv.bias, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ZF5 expects Tensor[N, 3, H, W], got {tuple(x.shape)}")
        # the prefix runs channels-last (faster convs, LRNs and pools on a CPU); the conv5 map is
        # handed back in the default layout
        return self.forward_tail(self.forward_prefix(x, 3), 3)  # (N, C, Hs, Ws)

    tail_units = 3  # conv3, conv4, conv5 (stride 16, no pooling between them)

    def tail_modules(self, n: int) -> list[nn.Module]:
        """The last ``n`` convs (ReLU has no parameters): [conv5], [conv4, conv5] or [conv3..conv5]."""
        _check_tail(self, n)
        return [self.conv3, self.conv4, self.conv5][3 - n:]

    def forward_prefix(self, x: Tensor, n: int) -> Tensor:
        """conv1 .. the unit before the last ``n``: Tensor[N, 3, H, W] -> Tensor[N, C', Hs, Ws]."""
        _check_tail(self, n)
        # channels-last: the convs, LRNs and pools run ~1.6x faster on a CPU (BENCHMARKS.md "detect")
        x = x.contiguous(memory_format=torch.channels_last)
        # ReLU in place on the fresh conv outputs (a conv's backward needs its input, not its
        # output, so autograd allows it; torchvision's VGG does the same): no map-sized allocation
        # the LRNs may overwrite the fresh ReLU outputs they are given (inference only)
        x = F.max_pool2d(self.lrn(F.relu_(self.conv1(x)), overwrite_input=True), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.lrn(F.relu_(self.conv2(x)), overwrite_input=True), 3, 2, ceil_mode=True)
        for conv in [self.conv3, self.conv4, self.conv5][: 3 - n]:
            x = F.relu_(conv(x))
        return x

    def forward_tail(self, x: Tensor, n: int) -> Tensor:
        """The last ``n`` convs with ReLU on a prefix map; the conv5 map in the default layout."""
        for conv in self.tail_modules(n):
            x = F.relu_(conv(x))
        return x.contiguous()  # (N, C, Hs, Ws)


class ZF5BN(ZF5):
    """ZF-5 with BatchNorm after every conv in place of the two LRNs: the ``zf5_bn`` arch, a trunk
    that learns faster from scratch. Every conv, pool, channel count and so the spec's geometry
    (conv5 sizes, ``proj_offset0`` 20, stride 16) is ZF-5's; only the normalisation differs.

    conv_k -> BatchNorm -> ReLU for k = 1..5, max pools 3/2 (ceil) after the first two.
    Init: He fan-in normal weights (the spec's N(0, 0.01²) suits an LRN net, not a normalised one),
    conv biases 0, BatchNorm weight 1 and bias 0. The BatchNorms use their running statistics in
    ``eval()``, so detection (one image at a time) and fine-tuning a tail (the trunk stays in
    ``eval()``) see the statistics of pre-training, as detectors usually freeze them.

    Args:
        width_mult: channel multiplier, as :class:`ZF5`.
    Input: Tensor[N, 3, H, W] float, ``input_format = "bgr255_mean128"`` (as ZF-5).
    Output: Tensor[N, C, Hs, Ws], post-ReLU.
    """

    def __init__(self, width_mult: float = 1.0):
        super().__init__(width_mult)
        del self.lrn
        c1, c2, c3, c4, c5 = self.channels
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm2d(c3)
        self.bn4, self.bn5 = nn.BatchNorm2d(c4), nn.BatchNorm2d(c5)  # fresh: already at identity

    def reset_parameters(self) -> None:
        """He fan-in init for the convs, biases 0; BatchNorm at identity (weight 1, bias 0). ZF5's
        constructor calls it before the BatchNorms exist, which then start at identity."""
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for bn in (getattr(self, f"bn{k}", None) for k in range(1, 6)):
            if bn is not None:
                bn.reset_parameters()

    def _units(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return [(self.conv3, self.bn3), (self.conv4, self.bn4), (self.conv5, self.bn5)]

    def tail_modules(self, n: int) -> list[nn.Module]:
        """The last ``n`` units, each ``Sequential(conv, bn)`` over the trunk's own modules."""
        _check_tail(self, n)
        return [nn.Sequential(conv, bn) for conv, bn in self._units()[3 - n:]]

    def forward_prefix(self, x: Tensor, n: int) -> Tensor:
        """conv1 .. the unit before the last ``n``: Tensor[N, 3, H, W] -> Tensor[N, C', Hs, Ws]."""
        _check_tail(self, n)
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu_(self.bn1(self.conv1(x))), 3, 2, ceil_mode=True)
        x = F.max_pool2d(F.relu_(self.bn2(self.conv2(x))), 3, 2, ceil_mode=True)
        for conv, bn in self._units()[: 3 - n]:
            x = F.relu_(bn(conv(x)))
        return x

    def forward_tail(self, x: Tensor, n: int) -> Tensor:
        """The last ``n`` conv + BatchNorm + ReLU units; the conv5 map in the default layout."""
        _check_tail(self, n)
        for conv, bn in self._units()[3 - n:]:
            x = F.relu_(bn(conv(x)))
        return x.contiguous()  # (N, C, Hs, Ws)


# ----------------------------------------------------------------------------------------------
# torchvision adapters


def _vgg_geometry() -> tuple[Layer, ...]:
    conv, pool = Layer(3, 1, 1), Layer(2, 2, 0)
    blocks = (2, 2, 3, 3, 3)
    out: list[Layer] = []
    for i, n in enumerate(blocks):
        out += [conv] * n
        if i < 4:
            out.append(pool)  # pool5 is dropped: conv5_3 has stride 16
    return tuple(out)


class VGG16Conv5(nn.Module):
    """torchvision VGG-16 up to conv5_3 + ReLU (``features[:30]``, pool5 dropped), stride 16.

    Parameter names equal torchvision's (``features.N.weight``), so a torchvision ``vgg16``
    state_dict loads directly (its ``classifier.*`` keys are ignored).

    Input: Tensor[N, 3, H, W], ``input_format = "rgb_imagenet"``. Output: Tensor[N, 512, Hs, Ws]
    with ``Hs = floor(H / 16)``. RF centre of cell m: pixel ``16 m + 7.5`` (0-based).
    """

    stride = 16
    out_channels = 512
    input_format = "rgb_imagenet"
    proj_shrink = PROJ_SHRINK
    geometry = _vgg_geometry()
    proj_offset0 = rf_geometry(geometry)[1]  # 7.5

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # the conv part only (building vgg16() would also allocate its 120M-parameter classifier)
        self.features = make_layers(cfgs["D"])[:30]
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):  # torchvision VGG's own init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG16Conv5 expects Tensor[N, 3, H, W], got {tuple(x.shape)}")
        return self.features(x)  # (N, 512, Hs, Ws)

    tail_units = 3  # conv5_1 .. conv5_3 (after pool4, stride 16)

    def tail_modules(self, n: int) -> list[nn.Module]:
        """The last ``n`` convs of conv5_x (their ReLUs have no parameters)."""
        _check_tail(self, n)
        return list(self.features[30 - 2 * n:30:2])

    def forward_prefix(self, x: Tensor, n: int) -> Tensor:
        _check_tail(self, n)
        return self.features[: 30 - 2 * n](x)

    def forward_tail(self, x: Tensor, n: int) -> Tensor:
        _check_tail(self, n)
        return self.features[30 - 2 * n:30](x)  # (N, 512, Hs, Ws)


def _resnet_c4_geometry() -> tuple[Layer, ...]:
    # conv1 7/2/3, maxpool 3/2/1, then the 3x3 conv of every bottleneck (1x1 convs change nothing):
    # layer1 3 blocks, layer2 4 and layer3 6, the first of layer2/layer3 with stride 2 (torchvision
    # ResNet v1.5 puts the stride on the 3x3; the 1x1/2 shortcut has the same size and centre).
    s1, s2 = Layer(3, 1, 1), Layer(3, 2, 1)
    return (Layer(7, 2, 3), Layer(3, 2, 1)) + (s1,) * 3 + (s2,) + (s1,) * 3 + (s2,) + (s1,) * 5


class _ResNetC4(nn.Module):
    """A torchvision ResNet's stem + layer1..layer3 (the "C4" trunk), stride 16, under torchvision's
    parameter names (``conv1``, ``bn1``, ``layer1``..``layer3``), so its state_dict loads directly
    (``layer4.*`` and ``fc.*`` are ignored). BatchNorm layers use their running statistics in
    ``eval()`` mode; call ``.eval()`` before extracting features. Fine-tuning's tail is the last
    blocks of layer3 after its first (stride-2) one, whose BatchNorms keep their running statistics
    when the trunk is in ``eval()``, as detection fine-tuning usually freezes them."""

    stride = 16
    input_format = "rgb_imagenet"
    proj_shrink = PROJ_SHRINK

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects Tensor[N, 3, H, W], got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # (N, C, Hs, Ws)

    def tail_modules(self, n: int) -> list[nn.Module]:
        """The last ``n`` blocks of layer3."""
        _check_tail(self, n)
        return list(self.layer3[len(self.layer3) - n:])

    def forward_prefix(self, x: Tensor, n: int) -> Tensor:
        _check_tail(self, n)
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.layer3[: len(self.layer3) - n](x)

    def forward_tail(self, x: Tensor, n: int) -> Tensor:
        _check_tail(self, n)
        return self.layer3[len(self.layer3) - n:](x)  # (N, C, Hs, Ws)


class ResNet50C4(_ResNetC4):
    """torchvision ResNet-50 stem + layer1..layer3, stride 16, 1024 channels (:class:`_ResNetC4`).

    Input: Tensor[N, 3, H, W], ``input_format = "rgb_imagenet"``. Output: Tensor[N, 1024, Hs, Ws].
    RF centre of cell m: pixel ``16 m`` (0-based).
    """

    out_channels = 1024
    geometry = _resnet_c4_geometry()
    proj_offset0 = rf_geometry(geometry)[1]  # 0.0
    tail_units = 5  # the last 5 bottlenecks of layer3 (its first one has stride 2)

    def __init__(self) -> None:
        from torchvision.models import resnet50

        super().__init__(resnet50(weights=None))


def _resnet18_c4_geometry() -> tuple[Layer, ...]:
    # conv1 7/2/3, maxpool 3/2/1, then both 3x3 convs of every basic block: layer1 2 blocks, layer2
    # and layer3 2 each, the first conv of layer2/layer3 with stride 2 (the 1x1/2 shortcut has the
    # same size and centre).
    s1, s2 = Layer(3, 1, 1), Layer(3, 2, 1)
    return (Layer(7, 2, 3), Layer(3, 2, 1)) + (s1,) * 4 + (s2,) + (s1,) * 3 + (s2,) + (s1,) * 3


class ResNet18C4(_ResNetC4):
    """torchvision ResNet-18 stem + layer1..layer3, stride 16, 256 channels (:class:`_ResNetC4`).
    Not cheaper than ZF-5 (17.7 vs 15.3 GMAC at 688x917, ``torch.utils.flop_counter``), but a modern
    trunk whose ImageNet weights torchvision ships; with levels 6,3,2,1 its pooled width is ZF-5's
    12800.

    ``width_mult`` < 1 gives the same network at CPU width for training from scratch (0.25: 16/32/64
    channels, 64 at conv5 like ZF-5 x0.25): the same layers, strides and paddings, so the same
    projection constants; torchvision has no weights for it.

    Input: Tensor[N, 3, H, W], ``input_format = "rgb_imagenet"``. Output: Tensor[N, 256 w, Hs, Ws].
    RF centre of cell m: pixel ``16 m`` (0-based), receptive field 211 px.
    """

    out_channels = 256
    geometry = _resnet18_c4_geometry()
    proj_offset0 = rf_geometry(geometry)[1]  # 0.0
    tail_units = 1  # the last basic block of layer3 (its first one has stride 2)
    base_channels = (64, 128, 256)

    def __init__(self, width_mult: float = 1.0) -> None:
        from torchvision.models import resnet18

        if not (width_mult > 0 and math.isfinite(width_mult)):
            raise ValueError(f"ResNet18C4: width_mult must be a positive number, got {width_mult!r}")
        super().__init__(resnet18(weights=None) if width_mult == 1.0 else _narrow_resnet18_c4(width_mult))
        self.width_mult = float(width_mult)
        self.out_channels = self.layer3[-1].bn2.num_features


def _narrow_resnet18_c4(width_mult: float) -> nn.Module:
    """torchvision's ResNet-18 stem and layer1..layer3 with ``width_mult`` times the channels, built
    from its ``BasicBlock`` and initialised as ``torchvision.models.ResNet`` initialises them (He
    fan-out for convolutions, BatchNorm at identity)."""
    from types import SimpleNamespace

    from torchvision.models.resnet import BasicBlock, conv1x1

    c1, c2, c3 = (max(1, int(round(c * width_mult))) for c in ResNet18C4.base_channels)

    def layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None if stride == 1 and cin == cout else nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))

    net = SimpleNamespace(conv1=nn.Conv2d(3, c1, 7, 2, 3, bias=False), bn1=nn.BatchNorm2d(c1), relu=nn.ReLU(inplace=True),
                          maxpool=nn.MaxPool2d(3, 2, 1), layer1=layer(c1, c1, 1), layer2=layer(c1, c2, 2),
                          layer3=layer(c2, c3, 2))
    for part in (net.conv1, net.bn1, net.layer1, net.layer2, net.layer3):
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    return net


def _mobilenet_v3_c4_geometry() -> tuple[Layer, ...]:
    # the stem conv 3/2/1, then the depthwise conv of each inverted-residual block (its 1x1 expand
    # and project convs, and the squeeze-excitation's global average, change neither size nor
    # centre): torchvision's mobilenet_v3_large blocks 1-12, kernel / stride (padding (k - 1) / 2):
    # 3/1, 3/2, 3/1, 5/2, 5/1, 5/1, 3/2, then five 3/1; block 13 (stride 32) is cut off.
    kernels_strides = ((3, 1), (3, 2), (3, 1), (5, 2), (5, 1), (5, 1), (3, 2), (3, 1), (3, 1), (3, 1), (3, 1), (3, 1))
    return (Layer(3, 2, 1),) + tuple(Layer(k, s, (k - 1) // 2) for k, s in kernels_strides)


class MobileNetV3C4(nn.Module):
    """torchvision MobileNetV3-Large ``features[:13]`` (the stem and the 12 blocks up to stride 16),
    112 channels: the light trunk (1.9 GMAC at 688x917 against ZF-5's 15.3, ``torch.utils.flop_counter``;
    pooled width 5600 with levels 6,3,2,1).

    Parameter names equal torchvision's (``features.N.*``), so a torchvision ``mobilenet_v3_large``
    state_dict loads directly (its later blocks and ``classifier.*`` are ignored). Its blocks'
    squeeze-excitation multiplies each channel by a function of the whole image's mean, so a
    window's conv5 cells depend slightly on the rest of the image (as in torchvision's own detectors
    on this trunk). BatchNorm layers use their running statistics in ``eval()`` mode.

    Input: Tensor[N, 3, H, W], ``input_format = "rgb_imagenet"``. Output: Tensor[N, 112, Hs, Ws].
    RF centre of cell m: pixel ``16 m`` (0-based), receptive field 275 px through the convolutions.
    """

    stride = 16
    out_channels = 112
    input_format = "rgb_imagenet"
    proj_shrink = PROJ_SHRINK
    geometry = _mobilenet_v3_c4_geometry()
    proj_offset0 = rf_geometry(geometry)[1]  # 0.0

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_large

        self.features = mobilenet_v3_large(weights=None).features[:13]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MobileNetV3C4 expects Tensor[N, 3, H, W], got {tuple(x.shape)}")
        return self.features(x)  # (N, 112, Hs, Ws)

    tail_units = 5  # blocks 8-12 (block 7 has stride 2)

    def tail_modules(self, n: int) -> list[nn.Module]:
        """The last ``n`` inverted-residual blocks."""
        _check_tail(self, n)
        return list(self.features[13 - n:13])

    def forward_prefix(self, x: Tensor, n: int) -> Tensor:
        _check_tail(self, n)
        return self.features[: 13 - n](x)

    def forward_tail(self, x: Tensor, n: int) -> Tensor:
        _check_tail(self, n)
        return self.features[13 - n:13](x)  # (N, 112, Hs, Ws)


class TrunkPrefix(nn.Module):
    """A trunk without its last ``n`` units, as a module (what the cache runs when conv layers are
    fine-tuned). Shares the trunk's parameters.

    Input: Tensor[N, 3, H, W] in the trunk's ``input_format``. Output: Tensor[N, C', Hs, Ws], the
    input of the tail (stride 16 for every supported split).
    """

    def __init__(self, trunk: nn.Module, n: int) -> None:
        super().__init__()
        _check_tail(trunk, n)
        self.trunk, self.n = trunk, int(n)
        self.input_format, self.stride = trunk.input_format, trunk.stride
        self.width_mult = float(getattr(trunk, "width_mult", 1.0))
        convs = [m for t in trunk.tail_modules(n) for m in t.modules() if isinstance(m, nn.Conv2d)]
        self.out_channels = int(convs[0].in_channels) if convs else int(trunk.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk.forward_prefix(x, self.n)


def _check_tail(trunk: nn.Module, n: int) -> None:
    if not (isinstance(n, int) and 0 <= n <= trunk.tail_units):
        raise ValueError(f"{type(trunk).__name__}: the tail has 0..{trunk.tail_units} units, got {n!r}")


# ----------------------------------------------------------------------------------------------
# construction and weights

_TORCHVISION_WEIGHTS = {"vgg16": "VGG16_Weights", "resnet50": "ResNet50_Weights", "resnet18": "ResNet18_Weights",
                        "mobilenet_v3": "MobileNet_V3_Large_Weights"}
# keys of a full torchvision model that the trunk does not use (silently ignored on load)
_IGNORED_PREFIXES = {"vgg16": ("classifier.",), "resnet50": ("layer4.", "fc."), "resnet18": ("layer4.", "fc."),
                     "mobilenet_v3": tuple(f"features.{i}." for i in range(13, 17)) + ("classifier.",),
                     "zf5": ("fc6.", "fc7.", "fc8.", "cls_score."), "zf5_bn": ("fc6.", "fc7.", "fc8.", "cls_score.")}  # fc layers: read by the fine-tuning stage


def _arch_class(arch: str) -> type[nn.Module]:
    table = {"zf5": ZF5, "zf5_bn": ZF5BN, "vgg16": VGG16Conv5, "resnet50": ResNet50C4, "resnet18": ResNet18C4,
             "mobilenet_v3": MobileNetV3C4}
    if arch not in table:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return table[arch]


def conv5_size(arch: str, side: int) -> int:
    """conv5 side for an input side (height or width) of ``side`` pixels.

    ZF-5: 224 -> 13, 180 -> 10, 480 -> 29, 576 -> 35, 688 -> 42, 874 -> 53, 1200 -> 74 (spec §1).

    Args:
        arch: one of :data:`ARCHS`.
        side: input side in pixels.
    Returns:
        int: the conv5 side (0 when the input is too small for the trunk).
    """
    return _geometry_size(_arch_class(arch).geometry, side)


def _unwrap_state_dict(obj: Any, path: Path) -> Mapping[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("backbone", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise WeightsError(
        f"{path}: not a state_dict (expected a mapping of parameter names to tensors, or a dict "
        f"with a 'backbone' state_dict)"
    )


def _natural(key: str) -> list:
    """Sort key that orders ``features.10`` after ``features.9`` and ``conv10`` after ``conv9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _by_position(own: Mapping[str, Tensor], sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """``sd`` renamed to ``own``'s keys when the two are the same layers in another key style (the
    project's ``conv1..conv5`` and torchvision's ``features.N``): the same number of tensors, with
    equal shapes when both are taken in layer order. None when they are not."""
    theirs = sorted(sd, key=_natural)
    ours = sorted(own, key=_natural)
    if len(theirs) != len(ours):
        return None
    if any(tuple(sd[t].shape) != tuple(own[o].shape) for t, o in zip(theirs, ours)):
        return None
    return {o: sd[t] for t, o in zip(theirs, ours)}


def load_backbone_weights(module: nn.Module, state_dict: Mapping[str, Tensor], source: str,
                          ignore_prefixes: Sequence[str] = ()) -> None:
    """Copy ``state_dict`` into ``module`` strictly, with errors that name ``source``.

    Both key styles load: the module's own names, or the same layers under other names in layer
    order (``conv1.weight`` ... for ZF-5, torchvision's ``features.0.weight`` ..., matched by
    position and shape). Missing keys and shape mismatches raise :class:`WeightsError` listing the
    missing and the unexpected keys; extra keys under ``ignore_prefixes`` are dropped silently,
    other extra keys with a warning.
    """
    own = module.state_dict()
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    missing = [k for k in own if k not in sd]
    if missing:
        used = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore_prefixes))}
        renamed = _by_position(own, used)
        if renamed is None:
            unexpected = [k for k in used if k not in own]
            raise WeightsError(
                f"{source}: {len(missing)} parameter(s) of {type(module).__name__} are missing from the "
                f"file: {_listed(missing)}; unexpected key(s) in the file: {_listed(unexpected)}. Neither "
                f"its names nor its layers in order ({len(used)} tensors for {len(own)}) match; is it a "
                f"checkpoint of this arch and width?"
            )
        log.info("%s: %s's %d tensors loaded by layer order (the file names them e.g. %s)", source,
                 type(module).__name__, len(own), sorted(used, key=_natural)[:2])
        sd = renamed
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise WeightsError(
            f"{source}: shape mismatch for {len(bad)} parameter(s), e.g. {k}: file {got} vs model "
            f"{want} (a different width_mult or arch?)"
        )
    extra = [k for k in sd if k not in own and not k.startswith(tuple(ignore_prefixes))]
    if extra:
        log.warning("%s: ignoring %d key(s) the backbone does not have, e.g. %s", source, len(extra),
                    extra[:3])
    module.load_state_dict({k: sd[k] for k in own}, strict=True)


def _listed(keys: Sequence[str], n: int = 8) -> str:
    return "none" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _imagenet_state_dict(arch: str) -> tuple[Mapping[str, Tensor], str]:
    if arch not in _TORCHVISION_WEIGHTS:
        raise WeightsError(
            f"backbone weights='imagenet': torchvision has no ImageNet weights for {arch!r}. Train the "
            f"trunk with `sppnet classifier` and pass its checkpoint file as the weights, or "
            f"use weights='none'."
        )
    import torchvision.models as tvm

    weights = getattr(tvm, _TORCHVISION_WEIGHTS[arch]).IMAGENET1K_V1
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True), str(cached)
        except Exception as e:  # noqa: BLE001 - report the file, not a deep traceback
            raise WeightsError(f"{cached}: cannot read the cached ImageNet weights ({e}); delete it "
                               f"and download again") from None
    try:
        return weights.get_state_dict(progress=True, check_hash=True), str(cached)
    except Exception as e:  # noqa: BLE001 - offline machines land here
        raise WeightsError(
            f"cannot get ImageNet weights for {arch} ({type(e).__name__}: {e}). This machine is "
            f"probably offline. Download {weights.url} on a connected machine and either copy it to "
            f"{cached} (torch.hub cache, used automatically) or pass its path as the backbone weights "
            f"(backbone.weights=/path/{filename})."
        ) from None


INPUT_FORMATS = ("bgr255_mean128", "rgb_imagenet")


def declared_input_format(obj: Any, source: str) -> str | None:
    """The ``input_format`` a weights file (its loaded object) declares, or None.

    Raises:
        WeightsError: a declared format that is not one of :data:`INPUT_FORMATS`.
    """
    fmt = obj.get("input_format") if isinstance(obj, Mapping) else None
    if fmt is not None and fmt not in INPUT_FORMATS:
        raise WeightsError(f"{source}: declares input_format {fmt!r}; expected one of {', '.join(INPUT_FORMATS)}")
    return fmt


def weights_input_format(weights: str) -> str | None:
    """The input format that ``backbone.weights`` brings: ``rgb_imagenet`` for ``imagenet``, the
    file's declared ``input_format`` for a file, None for ``none`` or a file that declares none."""
    if weights == "imagenet":
        return "rgb_imagenet"
    path = Path(weights).expanduser()
    if weights == "none" or not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot read backbone weights ({type(e).__name__}: {e})") from None
    return declared_input_format(obj, str(path))


def resolve_input_format(arch: str, asked: str, declared: str | None, source: str) -> str:
    """The input format a trunk runs with: the weights' declared one, else the config's
    (``backbone.input_format``), else the arch's own (``auto``).

    Raises:
        WeightsError: the weights declare one format and the config asks for another.
    """
    if asked not in ("auto", *INPUT_FORMATS):
        raise ValueError(f"input_format must be 'auto' or one of {', '.join(INPUT_FORMATS)}, got {asked!r}")
    if declared is not None and asked != "auto" and declared != asked:
        raise WeightsError(f"{source}: the weights were trained on input_format {declared!r}, but "
                           f"backbone.input_format asks for {asked!r}; the trunk would see other pixels than it "
                           f"learnt on. Set backbone.input_format: {declared} (or auto)")
    return declared or (asked if asked != "auto" else _arch_class(arch).input_format)


def build_backbone(arch: str, width_mult: float = 1.0, weights: str = "none", input_format: str = "auto") -> nn.Module:
    """Build a trunk and load its weights.

    Args:
        arch: "zf5" (spec §1), "zf5_bn" (ZF-5 with BatchNorm for LRN), "vgg16" (conv5_3), "resnet50" or "resnet18" (through layer3), or
            "mobilenet_v3" (MobileNetV3-Large to stride 16).
        width_mult: channel multiplier of zf5, zf5_bn and resnet18 (:data:`WIDTH_ARCHS`); 1.0 for the
            other trunks and for ImageNet weights.
        weights: "none" (random init: spec §1 for ZF-5, torchvision's for the others); "imagenet"
            (torchvision weights API: the torch.hub cache, or a download on a connected machine);
            or a path to a local file holding a state_dict or ``{"backbone": state_dict}``, read
            with ``torch.load(weights_only=True)``; either key style (:func:`load_backbone_weights`).
        input_format: the pixels the trunk takes (``model.input_format``): "auto" = what the weights
            declare (a file's ``input_format``; torchvision's are ``rgb_imagenet``), else the arch's
            own (ZF-5 ``bgr255_mean128``, spec §2); or one of :data:`INPUT_FORMATS`, refused when
            the weights declare another.
    Returns:
        nn.Module with ``stride``, ``out_channels``, ``input_format``, ``proj_offset0``,
        ``proj_shrink`` and ``geometry``.
    Raises:
        ValueError: unknown arch or a width_mult the arch does not support.
        WeightsError: weights that cannot be found, read or matched (the message names the file).
    """
    cls = _arch_class(arch)
    if arch in WIDTH_ARCHS:
        model = cls(width_mult)
    else:
        if width_mult != 1.0:
            raise ValueError(f"backbone {arch}: width_mult must be 1.0 (got {width_mult}); only "
                             f"{', '.join(WIDTH_ARCHS)} have CPU-sized variants")
        model = cls()
    if width_mult != 1.0 and weights == "imagenet":
        raise ValueError(f"backbone {arch}: torchvision's ImageNet weights are for width_mult 1.0 (got {width_mult})")
    if weights == "none":
        model.input_format = resolve_input_format(arch, input_format, None, "weights 'none'")
        return model
    if weights == "imagenet":
        sd, source = _imagenet_state_dict(arch)
        declared = "rgb_imagenet"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone weights file not found: {path} (use 'none', 'imagenet' or "
                               f"the path of a state_dict file)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{path}: cannot read backbone weights ({type(e).__name__}: {e})") from None
        sd, source = _unwrap_state_dict(obj, path), str(path)
        declared = declared_input_format(obj, source)
    model.input_format = resolve_input_format(arch, input_format, declared, source)
    load_backbone_weights(model, sd, source, _IGNORED_PREFIXES[arch])
    return model
