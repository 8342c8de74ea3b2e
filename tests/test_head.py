"""FCHead: deterministic features, dropout only in forward, init, truncated-SVD compression."""
from __future__ import annotations

import pytest
import torch

from detector.head import FCHead, LowRankLinear, svd_factorize


def _head(in_dim=64, fc_dim=48, num_classes=None, seed=0):
    torch.manual_seed(seed)
    return FCHead(in_dim, fc_dim, num_classes=num_classes, dropout=0.5)


def test_features_deterministic_in_train_mode_and_match_reference():
    head = _head(num_classes=3).train()
    x = torch.randn(10, 64)
    a, b = head.features(x), head.features(x)
    assert torch.equal(a, b)
    ref = torch.relu(torch.relu(x @ head.fc6.weight.T + head.fc6.bias) @ head.fc7.weight.T + head.fc7.bias)
    torch.testing.assert_close(a, ref)
    # forward in train mode uses dropout (two calls differ), in eval mode equals cls_score(features)
    torch.manual_seed(1)
    f1 = head(x)
    f2 = head(x)
    assert f1.shape == (10, 4) and not torch.equal(f1, f2)
    head.eval()
    torch.testing.assert_close(head(x), a @ head.cls_score.weight.T + head.cls_score.bias)


def test_forward_without_classifier_returns_fc7():
    head = _head().eval()
    x = torch.randn(5, 64)
    assert head.out_dim == 48
    torch.testing.assert_close(head(x), head.features(x))


def test_init_per_spec():
    torch.manual_seed(0)
    head = FCHead(2000, 1000, num_classes=20, dropout=0.5)
    assert abs(head.fc6.weight.std().item() - 0.01) < 5e-4
    assert torch.all(head.fc6.bias == 1) and torch.all(head.fc7.bias == 1)
    assert torch.all(head.cls_score.bias == 0) and head.cls_score.out_features == 21


def test_shape_check_message():
    with pytest.raises(ValueError, match=r"\[R, 64\]"):
        _head().features(torch.randn(3, 65))


def test_svd_factorize_meets_eckart_young_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 30)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    errs = []
    for r in (1, 5, 10, 20, 30):
        low = svd_factorize(lin, r)
        diff = (low.effective_weight() - lin.weight).detach().double()
        spec = torch.linalg.matrix_norm(diff, ord=2).item()
        fro = torch.linalg.matrix_norm(diff).item()
        tail = s[r:]
        assert spec == pytest.approx(tail[0].item() if tail.numel() else 0.0, abs=1e-5)
        assert fro == pytest.approx(tail.square().sum().sqrt().item(), abs=1e-5)
        # output error of the layer is bounded by sigma_{r+1} * ||x||
        x = torch.randn(8, 40)
        out_err = (low(x) - lin(x)).norm(dim=1)
        bound = (tail[0].item() if tail.numel() else 0.0) * x.norm(dim=1) + 1e-4
        assert torch.all(out_err <= bound)
        errs.append(fro)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-5


def test_compress_svd_head():
    head = _head(in_dim=256, fc_dim=64, num_classes=3).train()
    x = torch.randn(20, 256)
    small = head.compress_svd(8)
    assert isinstance(small.fc6, LowRankLinear) and small.fc6.rank == 8
    assert isinstance(small.fc7, LowRankLinear) and small.fc7.rank == 8
    assert not small.training and isinstance(head.fc6, torch.nn.Linear)  # original untouched
    # full rank where it saves nothing: kept dense and exact
    same = head.compress_svd(64)
    assert isinstance(same.fc7, torch.nn.Linear)
    torch.testing.assert_close(same.features(x), head.features(x))
    # error shrinks with rank
    errs = [(head.compress_svd(r).features(x) - head.features(x)).norm().item() for r in (2, 8, 24)]
    assert errs[0] > errs[1] > errs[2]
    with torch.inference_mode():
        assert small(x).shape == (20, 4)
    torch.testing.assert_close(small.cls_score.weight, head.cls_score.weight)


def test_randomized_svd_is_near_optimal_on_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    v, _ = torch.linalg.qr(torch.randn(700, 300, generator=g))
    s = torch.exp(-torch.arange(300.0) / 30)  # trained fc weights have a decaying spectrum
    lin = torch.nn.Linear(700, 300)
    with torch.no_grad():
        lin.weight.copy_((u * s) @ v.T)
    r = 40
    optimal = s[r:].square().sum().sqrt().item()
    fast = svd_factorize(lin, r, exact=False)
    err = torch.linalg.matrix_norm((fast.effective_weight() - lin.weight).double()).item()
    assert optimal <= err + 1e-6 and err <= 1.02 * optimal
    # seeded: the same factors twice, and the global RNG is untouched
    state = torch.get_rng_state()
    again = svd_factorize(lin, r, exact=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(again.up.weight, fast.up.weight)
