"""spp_pool and its sparse-table kernel (detector.spp_kernel) against a slow reference loop of spec §4,
gradcheck, roi_pool cross-check, whole-map SPP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detector.spp import SpatialPyramidPool, spp_bins, spp_out_dim, spp_pool, spp_pool_roi_pool
from detector.spp_kernel import SparseTableSPP


def reference_spp(fmap: torch.Tensor, windows: torch.Tensor, levels) -> torch.Tensor:
    """Spec §4 written out: integer floor/ceil bin edges, max per bin, channel-major per level."""
    c = fmap.shape[0]
    rows = []
    for x1, y1, x2, y2 in windows.tolist():
        w, h = x2 - x1 + 1, y2 - y1 + 1
        feats = []
        for n in levels:
            v = torch.empty(c, n, n, dtype=fmap.dtype)
            for i in range(n):
                ya, yb = y1 + (i * h) // n, y1 + -((-(i + 1) * h) // n)
                for j in range(n):
                    xa, xb = x1 + (j * w) // n, x1 + -((-(j + 1) * w) // n)
                    assert xb > xa and yb > ya  # never empty
                    v[:, i, j] = fmap[:, ya:yb, xa:xb].amax(dim=(1, 2))
            feats.append(v.flatten())
        rows.append(torch.cat(feats))
    return torch.stack(rows) if rows else fmap.new_zeros((0, spp_out_dim(c, levels)))


def random_windows(h: int, w: int, r: int, g: torch.Generator) -> torch.Tensor:
    xs = torch.randint(0, w, (r, 2), generator=g).sort(dim=1).values
    ys = torch.randint(0, h, (r, 2), generator=g).sort(dim=1).values
    edge = torch.tensor([[0, 0, w - 1, h - 1], [w - 1, h - 1, w - 1, h - 1], [0, 0, 0, 0],
                         [0, h - 1, w - 1, h - 1], [w - 1, 0, w - 1, h - 1], [w // 2, h // 2, w // 2, h // 2]])
    return torch.cat([torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1), edge])  # (r+6, 4)


def test_bins_hand_cases():
    # w = 7 cells from x1 = 2, n = 3: [2 + 0, 2 + 3), [2 + 2, 2 + 5), [2 + 4, 2 + 7): overlapping
    lo, hi = spp_bins(torch.tensor([2]), torch.tensor([8]), 3)
    assert lo.tolist() == [[2, 4, 6]] and hi.tolist() == [[5, 7, 9]]
    # a 1-cell window: every bin is that cell
    lo, hi = spp_bins(torch.tensor([5]), torch.tensor([5]), 6)
    assert lo.tolist() == [[5] * 6] and hi.tolist() == [[6] * 6]
    # w = 12, n = 6: a clean split
    lo, hi = spp_bins(torch.tensor([0]), torch.tensor([11]), 6)
    assert lo.tolist() == [[0, 2, 4, 6, 8, 10]] and hi.tolist() == [[2, 4, 6, 8, 10, 12]]


@pytest.mark.parametrize("shape", [(3, 7, 9), (4, 1, 1), (2, 13, 13), (2, 23, 31)])
@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (6, 3, 2, 1), (1,), (4, 2), (5, 3, 1), (2, 2)])
def test_spp_pool_equals_reference(shape, levels):
    g = torch.Generator().manual_seed(hash((shape, levels)) % 2**31)
    fmap = torch.randn(*shape, generator=g)  # negative values too: a true max, not max(0, .)
    windows = random_windows(shape[1], shape[2], 20, g)
    want = reference_spp(fmap, windows, levels)
    got = spp_pool(fmap, windows, levels)
    assert got.shape == (windows.shape[0], spp_out_dim(shape[0], levels))
    assert torch.equal(got, want)
    # the training path (map needs gradients: roi_pool on the root levels + max pools) and the
    # sparse table that records argmax cells (its fallback) give the same values
    assert torch.equal(spp_pool(fmap.clone().requires_grad_(), windows, levels).detach(), want)
    assert torch.equal(SparseTableSPP.apply(fmap.clone().requires_grad_(), windows, tuple(levels)).detach(), want)


def test_spp_pool_layout_is_channel_major_in_level_order():
    fmap = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)  # c*6 + y*3 + x
    out = spp_pool(fmap, torch.tensor([[0, 0, 2, 1]]), (1, 2))
    # level 1: max per channel; level 2: bins x [0,2),[1,3), y [0,1),[1,2)
    assert out.tolist() == [[5, 11, 1, 2, 4, 5, 7, 8, 10, 11]]


def test_spp_pool_matches_roi_pool_composition():
    g = torch.Generator().manual_seed(1)
    fmap = torch.relu(torch.randn(4, 42, 56, generator=g))
    windows = random_windows(42, 56, 100, g)
    assert torch.equal(spp_pool(fmap, windows), spp_pool_roi_pool(fmap, windows))


def test_spp_pool_gradcheck():
    g = torch.Generator().manual_seed(2)
    fmap = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    windows = torch.tensor([[0, 0, 4, 3], [1, 2, 3, 3], [4, 3, 4, 3], [0, 0, 0, 3], [2, 1, 4, 2]])
    assert torch.autograd.gradcheck(lambda t: spp_pool(t, windows, (1, 2, 3, 6)), (fmap,))
    assert torch.autograd.gradcheck(lambda t: spp_pool(t, windows, (3, 5)), (fmap,), fast_mode=True)


def test_spp_pool_gradient_counts_argmax_hits():
    # distinct values: the gradient of sum(out) at a cell = how many outputs took their max there
    g = torch.Generator().manual_seed(3)
    fmap = torch.randperm(3 * 5 * 6, generator=g).view(3, 5, 6).double().requires_grad_()
    windows = random_windows(5, 6, 10, g)
    spp_pool(fmap, windows).sum().backward()
    ref = fmap.detach().clone().requires_grad_()
    reference_spp(ref, windows, (1, 2, 3, 6)).sum().backward()
    assert torch.equal(fmap.grad, ref.grad)
    # the argmax-recording sparse table (the fallback for levels roi_pool cannot bin exactly)
    table = fmap.detach().clone().requires_grad_()
    SparseTableSPP.apply(table, windows, (1, 2, 3, 6)).sum().backward()
    assert torch.equal(table.grad, ref.grad)


def test_spp_pool_dtypes_and_empty():
    g = torch.Generator().manual_seed(4)
    fmap = torch.randn(4, 9, 11, generator=g)
    windows = random_windows(9, 11, 10, g)
    half = spp_pool(fmap.half(), windows)
    assert half.dtype == torch.float16 and torch.equal(half, reference_spp(fmap.half().float(), windows, (1, 2, 3, 6)).half())
    empty = spp_pool(fmap, torch.zeros((0, 4), dtype=torch.int64))
    assert empty.shape == (0, 4 * 50)


@pytest.mark.parametrize("map_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16)])
def test_spp_pool_out_dtype_equals_converting_the_result(map_dtype, out_dtype):
    g = torch.Generator().manual_seed(5)
    fmap = torch.randn(8, 13, 17, generator=g).to(map_dtype)  # negative values too: a true max
    windows = random_windows(13, 17, 40, g)
    want = reference_spp(fmap.double(), windows, (1, 2, 3, 6)).to(out_dtype)
    got = spp_pool(fmap, windows, out_dtype=out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)
    # with gradients the map is converted first and the gradient comes back in the map's dtype
    leaf = fmap.clone().requires_grad_()
    spp_pool(leaf, windows, out_dtype=out_dtype).sum().backward()
    ref = fmap.to(out_dtype).requires_grad_()
    spp_pool(ref, windows).sum().backward()
    assert leaf.grad.dtype == map_dtype and torch.equal(leaf.grad, ref.grad.to(map_dtype))
    with pytest.raises(ValueError, match="out_dtype"):
        spp_pool(fmap, windows, out_dtype=torch.int64)


def test_spp_pool_reuse_output_returns_the_threads_buffer():
    g = torch.Generator().manual_seed(6)
    fmap = torch.randn(8, 13, 17, generator=g)
    a_win, b_win = random_windows(13, 17, 30, g), random_windows(13, 17, 20, g)
    a = spp_pool(fmap, a_win, reuse_output=True)
    a_copy = a.clone()
    assert torch.equal(a_copy, reference_spp(fmap, a_win, (1, 2, 3, 6)))
    b = spp_pool(fmap, b_win, reuse_output=True)
    assert torch.equal(b, reference_spp(fmap, b_win, (1, 2, 3, 6)))
    # the second call wrote into the first call's memory: that is the documented contract
    assert b.data_ptr() == a.data_ptr() and not torch.equal(a, a_copy)
    # fresh outputs are not the buffer, and with gradients the flag is ignored
    assert spp_pool(fmap, b_win).data_ptr() != b.data_ptr()
    leaf = fmap.clone().requires_grad_()
    c = spp_pool(leaf, b_win, reuse_output=True)
    assert c.requires_grad and c.data_ptr() != b.data_ptr() and torch.equal(c.detach(), b)


def test_spp_pool_rejects_bad_windows():
    fmap = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="outside the 4x5 map"):
        spp_pool(fmap, torch.tensor([[0, 0, 5, 3]]))
    with pytest.raises(ValueError, match="empty or outside"):
        spp_pool(fmap, torch.tensor([[3, 0, 2, 3]]))
    with pytest.raises(ValueError, match="int64"):
        spp_pool(fmap, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"Tensor\[C, H, W\]"):
        spp_pool(fmap[None], torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="levels"):
        spp_pool(fmap, torch.tensor([[0, 0, 1, 1]]), (0, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_spp_pool_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    fmap = torch.randn(16, 20, 30, generator=g)
    windows = random_windows(20, 30, 100, g)
    want = spp_pool(fmap, windows)
    got = spp_pool(fmap.cuda(), windows.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), want)
    f = fmap.double().cuda().requires_grad_()
    spp_pool(f, windows.cuda()).sum().backward()
    ref = fmap.double().requires_grad_()
    spp_pool(ref, windows).sum().backward()
    assert torch.equal(f.grad.cpu(), ref.grad)


def test_spatial_pyramid_pool_sizes():
    spp = SpatialPyramidPool((1, 2, 3, 6))
    assert spp.out_dim(256) == 12800 == spp_out_dim(256, (1, 2, 3, 6))
    g = torch.Generator().manual_seed(6)
    for h, w in [(13, 13), (10, 10), (1, 1), (2, 5), (7, 3), (29, 40), (42, 56)]:
        x = torch.randn(2, 3, h, w, generator=g)
        out = spp(x)
        assert out.shape == (2, spp.out_dim(3)), (h, w)
        full = torch.tensor([[0, 0, w - 1, h - 1]])
        for i in range(2):  # the same bins as spp_pool with the whole map as the window
            assert torch.equal(out[i:i + 1], spp_pool(x[i], full)), (h, w)


def test_spatial_pyramid_pool_a10_n6_is_adaptive():
    # the paper's fixed window/stride rule (ceil(10/6)=2, floor(10/6)=1) gives 9 outputs; ours 6
    x = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    assert F.max_pool2d(x, 2, 1, ceil_mode=True).shape[-1] == 9
    out = SpatialPyramidPool((6,))(x).view(6, 6)
    # column bins of w=10, n=6: [0,2) [1,4) [3,5) [5,7) [6,9) [8,10) -> max at columns 1,3,4,6,8,9
    cols = torch.tensor([1, 3, 4, 6, 8, 9])
    assert torch.equal(out, (cols.view(6, 1) * 10 + cols.view(1, 6)).float())


def test_roi_pool_bins_exact_check_matches_brute_force():
    """The guard that lets CUDA use torchvision's roi_pool: float32 bin edges vs spec §4 integers."""
    from torchvision.ops import roi_pool

    from detector.spp import _roi_pool_bins_exact

    assert _roi_pool_bins_exact((1, 2, 3, 6), 200)
    assert not _roi_pool_bins_exact((13,), 7)  # known float32 off-by-one: w = 7, n = 13
    assert _roi_pool_bins_exact((13,), 6)
    # the flagged case really differs in roi_pool on CPU (same float32 arithmetic as the CUDA kernel)
    fmap = torch.arange(10.0).reshape(1, 1, 10).expand(1, 10, 10).contiguous()  # (C=1, H=W=10), value = column
    win = torch.tensor([[0, 0, 6, 6]])
    want = reference_spp(fmap, win, (13,))
    got = roi_pool(fmap[None], [win.float()], output_size=(13, 13)).flatten(1)
    assert not torch.equal(got, want)


def test_large_buffers_are_plain_writable_tensors():
    """_empty_large (huge-page advice for spp_pool's big CPU buffers) gives ordinary tensors of the asked
    shape and dtype, small and large, and spp_pool's large output is exact and not shared between calls."""
    from detector.workspace import empty_large as _empty_large

    like = torch.zeros(1)
    for shape, dtype in (((3, 5), torch.float32), ((1100, 1000), torch.float32), ((600, 1000), torch.int64)):
        t = _empty_large(shape, like, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        t.fill_(7)
        assert int(t.sum()) == 7 * t.numel()
    g = torch.Generator().manual_seed(5)
    fmap = torch.rand(64, 20, 30, generator=g)
    x = torch.randint(0, 30, (700, 2), generator=g).sort(1).values
    y = torch.randint(0, 20, (700, 2), generator=g).sort(1).values
    win = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    a = spp_pool(fmap, win)  # 700 x 3200 floats: 8.96 MB, large enough for the advice
    b = spp_pool(fmap * 2, win)
    assert torch.equal(a, spp_pool_roi_pool(fmap, win)) and torch.equal(b, 2 * a)
    assert a.data_ptr() != b.data_ptr()
