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

How :func:`spp_pool` is fast. (1) A 2-D sparse table ``T[kx, ky][y, x] = max of the block
[x, x + 2^kx) x [y, y + 2^ky)`` is built once per map; any bin is the max of four (overlapping)
blocks, i.e. four row gathers of C contiguous values. (2) A coarse level whose ``n`` divides a finer
level ``m`` is the max over ``m/n x m/n`` blocks of the finer level's bins, exactly (level-m bins
``j*m/n .. (j+1)*m/n - 1`` span ``[floor(j*w/n), ceil((j+1)*w/n))``), so for (1, 2, 3, 6) only the
6x6 level touches the table. ``tools/benchmark.py --only spp`` measures it against one
``torchvision.ops.roi_pool`` call per level (:func:`spp_pool_roi_pool`).

Gradients: :func:`spp_pool` is an ``autograd.Function``; the forward records the argmax cell of every
output when the map requires grad, and the backward scatters the output gradient onto those cells.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "spp_pool",
    "spp_pool_roi_pool",
    "spp_out_dim",
    "spp_bins",
    "SpatialPyramidPool",
]

# Gathered bytes per chunk of windows. Small chunks stay in cache (1 MiB: ~0.20 s vs ~0.30 s CPU
# for the benchmark case on one thread) but every chunk costs ~14 ATen calls, and with several
# threads each parallel call can wait for a descheduled thread: on the shared 2-core test machine
# 1 MiB chunks at 2 threads ran 7x slower than 8 MiB ones (tools/benchmark.py --only spp).
_CHUNK_BYTES_ONE_THREAD = 1 << 20
_CHUNK_BYTES = 8 << 20  # with more than one intra-op thread


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(n) for n in levels)
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"SPP levels must be a non-empty list of positive ints, got {levels!r}")
    return levels


def spp_out_dim(channels: int, levels: Sequence[int]) -> int:
    """Pooled width D = C * sum(n*n), e.g. 256 * 50 = 12800 for levels (1, 2, 3, 6)."""
    return int(channels) * sum(n * n for n in _check_levels(levels))


def spp_bins(starts: Tensor, ends: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Bin edges along one axis (spec §4), in integer arithmetic.

    Args:
        starts (Tensor[R] int64): first cell of each window (inclusive, 0-based).
        ends (Tensor[R] int64): last cell of each window (inclusive).
        n: bins per axis.
    Returns:
        (lo, hi) (Tensor[R, n] int64 each): bin j covers cells ``[lo[:, j], hi[:, j])``.
    """
    w = (ends - starts + 1).unsqueeze(1)  # (R, 1)
    j = torch.arange(n, device=starts.device, dtype=torch.int64).unsqueeze(0)  # (1, n)
    lo = starts.unsqueeze(1) + torch.div(j * w, n, rounding_mode="floor")  # (R, n)
    hi = starts.unsqueeze(1) - torch.div(-(j + 1) * w, n, rounding_mode="floor")  # (R, n) ceil
    return lo, hi


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


def _plan(levels: tuple[int, ...]) -> tuple[list[int], dict[int, int]]:
    """Which distinct levels read the sparse table (roots) and which derive from a finer level.

    parent[n] = the smallest other level that is a multiple of n (its bins are unions of the
    parent's bins); roots have no such level.
    """
    distinct = sorted(set(levels), reverse=True)
    parent: dict[int, int] = {}
    for n in distinct:
        multiples = [m for m in distinct if m > n and m % n == 0]
        if multiples:
            parent[n] = min(multiples)
    roots = [n for n in distinct if n not in parent]
    return roots, parent


def _log2_floor(x: Tensor) -> Tensor:
    """floor(log2(x)) for positive int64 x, exactly."""
    k = torch.zeros_like(x)
    y = x.clone()
    for shift in (32, 16, 8, 4, 2, 1):
        big = y >= (1 << shift)
        k += big.to(torch.int64) * shift
        y = torch.where(big, y >> shift, y)
    return k


def _sparse_table(fmap: Tensor, kx_max: int, ky_max: int, with_index: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """Block maxima of a channel-last map.

    Returns:
        table (Tensor[(kx_max+1)*(ky_max+1)*H*W, C]): row ``((kx*KY + ky)*H + y)*W + x`` is the max
            over cells [x, x+2^kx) x [y, y+2^ky); rows whose block leaves the map are left
            uninitialised and never read. Needs 2^kx_max <= W and 2^ky_max <= H.
        index (Tensor[same] int64 or None): flat cell ``y*W + x`` where that max sits.
    """
    c, h, w = fmap.shape
    kxn, kyn = kx_max + 1, ky_max + 1
    table = fmap.new_empty((kxn, kyn, h, w, c))  # (KX, KY, H, W, C)
    table[0, 0].copy_(fmap.permute(1, 2, 0))  # (H, W, C)
    index = None
    if with_index:
        index = torch.empty((kxn, kyn, h, w, c), dtype=torch.int64, device=fmap.device)
        index[0, 0].copy_(torch.arange(h * w, device=fmap.device).view(h, w, 1).expand(h, w, c))

    def step(src: tuple[int, int], dst: tuple[int, int], dim: int, half: int) -> None:
        # block 2^k = 2*half along `dim`: only the n_valid = size - 2*half + 1 start positions whose
        # block fits in the map are computed (and ever read); the rest of the plane stays unset
        v, o = table[src], table[dst]  # (H, W, C) each
        n_valid = v.shape[dim] - 2 * half + 1
        a, b = v.narrow(dim, 0, n_valid), v.narrow(dim, half, n_valid)
        if index is None:
            torch.maximum(a, b, out=o.narrow(dim, 0, n_valid))
            return
        i = index[src]
        take_b = b > a
        o.narrow(dim, 0, n_valid).copy_(torch.where(take_b, b, a))
        index[dst].narrow(dim, 0, n_valid).copy_(
            torch.where(take_b, i.narrow(dim, half, n_valid), i.narrow(dim, 0, n_valid)))

    for kx in range(kxn):
        if kx > 0:
            step((kx - 1, 0), (kx, 0), 1, 1 << (kx - 1))  # widen along x
        for ky in range(1, kyn):
            step((kx, ky - 1), (kx, ky), 0, 1 << (ky - 1))  # then along y
    table = table.view(-1, c)  # (KX*KY*H*W, C)
    return table, (None if index is None else index.view(-1, c))


def _corner_rows(windows: Tensor, m: int, h: int, w: int, ky_count: int) -> Tensor:
    """Table rows of the four corner blocks of every bin of level m.

    Returns:
        Tensor[4, R*m*m] int64: for corner a, bin (r, i, j) at column ``(r*m + i)*m + j``.
    """
    r = windows.shape[0]
    x1, y1, x2, y2 = windows.unbind(1)
    xa, xb = spp_bins(x1, x2, m)  # (R, m) each
    ya, yb = spp_bins(y1, y2, m)  # (R, m) each
    kx, ky = _log2_floor(xb - xa), _log2_floor(yb - ya)  # (R, m) each
    xs = torch.stack([xa, xb - (1 << kx)], dim=-1)  # (R, m, 2)
    ys = torch.stack([ya, yb - (1 << ky)], dim=-1)  # (R, m, 2)
    plane = kx.view(r, 1, m, 1, 1) * ky_count + ky.view(r, m, 1, 1, 1)  # (R, m, m, 1, 1)
    rows = (plane * h + ys.view(r, m, 1, 2, 1)) * w + xs.view(r, 1, m, 1, 2)  # (R, m, m, 2, 2)
    return rows.reshape(r * m * m, 4).t().contiguous()  # (4, R*m*m)


def _spp_forward(fmap: Tensor, windows: Tensor, levels: tuple[int, ...], with_index: bool
                 ) -> tuple[Tensor, Tensor | None]:
    c, h, w = fmap.shape
    r = windows.shape[0]
    d = spp_out_dim(c, levels)
    out = fmap.new_empty((r, d))  # (R, D)
    arg = torch.empty((r, d), dtype=torch.int64, device=fmap.device) if with_index else None
    if r == 0:
        return out, arg
    roots, parent = _plan(levels)
    # largest bin side read from the table (root levels only), per axis: ceil(w/n) + 1 cells
    widths = windows[:, 2] - windows[:, 0] + 1
    heights = windows[:, 3] - windows[:, 1] + 1
    min_root = min(roots)
    kx_max = int(_log2_floor(1 - torch.div(-widths.max(), min_root, rounding_mode="floor")).item())
    ky_max = int(_log2_floor(1 - torch.div(-heights.max(), min_root, rounding_mode="floor")).item())
    kx_max = min(kx_max, max(0, w.bit_length() - 1))
    ky_max = min(ky_max, max(0, h.bit_length() - 1))
    table, index = _sparse_table(fmap, kx_max, ky_max, with_index)
    rows = {m: _corner_rows(windows, m, h, w, ky_max + 1) for m in roots}  # (4, R*m*m) each
    offsets: dict[int, list[int]] = {}
    off = 0
    for n in levels:
        offsets.setdefault(n, []).append(off)
        off += c * n * n
    order = sorted(parent, reverse=True)  # finest derived level first: its parent is ready
    budget = _CHUNK_BYTES_ONE_THREAD if torch.get_num_threads() == 1 and not fmap.is_cuda else _CHUNK_BYTES
    chunk = max(1, budget // (max(roots) ** 2 * c * fmap.element_size()))
    channel_base = (torch.arange(c, device=fmap.device) * (h * w)).view(1, c, 1, 1) if with_index else None
    if not with_index:  # gather buffers reused by every chunk (no fresh pages per chunk)
        bufs = {m: (fmap.new_empty((min(chunk, r) * m * m, c)), fmap.new_empty((min(chunk, r) * m * m, c)))
                for m in roots}
    for s in range(0, r, chunk):
        rc = min(chunk, r - s)
        res: dict[int, tuple[Tensor, Tensor | None]] = {}
        for m in roots:
            cols = rows[m][:, s * m * m:(s + rc) * m * m]  # (4, rc*m*m)
            if index is None:
                v, tmp = (b[: rc * m * m] for b in bufs[m])  # (rc*m*m, C) each
                torch.index_select(table, 0, cols[0], out=v)
                for corner in (1, 2, 3):
                    torch.index_select(table, 0, cols[corner], out=tmp)
                    torch.maximum(v, tmp, out=v)
                res[m] = (v.view(rc, m, m, c), None)
            else:
                v = table.index_select(0, cols.t().reshape(-1)).view(-1, 4, c)  # (rc*m*m, 4, C)
                ix = index.index_select(0, cols.t().reshape(-1)).view(-1, 4, c)  # (rc*m*m, 4, C)
                best, a = v.max(dim=1, keepdim=True)  # (rc*m*m, 1, C)
                res[m] = (best.view(rc, m, m, c), ix.gather(1, a).view(rc, m, m, c))
        for n in order:
            pm = parent[n]
            k = pm // n
            pv, pi = res[pm]
            if pi is None:
                # level-n bins are k x k blocks of level-pm bins: a k/k max pool, run on the
                # channels-last view (vectorised over C)
                pooled = F.max_pool2d(pv.permute(0, 3, 1, 2), k, k)  # (rc, C, n, n) channels-last
                res[n] = (pooled.permute(0, 2, 3, 1), None)  # (rc, n, n, C)
            else:
                blocks = pv.view(rc, n, k, n, k, c).permute(0, 1, 3, 5, 2, 4).reshape(rc, n, n, c, k * k)
                bi = pi.view(rc, n, k, n, k, c).permute(0, 1, 3, 5, 2, 4).reshape(rc, n, n, c, k * k)
                best, a = blocks.max(dim=-1, keepdim=True)  # (rc, n, n, C, 1)
                res[n] = (best.squeeze(-1), bi.gather(-1, a).squeeze(-1))  # (rc, n, n, C) each
        for n, (v, ix) in res.items():
            for o in offsets.get(n, []):
                dst = out[s:s + rc, o:o + c * n * n].view(rc, c, n, n)  # (rc, C, n, n)
                dst.copy_(v.permute(0, 3, 1, 2))  # (rc, C, n, n)
                if arg is not None:
                    cells = ix.permute(0, 3, 1, 2) + channel_base  # (rc, C, n, n) flat c*H*W + cell
                    arg[s:s + rc, o:o + c * n * n].view(rc, c, n, n).copy_(cells)  # (rc, C, n, n)
    return out, arg


class _SPPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fmap: Tensor, windows: Tensor, levels: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        with_index = ctx.needs_input_grad[0]
        out, arg = _spp_forward(fmap, windows, levels, with_index)
        ctx.fmap_shape = fmap.shape
        if with_index:
            ctx.save_for_backward(arg)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (arg,) = ctx.saved_tensors
        c, h, w = ctx.fmap_shape
        grad = grad_out.new_zeros(c * h * w)
        grad.index_add_(0, arg.reshape(-1), grad_out.reshape(-1))
        return grad.view(c, h, w), None, None


def spp_pool(fmap: Tensor, windows: Tensor, levels: Sequence[int] = (1, 2, 3, 6)) -> Tensor:
    """Spatial pyramid pooling of many windows of one conv5 map (spec §4).

    Args:
        fmap (Tensor[C, H, W]): conv5 map of one image at one scale (any float dtype, any device).
        windows (Tensor[R, 4] int64): inclusive 0-based conv5 cells ``(x1, y1, x2, y2)`` with
            ``0 <= x1 <= x2 < W`` and ``0 <= y1 <= y2 < H`` (from :func:`detector.projection.project_boxes`).
        levels: pyramid levels n, in fc6's concatenation order (spec: 1, 2, 3, 6).
    Returns:
        Tensor[R, C * sum(n*n)]: same dtype and device as ``fmap``; for each level, the [C, n, n]
        bin maxima flattened channel-major, levels concatenated in the order given. Differentiable
        with respect to ``fmap``.
    Raises:
        ValueError: wrong shapes or dtypes, or a window that is empty or leaves the map.
    """
    levels = _check_levels(levels)
    _check_inputs(fmap, windows)
    windows = windows.to(fmap.device)
    if fmap.is_cuda and fmap.dtype == torch.float32 and _roi_pool_bins_exact(levels, max(fmap.shape[-2:])):
        # On a GPU torchvision's roi_pool kernel is faster than the sparse table (H200, 2000 windows on
        # [256, 42, 56]: 1.66 ms vs 4.02 ms, BENCHMARKS.md "gpu"), and for these levels and sides its
        # float32 bin edges equal the spec's integer ones exactly (checked by _roi_pool_bins_exact).
        return _roi_pool_levels(fmap, windows, levels)
    return _SPPFunction.apply(fmap, windows, levels)


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


def _roi_pool_levels(fmap: Tensor, windows: Tensor, levels: tuple[int, ...]) -> Tensor:
    """roi_pool per level + cat, on inputs already checked. -> Tensor[R, C * sum(n*n)]."""
    from torchvision.ops import roi_pool

    boxes = [windows.to(device=fmap.device, dtype=fmap.dtype)]
    x = fmap.unsqueeze(0)  # (1, C, H, W)
    pooled = [roi_pool(x, boxes, output_size=(n, n), spatial_scale=1.0).flatten(1)  # (R, C*n*n)
              for n in levels]
    return torch.cat(pooled, dim=1)  # (R, D)


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
