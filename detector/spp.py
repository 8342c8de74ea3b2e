"""Spatial pyramid pooling: any window of a conv5 map -> a fixed-length vector (spec §4).

Shape shorthand (one alphabet for the whole project):
    R: windows (proposals) in one image     C: conv5 channels
    H x W: conv5 size of one scale          B = sum(n*n): SPP bins (50 for levels 1, 2, 3, 6)
    D = C*B: pooled width                   N: images in a batch (whole-map pooling only)

Bins (spec §4). A window of ``w = x2 - x1 + 1`` cells starting at cell ``x1`` (0-based, inclusive
window) is cut into ``n`` column bins; bin ``j`` covers the cells ``[x1 + floor(j*w/n),
x1 + ceil((j+1)*w/n))`` (end-exclusive), rows alike. Left edges are floored and right edges ceiled in
integer arithmetic, so bins are never empty and may overlap. Each bin takes the max over its cells.
Levels are concatenated in the order given; inside a level the index is ``c*n*n + row*n + col``
(channel-major flatten of a [C, n, n] tensor).

The released code starts the max at 0, which equals the true max on post-ReLU maps; :func:`spp_pool`
returns the true max, so it is also exact on maps with negative values.

On the CPU the windows are pooled by a sparse-table kernel (:mod:`detector.spp_kernel`, which also
explains why it is fast); :func:`spp_pool_roi_pool` is the obvious composition of one
``torchvision.ops.roi_pool`` call per level, kept as the speed baseline and the cross-check.
``tools/benchmark.py --only spp`` measures one against the other; figures are in BENCHMARKS.md.

Which path :func:`spp_pool` takes: on a GPU with float32 maps, roi_pool per level wherever its
float32 bins equal the spec's (:func:`_roi_pool_bins_exact`), since it is faster there. When the map
requires grad (training), the root levels (6 x 6 for 1, 2, 3, 6) go through roi_pool and the coarser
levels are max pools of them, with autograd through both, again only where roi_pool's bins are exact.
Everything else runs the sparse table (:class:`detector.spp_kernel.SparseTableSPP`), which records
the argmax cell of every output for the backward when the map requires grad.
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from detector.spp_kernel import SparseTableSPP, free_spp_workspace, level_plan, spp_bins

__all__ = [
    "spp_pool",
    "spp_pool_roi_pool",
    "spp_out_dim",
    "spp_bins",
    "SpatialPyramidPool",
    "free_spp_workspace",
]


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(n) for n in levels)
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"SPP levels must be a non-empty list of positive ints, got {levels!r}")
    return levels


def spp_out_dim(channels: int, levels: Sequence[int]) -> int:
    """Pooled width D = C * sum(n*n), e.g. 256 * 50 = 12800 for levels (1, 2, 3, 6)."""
    return int(channels) * sum(n * n for n in _check_levels(levels))


def _check_inputs(fmap: Tensor, windows: Tensor) -> None:
    if fmap.ndim != 3:
        raise ValueError(f"spp_pool: fmap must be Tensor[C, H, W], got shape {tuple(fmap.shape)}")
    if not fmap.is_floating_point():
        raise ValueError(f"spp_pool: fmap must be a float tensor, got {fmap.dtype}")
    if windows.ndim != 2 or windows.shape[1] != 4:
        raise ValueError(f"spp_pool: windows must be Tensor[R, 4], got shape {tuple(windows.shape)}")
    if windows.dtype != torch.int64:
        raise ValueError(f"spp_pool: windows must be int64 conv5 cells, got {windows.dtype}")
    if windows.shape[0] == 0:
        return
    _, h, w = fmap.shape
    x1, y1, x2, y2 = windows.unbind(1)
    ok = (x1 >= 0) & (y1 >= 0) & (x2 >= x1) & (y2 >= y1) & (x2 < w) & (y2 < h)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise ValueError(
            f"spp_pool: window {bad} = {windows[bad].tolist()} is empty or outside the {h}x{w} map; "
            f"windows must be inclusive cells with 0 <= x1 <= x2 < W and 0 <= y1 <= y2 < H "
            f"(use detector.projection.project_boxes)"
        )


def spp_pool(fmap: Tensor, windows: Tensor, levels: Sequence[int] = (1, 2, 3, 6), *,
             out_dtype: torch.dtype | None = None, reuse_output: bool = False) -> Tensor:
    """Spatial pyramid pooling of many windows of one conv5 map (spec §4).

    Args:
        fmap (Tensor[C, H, W]): conv5 map of one image at one scale (any float dtype, any device).
        windows (Tensor[R, 4] int64): inclusive 0-based conv5 cells ``(x1, y1, x2, y2)`` with
            ``0 <= x1 <= x2 < W`` and ``0 <= y1 <= y2 < H`` (from :func:`detector.projection.project_boxes`).
        levels: pyramid levels n, in fc6's concatenation order (spec: 1, 2, 3, 6).
        out_dtype: the result's float dtype (default ``fmap``'s). The result equals
            ``spp_pool(fmap, windows, levels).to(out_dtype)`` exactly (a maximum commutes with
            rounding), but without the map's gradients the bins are converted only as they are
            written, so a bfloat16 or float16 map pools at half the bytes (BENCHMARKS.md, ``detect``).
        reuse_output: the result is a view of a buffer that this thread reuses (no fresh ~100 MB
            output to page-fault per call), valid only until this thread's next ``reuse_output``
            call: for a caller that consumes it at once, as detection does. CPU maps without
            gradients only (elsewhere it is ignored: CUDA's caching allocator already reuses memory).
    Returns:
        Tensor[R, C * sum(n*n)]: ``out_dtype`` on ``fmap``'s device; for each level, the [C, n, n]
        bin maxima flattened channel-major, levels concatenated in the order given. Differentiable
        with respect to ``fmap``.
    Raises:
        ValueError: wrong shapes or dtypes, or a window that is empty or leaves the map.
    """
    levels = _check_levels(levels)
    _check_inputs(fmap, windows)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"spp_pool: out_dtype must be a float dtype, got {out_dtype}")
    windows = windows.to(fmap.device)
    out_dtype = out_dtype or fmap.dtype
    grad = fmap.requires_grad and torch.is_grad_enabled()
    if grad or (fmap.is_cuda and out_dtype == torch.float32):
        # gradients flow through the conversion; on a GPU the map is converted (a few MB) so that
        # the roi_pool path below can take it
        fmap = fmap.to(out_dtype)
    reuse_output = bool(reuse_output) and not grad and fmap.device.type == "cpu"
    if fmap.is_cuda and fmap.dtype == torch.float32 and _roi_pool_bins_exact(levels, max(fmap.shape[-2:])):
        # On a GPU torchvision's roi_pool kernel is faster than the sparse table (BENCHMARKS.md, "gpu"),
        # and for these levels and sides its float32 bin edges equal the spec's integer ones exactly
        # (checked by _roi_pool_bins_exact).
        return _roi_pool_levels(fmap, windows, levels)
    if fmap.requires_grad and torch.is_grad_enabled():
        roots, _ = level_plan(levels)
        if fmap.dtype in (torch.float32, torch.float64) and _roi_pool_bins_exact(tuple(roots), max(fmap.shape[-2:])):
            # Training (fine-tuning through the tail) pools a few dozen windows per map with
            # gradients: there the argmax-recording sparse table costs more than it saves, and
            # roi_pool on the root level (6x6) with the coarser levels as max pools of it (the same
            # exact identity the sparse-table path uses) is several times faster forward + backward
            # with equal values (BENCHMARKS.md, spp notes). Gradients go to one argmax cell per
            # output either way.
            return _roi_root_levels(fmap, windows, levels)
    return SparseTableSPP.apply(fmap, windows, levels, out_dtype, reuse_output)


@functools.lru_cache(maxsize=64)
def _roi_pool_bins_exact(levels: tuple[int, ...], max_side: int) -> bool:
    """Whether torchvision roi_pool's float32 bins equal spec §4's integer bins for every window side
    1..max_side and level: roi_pool takes ``floor(j * float(w / n))`` and ``ceil((j + 1) * float(w / n))``
    in float32, which is off by one for some sides (n = 7 from w = 57, n = 13 from w = 7; never for
    n in 1..6 or 8 below 5000)."""
    f32 = np.float32
    for n in levels:
        for w in range(1, int(max_side) + 1):
            b = f32(w) / f32(n)
            for j in range(n):
                if (math.floor(f32(j) * b) != (j * w) // n
                        or math.ceil(f32(j + 1) * b) != -((-(j + 1) * w) // n)):
                    return False
    return True


def spp_pool_roi_pool(fmap: Tensor, windows: Tensor, levels: Sequence[int] = (1, 2, 3, 6)) -> Tensor:
    """The obvious composition: one ``torchvision.ops.roi_pool`` call per level.

    Same bins as :func:`spp_pool` for integer windows wherever roi_pool's float bin edges are exact
    (roi_pool rounds the box, adds +1 to the width and floors/ceils ``j * float(w / n)``; see
    :func:`_roi_pool_bins_exact`: always for n = 1..6 and 8 below 5000 cells, not for some sides at
    n = 7 or 13). Kept as the speed baseline of ``tools/benchmark.py``, as a cross-check in the
    tests, and as spp_pool's CUDA path where it is exact.

    Args:
        fmap (Tensor[C, H, W]); windows (Tensor[R, 4] int64): as :func:`spp_pool`.
    Returns:
        Tensor[R, C * sum(n*n)].
    """
    levels = _check_levels(levels)
    _check_inputs(fmap, windows)
    return _roi_pool_levels(fmap, windows, levels)


def _roi_pool_levels(fmap: Tensor, windows: Tensor, levels: List[int]) -> Tensor:
    """roi_pool per level + cat, on inputs already checked. -> Tensor[R, C * sum(n*n)]. TorchScript
    compiles it (the exported program of ``detector.export`` pools with it)."""
    boxes = [windows.to(device=fmap.device, dtype=fmap.dtype)]
    x = fmap.unsqueeze(0)  # (1, C, H, W)
    pooled = [roi_pool(x, boxes, output_size=(n, n), spatial_scale=1.0).flatten(1)  # (R, C*n*n)
              for n in levels]
    return torch.cat(pooled, dim=1)  # (R, D)


def _roi_root_levels(fmap: Tensor, windows: Tensor, levels: tuple[int, ...]) -> Tensor:
    """roi_pool on the root levels of :func:`detector.spp_kernel.level_plan`, the derived levels as
    k/k max pools of their parent (autograd through both). -> Tensor[R, C * sum(n*n)], equal to
    :func:`spp_pool`."""
    from torchvision.ops import roi_pool

    roots, parent = level_plan(levels)
    boxes = [windows.to(device=fmap.device, dtype=fmap.dtype)]
    x = fmap.unsqueeze(0)  # (1, C, H, W)
    res = {m: roi_pool(x, boxes, output_size=(m, m), spatial_scale=1.0) for m in roots}  # (R, C, m, m)
    for n in sorted(parent, reverse=True):  # finest first: its parent is ready
        k = parent[n] // n
        res[n] = F.max_pool2d(res[parent[n]], k, k)  # (R, C, n, n)
    return torch.cat([res[n].flatten(1) for n in levels], dim=1)  # (R, D)


class SpatialPyramidPool(nn.Module):
    """Whole-map SPP: a feature map of any size -> a fixed-length vector (classification, paper §2.3).

    Uses the same adaptive bins as :func:`spp_pool` with the window = the whole map, i.e.
    ``adaptive_max_pool2d`` per level (its bins are ``[floor(j*H/n), ceil((j+1)*H/n))``, spec §4).
    The fixed window/stride rule ``ceil(a/n)/floor(a/n)`` of the paper is not used: it gives 9
    outputs for a=10, n=6.

    Args:
        levels: pyramid levels in concatenation order (spec: 1, 2, 3, 6).
    Input: Tensor[N, C, H, W]. Output: Tensor[N, C * sum(n*n)].
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.levels = _check_levels(levels)

    def out_dim(self, channels: int) -> int:
        """Output width for ``channels`` input channels."""
        return spp_out_dim(channels, self.levels)

    def forward(self, fmap: Tensor) -> Tensor:
        if fmap.ndim != 4:
            raise ValueError(f"SpatialPyramidPool expects Tensor[N, C, H, W], got {tuple(fmap.shape)}")
        pooled = [F.adaptive_max_pool2d(fmap, n).flatten(1) for n in self.levels]  # (N, C*n*n) each
        return torch.cat(pooled, dim=1)  # (N, D)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
