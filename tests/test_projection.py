"""Scale choice (spec §5) and window projection (spec §3): hand-computed cases from the spec's
1-based formulas, and the 0-based rewrite against a direct 1-based transcription."""
from __future__ import annotations

import math

import pytest
import torch

from detector.boxes import xyxy_to_voc
from detector.projection import project_boxes, select_scales

CODE_SCALES = (480, 576, 688, 874, 1200)  # spec §2, the released code's list
ZF = dict(stride=16, offset0=20.0, shrink=6.5)  # 0-based offset0 (spec's 1-based 21)


def test_scale_choice_spec_examples():
    # S_min = 375: 100x100 -> s* 780 -> 688; 200x150 -> 450 -> 480; 31x31 -> 2516 -> 1200
    boxes = torch.tensor([[10.0, 10, 110, 110], [0, 0, 200, 150], [50, 60, 81, 91]])
    assert select_scales(boxes, (375, 500), CODE_SCALES, target_side=208).tolist() == [2, 0, 4]


def test_scale_choice_ties_degenerate_and_order():
    # S_min 528, a 208x208 box: s* = 528, exactly between 480 and 576 -> the smaller (480)
    box = torch.tensor([[0.0, 0, 208, 208]])
    assert select_scales(box, (528, 700), (480, 576), target_side=208).tolist() == [0]
    assert select_scales(box, (528, 700), (576, 480), target_side=208).tolist() == [1]  # still 480, whatever the order
    # one pixel more and 576 wins: s* = round(208*529/208) = 529 -> |529-576| = 47 < 49
    assert select_scales(box, (529, 700), (480, 576), target_side=208).tolist() == [1]
    # a zero-area box is tiny: the largest scale
    assert select_scales(torch.tensor([[5.0, 5, 5, 9]]), (375, 500), CODE_SCALES, target_side=208).tolist() == [4]
    assert select_scales(torch.zeros((0, 4)), (375, 500), CODE_SCALES, target_side=208).shape == (0,)
    with pytest.raises(ValueError, match=r"Tensor\[R, 4\]"):
        select_scales(torch.zeros(4), (375, 500), CODE_SCALES, target_side=208)


def test_scale_choice_is_the_released_codes_not_the_papers():
    # 100x100 at S_min 375: s* = round(208*375/100) = 780 -> 688; the paper's rule (scaled area
    # 10000*(s/375)^2 nearest 224^2 = 50176) would pick 874 (54321)
    boxes = torch.tensor([[10.0, 10, 110, 110]])
    assert select_scales(boxes, (375, 500), CODE_SCALES, target_side=208).tolist() == [2]


def test_projection_hand_cases_scale_one():
    """480x640 image at scale 480 (r = 1), conv5 29x39. Worked in the spec's 1-based form."""
    boxes = torch.tensor([
        # VOC (101, 51, 300, 250): L = floor((101-6.5)/16)+1 = 6, R = ceil((300-19.5)/16) = 18,
        # T = floor((51-6.5)/16)+1 = 3, B = ceil((250-19.5)/16) = 15  ->  0-based (5, 2, 17, 14)
        [100.0, 50, 300, 250],
        # VOC x 113..115: L = floor(106.5/16)+1 = 7 > R = ceil(95.5/16) = 6 -> trunc(13/2) = 6 -> 5;
        # VOC y 51..60: T = 3, B = ceil(40.5/16) = 3 -> 2
        [112.0, 50, 115, 60],
        # right of the image: L = floor(694.5/16)+1 = 44, R = ceil(740.5/16) = 47 -> clamp to 39 -> 38;
        # VOC y 11..50: T = floor(4.5/16)+1 = 1, B = ceil(30.5/16) = 2 -> (0, 1)
        [700.0, 10, 760, 50],
        # above-left of the image: everything clamps to cell 1 -> 0
        [-100.0, -100, -50, -50],
        # the whole image: L = floor(-5.5/16)+1 = 0 -> 1, R = ceil(620.5/16) = 39, B = ceil(460.5/16) = 29
        [0.0, 0, 640, 480],
    ])
    got = project_boxes(boxes, (480, 640), (480, 640), (29, 39), **ZF)
    assert got.dtype == torch.int64
    assert got.tolist() == [[5, 2, 17, 14], [5, 2, 5, 2], [38, 0, 38, 1], [0, 0, 0, 0], [0, 0, 38, 28]]


def test_projection_hand_case_rescaled():
    """375x500 at scale 688 -> 688x917 (r = 687/374), conv5 42x56.

    VOC (51, 31, 250, 180): x1' = 50 r + 1 = 92.845, L = floor(86.345/16)+1 = 6;
    x2' = 249 r + 1 = 458.390, R = ceil(438.890/16) = 28; y1' = 30 r + 1 = 56.107,
    T = floor(49.607/16)+1 = 4; y2' = 179 r + 1 = 329.805, B = ceil(310.305/16) = 20.
    -> 0-based (5, 3, 27, 19).
    """
    r = 687 / 374
    assert math.floor((50 * r + 1 - 6.5) / 16) + 1 == 6 and math.ceil((249 * r + 1 - 19.5) / 16) == 28
    boxes = torch.tensor([[50.0, 30, 250, 180], [0, 0, 500, 375]])
    got = project_boxes(boxes, (375, 500), (688, 917), (42, 56), **ZF)
    assert got.tolist() == [[5, 3, 27, 19], [0, 0, 55, 41]]


def spec_projection_1based(voc: list[float], s_min: int, s: int, h5: int, w5: int, offset0_1b: float,
                           stride: int = 16, shrink: float = 6.5) -> list[int]:
    """Spec §3 transcribed literally in 1-based VOC coordinates; returns 0-based cells."""
    r = (s - 1) / (s_min - 1)
    x1, y1, x2, y2 = ((v - 1) * r + 1 for v in voc)
    out = []
    for a, b, lim in ((x1, x2, w5), (y1, y2, h5)):
        lo = math.floor((a - offset0_1b + shrink) / stride + 0.5) + 1
        hi = math.ceil((b - offset0_1b - shrink) / stride - 0.5) + 1
        if lo > hi:
            lo = hi = math.trunc((lo + hi) / 2)
        out.append((min(max(lo, 1), lim) - 1, min(max(hi, 1), lim) - 1))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]


@pytest.mark.parametrize("offset0", [20.0, 7.5, 0.0])  # ZF-5, VGG-16, ResNet-50 (0-based)
def test_projection_equals_literal_spec_formula(offset0):
    g = torch.Generator().manual_seed(int(offset0 * 2))
    h, w, s = 375, 500, 688
    hs, ws, h5, w5 = 688, 917, 42, 56
    xy = torch.rand(400, 2, generator=g) * torch.tensor([w, h]) - 20
    wh = torch.rand(400, 2, generator=g) ** 3 * torch.tensor([w, h]) + 1  # many tiny boxes
    boxes = torch.cat([xy, xy + wh], dim=1).round()
    got = project_boxes(boxes, (h, w), (hs, ws), (h5, w5), 16, offset0, 6.5)
    collapsed = 0
    for b, cells in zip(xyxy_to_voc(boxes).tolist(), got.tolist()):
        assert cells == spec_projection_1based(b, h, s, h5, w5, offset0 + 1), b
        assert 0 <= cells[0] <= cells[2] < w5 and 0 <= cells[1] <= cells[3] < h5
        collapsed += cells[0] == cells[2]
    assert collapsed > 0  # the L > R branch was exercised


def test_projection_never_empty_and_validates():
    boxes = torch.tensor([[3.0, 3, 3, 3], [10, 10, 9, 9], [1e6, 1e6, 2e6, 2e6]])
    got = project_boxes(boxes, (100, 120), (100, 120), (5, 6), **ZF)
    assert bool(((got[:, 2] >= got[:, 0]) & (got[:, 3] >= got[:, 1])).all())
    assert got[:, 2].max() <= 5 and got[:, 3].max() <= 4 and got.min() >= 0
    with pytest.raises(ValueError, match="fmap_size"):
        project_boxes(boxes, (100, 120), (100, 120), (0, 6), **ZF)


def test_distinct_windows_share_their_pooled_vector():
    """Boxes that project to the same conv5 window at the same scale pool the same vector: the first
    of each distinct (scale, window), in box order, and each box's row among them."""
    from detector.regions import Conv5Pyramid, ProjectionParams, distinct_windows, pool_regions

    g = torch.Generator().manual_seed(0)
    pyr = Conv5Pyramid([torch.rand(3, 10, 10, generator=g), torch.rand(3, 20, 20, generator=g)],
                       [(160, 160), (320, 320)], (160, 160))
    proj = ProjectionParams(16, 20.0, 2.0, 64.0)
    base = torch.tensor([[10.0, 10.0, 90.0, 70.0], [0.0, 0.0, 150.0, 150.0], [40.0, 50.0, 80.0, 100.0]])
    boxes = torch.cat([base, base + 0.5, base[:1]])  # a half-pixel shift stays in the same cells here
    first, inverse = distinct_windows(pyr, boxes, proj)
    pooled = pool_regions(pyr, boxes, (1, 2), proj)
    assert torch.equal(pooled[first][inverse], pooled)
    assert first.tolist() == sorted(first.tolist()) and first[0] == 0
    assert len(set(map(tuple, pooled[first].tolist()))) == first.shape[0]  # distinct windows, distinct vectors
    assert first.shape[0] < boxes.shape[0] and inverse[6] == 0  # the copy of box 0 is box 0's row
    e = distinct_windows(pyr, torch.zeros(0, 4), proj)
    assert e[0].shape == (0,) and e[1].shape == (0,)


def test_pool_regions_equals_per_box_reference():
    """pool_regions against the obvious loop (each box: its spec §5 scale, its projected window, one
    spp_pool call) on a 2-scale pyramid, on a 1-scale one (whose fast path returns the kernel's
    output directly), with scales forced, and with gradients reaching every scale's map."""
    from detector.projection import project_boxes, select_scales
    from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
    from detector.spp import spp_pool

    g = torch.Generator().manual_seed(1)
    proj = ProjectionParams(16, 20.0, 2.0, 64.0)
    xy = torch.rand(40, 2, generator=g) * 200
    wh = 8 + torch.rand(40, 2, generator=g) * 150
    boxes = torch.cat([xy, (xy + wh).clamp(max=318)], dim=1)  # (40, 4) inside 320 x 320
    levels = (1, 2, 3)

    def reference(pyr, scale_index=None):
        s_idx = (select_scales(boxes, pyr.image_size, pyr.short_sides(), target_side=proj.target_side)
                 if scale_index is None else scale_index)
        rows = []
        for b, s in zip(boxes, s_idx.tolist()):
            fmap = pyr.fmaps[s]
            win = project_boxes(b[None], pyr.image_size, pyr.scaled_sizes[s], tuple(fmap.shape[-2:]),
                                proj.stride, proj.offset0, proj.shrink)
            rows.append(spp_pool(fmap, win, levels))
        return torch.cat(rows)

    maps = [torch.randn(4, 20, 20, generator=g), torch.randn(4, 30, 30, generator=g)]
    two = Conv5Pyramid(maps, [(320, 320), (480, 480)], (320, 320))
    one = Conv5Pyramid(maps[:1], [(320, 320)], (320, 320))
    chosen = select_scales(boxes, two.image_size, two.short_sides(), target_side=proj.target_side)
    assert set(chosen.tolist()) == {0, 1}  # both scales exercised
    assert torch.equal(pool_regions(two, boxes, levels, proj), reference(two))
    assert torch.equal(pool_regions(one, boxes, levels, proj), reference(one))
    forced = torch.arange(40) % 2
    assert torch.equal(pool_regions(two, boxes, levels, proj, scale_index=forced), reference(two, forced))
    assert pool_regions(two, boxes[:0], levels, proj).shape == (0, 4 * 14)

    leaves = [m.clone().requires_grad_(True) for m in maps]
    pool_regions(Conv5Pyramid(leaves, two.scaled_sizes, two.image_size), boxes, levels, proj).sum().backward()
    assert all(m.grad is not None and float(m.grad.abs().sum()) > 0 for m in leaves)
    one_leaf = maps[0].clone().requires_grad_(True)
    pool_regions(Conv5Pyramid([one_leaf], one.scaled_sizes, one.image_size), boxes, levels, proj).sum().backward()
    assert float(one_leaf.grad.sum()) == float(reference(one).numel())  # one argmax cell per output


def test_row_ids_packed_equal_unique_rows():
    """first_occurrence's packed 1-D dedup gives torch.unique(dim=0)'s inverse, also with negative
    keys, one column, and keys too wide to pack (the unique(dim=0) fallback)."""
    from detector.regions import _row_ids, first_occurrence

    g = torch.Generator().manual_seed(0)
    for r, k, hi in ((1, 5, 3), (50, 1, 4), (700, 5, 60), (2000, 5, 200), (300, 3, 2)):
        keys = torch.randint(-7, hi, (r, k), generator=g)
        assert torch.equal(_row_ids(keys), torch.unique(keys, dim=0, return_inverse=True)[1])
    wide = torch.tensor([[0, 2 ** 40, 5], [2 ** 40, 0, 1], [0, 2 ** 40, 5], [3, -2 ** 40, 5]])
    assert torch.equal(_row_ids(wide), torch.unique(wide, dim=0, return_inverse=True)[1])
    first, inverse = first_occurrence(wide)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2]
