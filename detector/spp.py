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
[x, x + 2^kx) x [y, y + 2^ky)`` is built once per map (channels-last, so a block is a row of C
contiguous values); any bin is the max of four (overlapping) blocks. (2) A coarse level whose ``n``
divides a finer level ``m`` is the max over ``m/n x m/n`` blocks of the finer level's bins, exactly
(level-m bins ``j*m/n .. (j+1)*m/n - 1`` span ``[floor(j*w/n), ceil((j+1)*w/n))``), so for
(1, 2, 3, 6) only the 6x6 level touches the table; the others are k/k max pools of it. (3) Per
chunk of windows: one ``index_select`` of all four corner rows of every 6x6 bin, one ``amax`` over
the corners, three max pools, and one copy per level into the channel-major output. (4) The table
and the chunk buffers live in a per-thread workspace reused across calls (:class:`_Workspace`):
fresh, the ~38 MB table of the benchmark case was page-faulted on every call. (5) The output, which
must be fresh since it is returned, and the workspace are advised to use 2 MiB huge pages
(:func:`_empty_large`): a 102 MB output took ~60-80 ms of 4 KiB page faults to write, ~16-20 ms with
huge pages (``torch.empty(2000, 12800).fill_(0)``, one thread).

Where the time goes (benchmark case: 2000 windows on a [256, 42, 56] float32 map, one thread, the
shared 2-core test machine, before (5)): the fresh 102 MB output alone cost ~60 ms to page-fault and
write; the corner gathers (~295 MB of 1 KB rows out of the ~38 MB table) ~20 ms; the corner max
~10 ms; the max pools ~8 ms; the channel-major (transposing) copies ~10 ms beyond a plain write;
table and corner rows ~5 ms. ``tools/benchmark.py --only spp`` measures it against one ``torchvision.ops.roi_pool`` call
per level (:func:`spp_pool_roi_pool`); figures are in BENCHMARKS.md.

Gradients: when the map requires grad (training), the root levels (6 x 6 for 1, 2, 3, 6) go through
``torchvision.ops.roi_pool`` and the coarser levels are max pools of them, with autograd through
both: for the few dozen windows per map of a fine-tuning batch that is ~6x faster than the sparse
table with argmax bookkeeping (see :func:`spp_pool`). For root levels whose float32 bins roi_pool
would get wrong (:func:`_roi_pool_bins_exact`), :class:`_SPPFunction` records the argmax cell of
every output in the forward and scatters the output gradient onto those cells in the backward.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import threading
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
    "free_spp_workspace",
]

# Gathered corner bytes per chunk of windows (4 rows of C values per bin of the finest level; the
# chunk's 6x6 result is a quarter of it). At one thread, 4 MiB (28 windows, ~18 ATen calls each)
# balanced cache use against per-call overhead (1-8 MiB were within noise of each other). With
# several threads every parallel ATen call waits for its slowest thread, and on the shared 2-core
# test machine a thread descheduled by another process costs milliseconds per call, so the time
# grows with the number of calls: at a load average of 3-4 the 2-thread medians were 4.6 / 2.7 /
# 1.45 / 0.90 s for 4 / 8 / 16 / 32 MiB chunks. 32 MiB (9 chunks, as many parallel calls as the
# former 8 MiB-of-results setting) keeps that failure mode no worse than before, at a price when
# the machine is quiet: at a load average of ~1.4, 2-thread medians were 0.105 s (4 MiB) vs 0.135 s.
_CHUNK_BYTES_ONE_THREAD = 4 << 20
_CHUNK_BYTES = 32 << 20  # with more than one intra-op thread
_CHUNK_BYTES_CUDA = 32 << 20


def _chunk_bytes(t: Tensor) -> int:
    """Gathered corner bytes per chunk of windows for a table like ``t``."""
    if t.is_cuda:
        return _CHUNK_BYTES_CUDA
    return _CHUNK_BYTES_ONE_THREAD if torch.get_num_threads() == 1 else _CHUNK_BYTES


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc ``madvise`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _empty_large(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty`` whose pages the kernel backs with 2 MiB huge pages where it can.

    A large CPU tensor is a fresh ``mmap`` on every call, and its first write takes one page fault per
    4 KiB page: for the 102 MB output of 2000 windows x 12800 that was ~60-80 ms of ~140 ms (1 thread,
    this VM; ``torch.empty(2000, 12800).fill_(0)``: 81 ms, 16 ms after ``madvise(MADV_HUGEPAGE)``).
    So, on Linux CPU tensors of 4 MiB and more, the 2 MiB-aligned interior of the buffer is advised
    MADV_HUGEPAGE before anything is written (what PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` does for every
    allocation, here only for spp_pool's own buffers). Where THP is off or madvise fails, nothing changes.
    """
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    n = t.numel() * t.element_size()
    if t.is_cuda or n < 2 * _HUGE_PAGE:
        return t
    fn = _madvise()
    if fn is not None:
        a = t.data_ptr()
        lo = -(-a // _HUGE_PAGE) * _HUGE_PAGE
        hi = (a + n) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo and fn(lo, hi - lo, _MADV_HUGEPAGE) == 0:  # advice only: a failure leaves 4 KiB pages
            # fault the huge pages in from this thread, one element each (the kernel zeroes each
            # 2 MiB page once): left to a multi-threaded first write, threads faulting the same huge
            # page wait on each other (2 threads: 0.23-0.28 s instead of 0.11 s, measured)
            step = _HUGE_PAGE // t.element_size()
            t.view(-1)[(lo - a) // t.element_size()::step].zero_()
    return t


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


class _Workspace(threading.local):
    """Per-thread scratch buffers of the CPU forward, reused across calls (like a cuDNN workspace).

    The sparse table is ~38 MB for the benchmark case; allocated afresh it is page-faulted on every
    call (a fresh 38 MB tensor costs ~25 ms to first touch on the 2-core test machine, vs ~3 ms to
    refill). Buffers never leave :func:`_spp_forward` (results are copied into the fresh output), so
    reuse cannot alias a caller's tensor; one workspace per thread makes concurrent calls safe.
    Keyed by (name, dtype), CPU only (CUDA has its caching allocator). A buffer grows to the largest
    request up to ``_WORKSPACE_CAP_BYTES``; a larger request gets a fresh tensor that is not kept.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_WORKSPACE_CAP_BYTES = 256 << 20
_workspace = _Workspace()


def free_spp_workspace() -> None:
    """Release the scratch buffers that :func:`spp_pool` keeps between calls on this thread."""
    _workspace.buffers.clear()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 1-D uninitialised tensor of ``numel`` elements; on CPU a slice of a reused buffer."""
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes > _WORKSPACE_CAP_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)  # CUDA: its caching allocator reuses
    key = (name, dtype)
    buf = _workspace.buffers.get(key)
    if buf is None or buf.numel() < numel:
        _workspace.buffers.pop(key, None)  # drop the old one before allocating the larger one
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            buf = _empty_large((numel,), torch.empty(0, device=device), dtype)
        _workspace.buffers[key] = buf
    return buf[:numel]


def _sparse_table(fmap: Tensor, kx_max: int, ky_max: int, with_index: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """Block maxima of a channel-last map.

    Returns:
        table (Tensor[(kx_max+1)*(ky_max+1)*H*W, C]): row ``((kx*KY + ky)*H + y)*W + x`` is the max
            over cells [x, x+2^kx) x [y, y+2^ky); rows whose block leaves the map are left
            uninitialised and never read. Needs 2^kx_max <= W and 2^ky_max <= H. A view of the
            thread's workspace on CPU: valid until the next call.
        index (Tensor[same] int64 or None): flat cell ``y*W + x`` where that max sits.
    """
    c, h, w = fmap.shape
    kxn, kyn = kx_max + 1, ky_max + 1
    table = _scratch("table", kxn * kyn * h * w * c, fmap.dtype, fmap.device).view(kxn, kyn, h, w, c)
    table[0, 0].copy_(fmap.permute(1, 2, 0))  # (H, W, C)
    index = None
    if with_index:
        index = _scratch("index", kxn * kyn * h * w * c, torch.int64, fmap.device).view(kxn, kyn, h, w, c)
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


@functools.lru_cache(maxsize=16)
def _log2_lut(n: int) -> Tensor:
    """Tensor[n + 1] int64: floor(log2(i)) for i = 1..n (entry 0 unused, 0)."""
    return torch.tensor([max(i.bit_length() - 1, 0) for i in range(n + 1)], dtype=torch.int64)


def _corner_rows(windows: Tensor, m: int, h: int, w: int, ky_count: int) -> Tensor:
    """Table rows of the four corner blocks of every bin of level m.

    Returns:
        Tensor[R*m*m*4] int64: corner (a, b) (a: top/bottom block, b: left/right) of bin (r, i, j)
        at ``((r*m + i)*m + j)*4 + 2*a + b``, i.e. the four corners of a bin are adjacent.
    """
    r = windows.shape[0]
    x1, y1, x2, y2 = windows.unbind(1)
    xa, xb = spp_bins(x1, x2, m)  # (R, m) each
    ya, yb = spp_bins(y1, y2, m)  # (R, m) each
    lut = _log2_lut(max(h, w)).to(windows.device)
    kx, ky = lut[xb - xa], lut[yb - ya]  # (R, m) each: bin sides are 1..max(H, W)
    xs = torch.stack([xa, xb - (1 << kx)], dim=-1)  # (R, m, 2)
    ys = torch.stack([ya, yb - (1 << ky)], dim=-1)  # (R, m, 2)
    # row ((kx*KY + ky)*H + y)*W + x = [kx*KY*H*W + x] + [(ky*H + y)*W]: a column part and a row part
    col = kx.unsqueeze(-1) * (ky_count * h * w) + xs  # (R, m, 2)
    row = (ky.unsqueeze(-1) * h + ys) * w  # (R, m, 2)
    return (row.view(r, m, 1, 2, 1) + col.view(r, 1, m, 1, 2)).view(-1)  # (R*m*m*4)


def _spp_forward(fmap: Tensor, windows: Tensor, levels: tuple[int, ...], with_index: bool
                 ) -> tuple[Tensor, Tensor | None]:
    c, h, w = fmap.shape
    r = windows.shape[0]
    d = spp_out_dim(c, levels)
    out = _empty_large((r, d), fmap)  # (R, D)
    arg = _empty_large((r, d), fmap, torch.int64) if with_index else None
    if r == 0:
        return out, arg
    roots, parent = _plan(levels)
    # largest bin side read from the table (root levels only), per axis: ceil(w/n) + 1 cells
    min_root = min(roots)
    w_max = int((windows[:, 2] - windows[:, 0]).max()) + 1
    h_max = int((windows[:, 3] - windows[:, 1]).max()) + 1
    kx_max = (-(-w_max // min_root) + 1).bit_length() - 1  # floor(log2(ceil(w/n) + 1))
    ky_max = (-(-h_max // min_root) + 1).bit_length() - 1
    kx_max = min(kx_max, max(0, w.bit_length() - 1))
    ky_max = min(ky_max, max(0, h.bit_length() - 1))
    table, index = _sparse_table(fmap, kx_max, ky_max, with_index)
    rows = {m: _corner_rows(windows, m, h, w, ky_max + 1) for m in roots}  # (R*m*m*4) each
    # (level, its (R, C, n, n) channel-major block of the output), in concatenation order
    blocks: list[tuple[int, Tensor]] = []
    arg_blocks: list[Tensor] = []  # the same blocks of ``arg``
    off = 0
    for n in levels:
        blocks.append((n, out[:, off:off + c * n * n].view(r, c, n, n)))
        if arg is not None:
            arg_blocks.append(arg[:, off:off + c * n * n].view(r, c, n, n))
        off += c * n * n
    order = sorted(parent, reverse=True)  # finest derived level first: its parent is ready
    if index is None:
        _fill_values(table, rows, roots, order, parent, blocks, r, c)
        return out, None

    chunk = max(1, _chunk_bytes(table) // (max(roots) ** 2 * 4 * c * fmap.element_size()))
    channel_base = (torch.arange(c, device=fmap.device) * (h * w)).view(1, c, 1, 1)
    for s in range(0, r, chunk):
        rc = min(chunk, r - s)
        res: dict[int, tuple[Tensor, Tensor]] = {}
        for m in roots:
            cols = rows[m][s * m * m * 4:(s + rc) * m * m * 4]  # (rc*m*m*4)
            v = table.index_select(0, cols).view(-1, 4, c)  # (rc*m*m, 4, C)
            ix = index.index_select(0, cols).view(-1, 4, c)  # (rc*m*m, 4, C)
            best, a = v.max(dim=1, keepdim=True)  # (rc*m*m, 1, C)
            res[m] = (best.view(rc, m, m, c), ix.gather(1, a).view(rc, m, m, c))
        for n in order:
            pm = parent[n]
            k = pm // n
            pv, pi = res[pm]
            cand = pv.view(rc, n, k, n, k, c).permute(0, 1, 3, 5, 2, 4).reshape(rc, n, n, c, k * k)
            cand_ix = pi.view(rc, n, k, n, k, c).permute(0, 1, 3, 5, 2, 4).reshape(rc, n, n, c, k * k)
            best, a = cand.max(dim=-1, keepdim=True)  # (rc, n, n, C, 1)
            res[n] = (best.squeeze(-1), cand_ix.gather(-1, a).squeeze(-1))  # (rc, n, n, C) each
        for (n, dst), dst_arg in zip(blocks, arg_blocks):
            v, ix = res[n]
            dst[s:s + rc].copy_(v.permute(0, 3, 1, 2))  # (rc, C, n, n)
            dst_arg[s:s + rc].copy_(ix.permute(0, 3, 1, 2) + channel_base)  # (rc, C, n, n) c*H*W + cell
    return out, arg


def _fill_values(table: Tensor, rows: dict[int, Tensor], roots: list[int], order: list[int],
                 parent: dict[int, int], blocks: list[tuple[int, Tensor]], r: int, c: int) -> None:
    """The forward without argmax: writes every level of every window into ``blocks``.

    Per chunk of windows: one gather of all corner rows of each root level into a reused buffer,
    one max over the four corners (channels-last, vectorised over C), a k/k max pool per derived
    level, and one channel-major copy per level into the output. Views are made once, outside the
    loop: at ~70 chunks a call, per-chunk Python/ATen overhead is a visible part of the time.
    """
    m_top = max(roots)
    chunk = min(r, max(1, _chunk_bytes(table) // (m_top * m_top * 4 * c * table.element_size())))
    gather = _scratch("gather", chunk * m_top * m_top * 4 * c, table.dtype, table.device)
    corners = {m: gather[:chunk * m * m * 4 * c].view(chunk * m * m * 4, c) for m in roots}  # (rc*m*m*4, C)
    grouped = {m: g.view(chunk * m * m, 4, c) for m, g in corners.items()}  # (rc*m*m, 4, C)
    flat = {m: _scratch(f"level{m}", chunk * m * m * c, table.dtype, table.device).view(chunk * m * m, c)
            for m in roots}  # (rc*m*m, C) channels-last bins
    nchw = {m: v.view(chunk, m, m, c).permute(0, 3, 1, 2) for m, v in flat.items()}  # (rc, C, m, m) views
    for s in range(0, r, chunk):
        rc = min(chunk, r - s)
        res: dict[int, Tensor] = {}  # level -> (rc, C, n, n), any strides
        for m in roots:
            mm = m * m
            torch.index_select(table, 0, rows[m][s * mm * 4:(s + rc) * mm * 4], out=corners[m][:rc * mm * 4])
            torch.amax(grouped[m][:rc * mm], dim=1, out=flat[m][:rc * mm])  # (rc*m*m, C)
            res[m] = nchw[m][:rc]
        for n in order:
            k = parent[n] // n
            # level-n bins are k x k blocks of the parent's bins: a k/k max pool, on the
            # channels-last view (vectorised over C)
            res[n] = F.max_pool2d(res[parent[n]], k, k)  # (rc, C, n, n) channels-last
        for n, dst in blocks:
            dst[s:s + rc].copy_(res[n])  # (rc, C, n, n) channel-major


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
    if fmap.requires_grad and torch.is_grad_enabled():
        roots, _ = _plan(levels)
        if fmap.dtype in (torch.float32, torch.float64) and _roi_pool_bins_exact(tuple(roots), max(fmap.shape[-2:])):
            # Training (fine-tuning through the tail) pools a few dozen windows per map with
            # gradients: there the argmax-recording sparse table costs more than it saves, and
            # roi_pool on the root level (6x6) with the coarser levels as max pools of it (the same
            # exact identity the sparse-table path uses) is ~6x faster forward + backward (64
            # windows on digits conv5 maps of 14x16 .. 59x68 cells, 40 maps: 0.26 s vs 1.64 s, 2
            # threads; values equal). Gradients go to one argmax cell per output either way.
            return _roi_root_levels(fmap, windows, levels)
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


def _roi_root_levels(fmap: Tensor, windows: Tensor, levels: tuple[int, ...]) -> Tensor:
    """roi_pool on the root levels of :func:`_plan`, the derived levels as k/k max pools of their
    parent (autograd through both). -> Tensor[R, C * sum(n*n)], equal to :func:`spp_pool`."""
    from torchvision.ops import roi_pool

    roots, parent = _plan(levels)
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
