"""Box-regression training from samples spilled to disk: equal to stacking every sample in memory.

The reference stacks each class's samples in image order, draws the same subset, and fits with
``fit_box_regressors`` (the in-memory fit): the dual form must match bit for bit, the primal form
(normal equations summed over chunks) within float64 rounding.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bbox_reg import fit_box_regressors
from detector.bbox_train import _image_seed, collect_samples, fit_from_samples, jitter_gt, train_box_regressors
from detector.boxes import pairwise_iou
from detector.config import BBoxRegConfig
from detector.data.records import ImageRecord
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from detector.train_items import TrainItem

LEVELS = (1, 2)  # D = 4 channels x 5 bins = 20, M = 21
PROJ = ProjectionParams(stride=16, offset0=20.0, shrink=2.0, target_side=48.0)
K = 3  # class 2 has no ground truth: no regressor


def _setup(n_items: int = 3, seed: int = 0):
    """Items whose class-0 box has 40 jittered proposals (N > M: primal) and class-1 box 3 (dual)."""
    g = torch.Generator().manual_seed(seed)
    items, pyrs = [], {}
    for i in range(n_items):
        gt = torch.tensor([[8.0, 8.0, 70.0, 60.0], [80.0, 60.0, 150.0, 140.0]])
        lab = torch.tensor([0, 1])
        props = torch.cat([gt[:1].repeat(40, 1) + torch.randn(40, 4, generator=g).mul(3),
                           gt[1:].repeat(3, 1) + torch.randn(3, 4, generator=g).mul(3),
                           torch.tensor([[100.0, 0.0, 160.0, 40.0]])])  # a background window
        rec = ImageRecord(f"im{i}", Path(f"im{i}.jpg"), 160, 160, gt, lab, torch.zeros(2, dtype=torch.bool))
        items.append(TrainItem(rec, False, gt, lab, rec.difficult, props))
        fmaps = [torch.rand(4, s, s, generator=g) for s in (8, 10)]
        pyrs[rec.image_id] = Conv5Pyramid(fmaps, [(128, 128), (160, 160)], (160, 160))
    return items, (lambda it: pyrs[it.record.image_id])


def _reference(items, load, params: BBoxRegConfig, seed: int, pool_scale: float):
    """Every sample stacked in memory, in image order, then the in-memory fit (the slow reference)."""
    X, P, T = ([[] for _ in range(K)] for _ in range(3))
    for i, it in enumerate(items):
        cand = torch.cat([it.gt_boxes, it.proposals])
        if params.jitter_per_gt:
            g_i = torch.Generator().manual_seed(_image_seed(seed, i))
            cand = torch.cat([cand, jitter_gt(it.gt_boxes, params.jitter_per_gt, params.jitter_sigma,
                                              it.record.height, it.record.width, g_i)])
        for r in range(cand.shape[0]):  # window by window
            iou = pairwise_iou(cand[r:r + 1], it.gt_boxes)[0]
            best = int(iou.argmax())
            if float(iou[best]) > params.min_iou:
                c = int(it.gt_labels[best])
                X[c].append(pool_regions(load(it), cand[r:r + 1], LEVELS, PROJ) * pool_scale)
                P[c].append(cand[r:r + 1])
                T[c].append(it.gt_boxes[best:best + 1])
    g = torch.Generator().manual_seed(seed)
    samples = []
    for c in range(K):
        if not X[c]:
            samples.append(None)
            continue
        x, p, t = torch.cat(X[c]), torch.cat(P[c]), torch.cat(T[c])
        if params.max_per_class and x.shape[0] > params.max_per_class:
            sel = torch.randperm(x.shape[0], generator=g)[:params.max_per_class]
            x, p, t = x[sel], p[sel], t[sel]
        samples.append((x, p, t))
    return fit_box_regressors(samples, samples[0][0].shape[1], params.lam, params.whiten_eps), samples


@pytest.mark.parametrize("cap", [0, 30])
def test_streamed_fit_equals_the_in_memory_fit(tmp_path, cap):
    items, load = _setup()
    params = BBoxRegConfig(lam=10.0, max_per_class=cap)
    ref, samples = _reference(items, load, params, seed=5, pool_scale=2.0)
    assert samples[0][0].shape[0] >= 21 > samples[1][0].shape[0]  # class 0 primal, class 1 dual
    reg = train_box_regressors(items, load, LEVELS, PROJ, K, 2.0, params, seed=5, folder=tmp_path / "s",
                               progress=False)
    assert reg.feature_scale == 2.0
    w, wr = reg.weight.double(), ref.weight.double()
    assert torch.equal(reg.weight[:, 4:8], ref.weight[:, 4:8])  # dual: the same arithmetic
    torch.testing.assert_close(w[:, 0:4], wr[:, 0:4], rtol=1e-6, atol=1e-9)  # primal: chunked sums
    assert torch.equal(reg.weight[:, 8:12], torch.zeros(21, 4))  # no samples, no regressor
    assert not (tmp_path / "s").exists()  # the scratch samples are removed once fitted


def test_jitter_gt_equals_a_reference_loop():
    """Box by box with Python floats: centre + sigma*N*w, half-size * exp(sigma*N), clipped."""
    gt = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 30.0, 30.0]])
    n, sigma, H, W = 5, 0.3, 90, 60
    out = jitter_gt(gt, n, sigma, H, W, torch.Generator().manual_seed(3))
    d = torch.randn((2, n, 4), generator=torch.Generator().manual_seed(3)) * sigma  # the same draws
    assert out.shape == (2 * n, 4) and out.dtype == torch.float32
    for g in range(2):
        x1, y1, x2, y2 = gt[g].tolist()
        w, h = x2 - x1, y2 - y1
        for s in range(n):
            dx, dy, dw, dh = d[g, s].tolist()
            cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
            hw, hh = w / 2 * math.exp(dw), h / 2 * math.exp(dh)
            want = [min(max(cx - hw, 0), W), min(max(cy - hh, 0), H), min(max(cx + hw, 0), W), min(max(cy + hh, 0), H)]
            torch.testing.assert_close(out[g * n + s], torch.tensor(want), rtol=1e-5, atol=1e-4)
    assert bool((out[:, 0::2] <= W).all()) and bool((out[:, 1::2] <= H).all()) and bool((out >= 0).all())
    assert (out[:, 3] == H).any() or (out[:, 1] == 0).any()  # sigma 0.3 on a box at the border: some clip
    assert jitter_gt(gt, 0, sigma, H, W, torch.Generator()).shape == (0, 4)
    assert jitter_gt(gt[:0], 4, sigma, H, W, torch.Generator()).shape == (0, 4)


def test_jittered_samples_join_the_fit_like_proposals(tmp_path):
    """jitter_per_gt adds samples kept by the same IoU rule; the streamed fit equals the reference
    that appends the same jittered boxes to each image's windows."""
    items, load = _setup()
    params = BBoxRegConfig(lam=10.0, jitter_per_gt=6, jitter_sigma=0.15)
    ref, samples = _reference(items, load, params, seed=5, pool_scale=2.0)
    base = collect_samples(items, load, LEVELS, PROJ, K, 2.0, params.min_iou, tmp_path / "a", progress=False)
    more = collect_samples(items, load, LEVELS, PROJ, K, 2.0, params.min_iou, tmp_path / "b", progress=False,
                           jitter=6, jitter_sigma=0.15, seed=5)
    assert (more[:, :2] > base[:, :2]).all() and (more[:, :2] <= base[:, :2] + 6).all()
    assert samples[1][0].shape[0] == int(more[:, 1].sum())
    reg = train_box_regressors(items, load, LEVELS, PROJ, K, 2.0, params, seed=5, folder=tmp_path / "s",
                               progress=False)
    torch.testing.assert_close(reg.weight.double(), ref.weight.double(), rtol=1e-6, atol=1e-9)


def test_chunk_size_changes_only_rounding(tmp_path):
    items, load = _setup()
    params = BBoxRegConfig(lam=10.0)
    counts = collect_samples(items, load, LEVELS, PROJ, K, 1.0, params.min_iou, tmp_path, progress=False)
    assert counts.shape == (3, K) and counts[:, 2].sum() == 0 and (counts[:, 0] == 41).all()
    one = fit_from_samples(tmp_path, counts, params, seed=0, chunk_rows=10 ** 6).weight
    many = fit_from_samples(tmp_path, counts, params, seed=0, chunk_rows=7).weight
    torch.testing.assert_close(many.double(), one.double(), rtol=1e-6, atol=1e-9)


def test_collect_resumes_from_intact_files_and_redoes_damaged_ones(tmp_path, monkeypatch):
    items, load = _setup(n_items=4)
    params = BBoxRegConfig(lam=10.0)
    first = collect_samples(items, load, LEVELS, PROJ, K, 1.0, params.min_iou, tmp_path, progress=False)
    files = sorted(tmp_path.glob("*.npz"))
    assert [f.name for f in files] == [f"{i:07d}.npz" for i in range(4)]
    before = {f.name: f.read_bytes() for f in files}
    files[1].write_bytes(before[files[1].name][:100])  # killed mid-copy / damaged
    files[2].unlink()
    os.utime(files[0], (1, 1))
    pooled = []

    def counting_load(it):
        pooled.append(it.record.image_id)
        return load(it)

    again = collect_samples(items, counting_load, LEVELS, PROJ, K, 1.0, params.min_iou, tmp_path, progress=False)
    assert pooled == ["im1", "im2"]  # only the damaged and the missing image are pooled again
    assert os.stat(files[0]).st_mtime == 1  # an intact file is read, not rewritten
    assert np.array_equal(first, again)
    assert {f.name: f.read_bytes() for f in sorted(tmp_path.glob("*.npz"))} == before


def test_no_samples_is_a_clear_error(tmp_path):
    items, load = _setup(n_items=1)
    with pytest.raises(RuntimeError, match="no box-regression samples"):
        train_box_regressors(items, load, LEVELS, PROJ, K, 1.0, BBoxRegConfig(min_iou=1.0), seed=0,
                             folder=tmp_path / "s", progress=False)
