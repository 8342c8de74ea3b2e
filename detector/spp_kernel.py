"""The sparse-table kernel behind :func:`detector.spp.spp_pool` on the CPU (and any device it is
asked to run on): many windows of one conv5 map -> their SPP bins, with argmax bookkeeping for the
backward when the map needs gradients.

Shape shorthand (one alphabet for the whole project):
    R: windows (proposals) in one image     C: conv5 channels
    H x W: conv5 size of one scale          B = sum(n*n): SPP bins (50 for levels 1, 2, 3, 6)
    D = C*B: pooled width

The bins are spec §4's (:func:`spp_bins`; :mod:`detector.spp` states the rule and the output layout).

How it is fast. (1) A 2-D sparse table ``T[kx, ky][y, x] = max of the block [x, x + 2^kx) x
[y, y + 2^ky)`` is built once per map (channels-last, so a block is a row of C contiguous values);
any bin is the max of four (overlapping) blocks. (2) A coarse level whose ``n`` divides a finer level
``m`` is the max over ``m/n x m/n`` blocks of the finer level's bins, exactly (level-m bins
``j*m/n .. (j+1)*m/n - 1`` span ``[floor(j*w/n), ceil((j+1)*w/n))``), so for (1, 2, 3, 6) only the
6x6 level touches the table; the others are k/k max pools of it (:func:`level_plan`). (3) Per chunk
of windows: one ``index_select`` of all four corner rows of every 6x6 bin, one ``amax`` over the
corners, three max pools, and one copy per level into the channel-major output. (4) The table and the
chunk buffers live in a per-thread workspace reused across calls (:mod:`detector.workspace`), so the
table is not page-faulted afresh on every call. (5) The output, which must be fresh since it is
returned, and the workspace are advised to use 2 MiB huge pages (:func:`detector.workspace.empty_large`),
because writing a fresh output of ~100 MB is dominated by 4 KiB page faults otherwise. A caller that consumes the output at
once (detection) can take it from the workspace too (``reuse_output``), which saves even the huge
pages' faults. (6) The table is built in the map's own dtype and the bins are converted only when
they are written to the output (``out_dtype``): the maximum commutes with any monotone rounding, so a
bfloat16 map (the bfloat16 trunk's) pools to exactly the float32 values of its float32 copy while
the table and the gathered corners take half the bytes.

Gradients: when the map needs them, :class:`SparseTableSPP` records the argmax cell of every output
in the forward and scatters the output gradient onto those cells in the backward. For training,
:func:`detector.spp.spp_pool` prefers ``torchvision.ops.roi_pool`` wherever its bins are exact (faster
for the few dozen windows per map of a fine-tuning batch), so this bookkeeping serves the levels
roi_pool would get wrong.

Measured times (where the time goes, the effect of each choice above, chunk sizes): BENCHMARKS.md,
section ``spp`` and the notes after it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from detector.workspace import empty_large as _empty_large
from detector.workspace import free_workspace
from detector.workspace import scratch as _scratch

__all__ = ["SparseTableSPP", "spp_bins", "level_plan", "free_spp_workspace"]


def free_spp_workspace() -> None:
    """Release the scratch buffers that :func:`detector.spp.spp_pool` (and the trunk's inference LRN)
    keep between calls on this thread (:func:`detector.workspace.free_workspace`)."""
    free_workspace()

# Gathered corner bytes per chunk of windows (4 rows of C values per bin of the finest level; the
# chunk's 6x6 result is a quarter of it). At one thread a small chunk keeps the gathered rows in
# cache at a few ATen calls per window (28 windows of the benchmark case). With several threads every
# parallel ATen call waits for its slowest thread, and on a shared machine a descheduled thread costs
# milliseconds per call, so larger chunks (fewer parallel calls: 9 for the benchmark case) are used;
# they cost a little when the machine is quiet. Sizes chosen by measurement: BENCHMARKS.md, spp notes.
_CHUNK_BYTES_ONE_THREAD = 4 << 20
_CHUNK_BYTES = 32 << 20  # with more than one intra-op thread
_CHUNK_BYTES_CUDA = 32 << 20


def _chunk_bytes(t: Tensor) -> int:
    """Gathered corner bytes per chunk of windows for a table like ``t``."""
    if t.is_cuda:
        return _CHUNK_BYTES_CUDA
    return _CHUNK_BYTES_ONE_THREAD if torch.get_num_threads() == 1 else _CHUNK_BYTES


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


def level_plan(levels: tuple[int, ...]) -> tuple[list[int], dict[int, int]]:
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


def _spp_forward(fmap: Tensor, windows: Tensor, levels: tuple[int, ...], with_index: bool,
                 out_dtype: torch.dtype | None = None, reuse_output: bool = False
                 ) -> tuple[Tensor, Tensor | None]:
    c, h, w = fmap.shape
    r = windows.shape[0]
    d = c * sum(n * n for n in levels)  # D
    out_dtype = out_dtype or fmap.dtype
    if reuse_output:
        out = _scratch("output", r * d, out_dtype, fmap.device).view(r, d)  # (R, D)
    else:
        out = _empty_large((r, d), fmap, out_dtype)  # (R, D)
    arg = _empty_large((r, d), fmap, torch.int64) if with_index else None
    if r == 0:
        return out, arg
    roots, parent = level_plan(levels)
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


class SparseTableSPP(torch.autograd.Function):
    """The sparse-table SPP as an autograd function: ``SparseTableSPP.apply(fmap, windows, levels)``.

    :func:`detector.spp.spp_pool`'s CPU path, without its checks and its choice of algorithm: it runs
    this kernel on any device (the benchmark times it on a GPU, where ``spp_pool`` calls roi_pool).
    The argmax cells are recorded only when ``fmap`` needs gradients.

    Args:
        fmap (Tensor[C, H, W]): any float dtype, any device.
        windows (Tensor[R, 4] int64): inclusive 0-based conv5 cells on ``fmap``'s device, each
            inside the map and non-empty (not checked here: :func:`detector.spp.spp_pool` checks).
        levels (tuple[int, ...]): positive pyramid levels, in concatenation order.
        out_dtype, reuse_output: as :func:`detector.spp.spp_pool` (only where ``fmap`` needs no
            gradients).
    Returns:
        Tensor[R, C * sum(n*n)]: exactly :func:`detector.spp.spp_pool`'s values and layout.
    """

    @staticmethod
    def forward(ctx, fmap: Tensor, windows: Tensor, levels: tuple[int, ...],  # type: ignore[override]
                out_dtype: torch.dtype | None = None, reuse_output: bool = False) -> Tensor:
        with_index = ctx.needs_input_grad[0]
        if with_index and ((out_dtype is not None and out_dtype != fmap.dtype) or reuse_output):
            raise ValueError("SparseTableSPP: out_dtype and reuse_output are for maps without gradients")
        out, arg = _spp_forward(fmap, windows, levels, with_index, out_dtype, reuse_output)
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
        return grad.view(c, h, w), None, None, None, None
