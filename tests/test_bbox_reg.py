"""Box regression: encode/decode inverses, ridge primal == dual, whitened fit, packed prediction."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.bbox_reg import (BoxRegressor, decode, encode, fit_bbox_regressor, fit_box_regressors,
                               predict_one_class, ridge_solve)


def packed_deltas(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Deltas of every class from a packed [D+1, 4K] weight, as SPPDetector applies it. -> [R, K, 4]"""
    out = torch.addmm(weight[-1], features.to(weight.dtype), weight[:-1])  # (R, 4K)
    return out.view(features.shape[0], -1, 4)  # (R, K, 4)


def test_encode_hand_case():
    p = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # w 20, h 40, centre (20, 40)
    g = torch.tensor([[15.0, 20.0, 55.0, 80.0]])  # w 40, h 60, centre (35, 50)
    d = encode(p, g)
    torch.testing.assert_close(d, torch.tensor([[15 / 20, 10 / 40, math.log(2.0), math.log(1.5)]]))
    torch.testing.assert_close(decode(p, d), g)


box = st.tuples(
    st.floats(-500, 1500), st.floats(-500, 1500), st.floats(1.0, 800.0), st.floats(1.0, 800.0)
).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(box, box), min_size=1, max_size=6))
def test_round_trip_hypothesis(pairs):
    p = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    g = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    torch.testing.assert_close(decode(p, encode(p, g), max_dlog=None), g, atol=1e-8, rtol=1e-10)
    d = torch.randn(p.shape[0], 4, dtype=torch.float64).clamp(-3, 3)
    torch.testing.assert_close(encode(p, decode(p, d)), d, atol=1e-8, rtol=1e-8)


def test_round_trip_float32_and_per_class_decode():
    g0 = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g0) * 500
    p = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g0) * 300], 1)
    d = torch.randn(50, 3, 4, generator=g0) * 0.3  # (R, K, 4)
    boxes = decode(p, d)
    assert boxes.shape == (50, 3, 4)
    for k in range(3):
        torch.testing.assert_close(boxes[:, k], decode(p, d[:, k]))
        torch.testing.assert_close(encode(p, boxes[:, k]), d[:, k], atol=1e-4, rtol=1e-4)


def test_decode_clamps_huge_scale():
    p = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = decode(p, torch.tensor([[0.0, 0.0, 50.0, 0.0]]))
    assert torch.isfinite(out).all() and (out[0, 2] - out[0, 0]).item() == pytest.approx(10 * 1000 / 16, rel=1e-5)


def test_degenerate_boxes_stay_finite():
    p = torch.tensor([[5.0, 5.0, 5.0, 9.0]])  # zero width
    g = torch.tensor([[4.0, 4.0, 8.0, 8.0]])
    assert torch.isfinite(encode(p, g)).all()


@pytest.mark.parametrize("n,m", [(30, 80), (120, 40)])
def test_ridge_primal_equals_dual(n, m):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, m, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 4, generator=g, dtype=torch.float64)
    bp = ridge_solve(X, Y, 7.0, form="primal")
    bd = ridge_solve(X, Y, 7.0, form="dual")
    torch.testing.assert_close(bp, bd, atol=1e-10, rtol=1e-8)
    # the normal equations hold
    torch.testing.assert_close((X.T @ X + 7.0 * torch.eye(m, dtype=torch.float64)) @ bp, X.T @ Y)


def _synthetic(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    xy = torch.rand(n, 2, generator=g) * 300
    props = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 100], 1)
    return g, feats, props


def test_fit_recovers_constant_shift_and_scale_exactly_even_with_lambda_4000():
    """gt = proposal shifted by +10% of its width in x and 1.2x taller: constant deltas; after
    centring the whitened targets are 0, so the prediction is the mean whatever lambda is."""
    _, feats, props = _synthetic()
    w = props[:, 2] - props[:, 0]
    h = props[:, 3] - props[:, 1]
    gt = props.clone()
    gt[:, 0] += 0.1 * w
    gt[:, 2] += 0.1 * w
    gt[:, 1] -= 0.1 * h
    gt[:, 3] += 0.1 * h
    beta, mu, t_inv = fit_bbox_regressor(feats, props, gt, lam=4000.0, whiten_eps=0.001)
    torch.testing.assert_close(mu, torch.tensor([0.1, 0.0, 0.0, math.log(1.2)], dtype=torch.float64), atol=1e-6, rtol=0)
    reg = BoxRegressor.from_per_class([(beta, mu, t_inv)], feats.shape[1])
    torch.testing.assert_close(decode(props, packed_deltas(reg.weight, feats))[:, 0], gt, atol=1e-3, rtol=1e-5)


def test_fit_recovers_feature_dependent_deltas():
    g, feats, props = _synthetic(n=600, d=10, seed=1)
    A = torch.randn(10, 4, generator=g, dtype=torch.float64) * 0.05
    c = torch.tensor([0.05, -0.02, 0.1, -0.1], dtype=torch.float64)
    d_true = feats.double() @ A + c  # (N, 4)
    gt = decode(props.double(), d_true)
    beta, mu, t_inv = fit_bbox_regressor(feats, props, gt, lam=1e-3, whiten_eps=0.001)
    pred = predict_one_class(feats, beta, mu, t_inv)
    torch.testing.assert_close(pred, d_true, atol=1e-5, rtol=1e-4)
    # strong ridge shrinks toward the mean delta
    beta4k, mu4k, tinv4k = fit_bbox_regressor(feats, props, gt, lam=4000.0, whiten_eps=0.001)
    err_small = (pred - d_true).norm()
    err_big = (predict_one_class(feats, beta4k, mu4k, tinv4k) - d_true).norm()
    err_mean = (d_true - d_true.mean(0)).norm()
    assert err_small < err_big < err_mean


def test_dual_and_primal_fits_agree_when_n_below_d():
    g, feats, props = _synthetic(n=40, d=100, seed=2)
    gt = props + torch.randn(40, 4, generator=g) * 3
    bd = fit_bbox_regressor(feats, props, gt, lam=50.0, whiten_eps=0.001, form="dual")
    bp = fit_bbox_regressor(feats, props, gt, lam=50.0, whiten_eps=0.001, form="primal")
    for a, b in zip(bd, bp):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_packed_predict_equals_per_class_predict():
    g, feats, props = _synthetic(n=300, d=16, seed=3)
    gt = props + torch.randn(300, 4, generator=g) * 4
    labels = torch.randint(0, 3, (300,), generator=g)
    labels[labels == 1] = -1  # class 1 has no samples -> identity regressor
    samples = [None if c == 1 else (feats[labels == c], props[labels == c], gt[labels == c]) for c in range(3)]
    reg = fit_box_regressors(samples, 16, lam=100.0, whiten_eps=0.001)
    assert reg.weight.shape == (17, 12) and reg.num_classes == 3
    x = torch.randn(25, 16, generator=g)
    deltas = packed_deltas(reg.weight, x)
    assert deltas.shape == (25, 3, 4)
    for c in (0, 2):
        idx = labels == c
        ref = predict_one_class(x, *fit_bbox_regressor(feats[idx], props[idx], gt[idx], lam=100.0, whiten_eps=0.001))
        torch.testing.assert_close(deltas[:, c].double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.all(deltas[:, 1] == 0)
    p = props[:25]
    boxes = decode(p, deltas)
    assert boxes.shape == (25, 3, 4)
    torch.testing.assert_close(boxes[:, 1], p)  # no regressor: the box stays the proposal
    # state_dict round trip
    reg2 = BoxRegressor.identity(3, 16)
    reg2.load_state_dict(reg.state_dict())
    assert torch.equal(reg2.weight, reg.weight)


def test_shape_errors():
    with pytest.raises(ValueError, match="encode"):
        encode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[D\+1, 4K\]"):
        BoxRegressor(torch.zeros(17, 6))


def test_refine_gathers_into_the_reused_buffer_with_the_same_boxes():
    """BoxRegressor.refine (its rows gathered into this thread's buffer) equals the free function
    without a buffer and a per-detection reference, for rows given per window and per distinct row."""
    from detector.bbox_reg import refine_boxes

    g = torch.Generator().manual_seed(0)
    reg = BoxRegressor(torch.randn(33, 12, generator=g) * 0.01, feature_scale=0.5)
    pooled = torch.rand(40, 32, generator=g)
    xy = torch.rand(60, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 10 + torch.rand(60, 2, generator=g) * 50], 1)  # (60, 4)
    pooled_rows = torch.randint(0, 40, (60,), generator=g)  # window -> distinct row
    rows = torch.randint(0, 60, (90,), generator=g)
    labels = torch.randint(0, 3, (90,), generator=g)
    deltas = (pooled[pooled_rows[rows]] * 0.5) @ reg.weight[:-1] + reg.weight[-1]  # (90, 12)
    ref = decode(boxes[rows], deltas.view(90, 3, 4)[torch.arange(90), labels])
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the first one's buffer
            got = reg.refine(boxes, pooled, rows, labels, pooled_rows[rows])
            assert torch.equal(got, refine_boxes(reg.weight, 0.5, boxes, pooled, rows, labels, pooled_rows[rows]))
            torch.testing.assert_close(got, ref)
        small = torch.zeros(10)  # too small: a fresh matrix instead
        assert torch.equal(refine_boxes(reg.weight, 0.5, boxes, pooled, rows, labels, pooled_rows[rows], small), got)
