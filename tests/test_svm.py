"""Linear SVMs (liblinear via sklearn) and hard-negative mining on hand-built separable data."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.optimize
import torch

from detector.svm import HardNegativeMiner, LinearSVMs, svm_objective, svm_scores, train_linear_svm

# spec §7 (detector.config.SVMConfig)
SPEC = {"C": 0.001, "pos_weight": 2.0, "bias": 10.0, "hard_thresh": -1.0001, "evict_thresh": -1.2, "retrain_every": 2000}


def _dual_reference(pos, neg, C, pos_weight, bias):
    """Solve liblinear's dual (bias as a regularised feature of value `bias`) with L-BFGS-B."""
    x = torch.cat([pos, neg]).double().numpy()
    x = np.hstack([x, np.full((x.shape[0], 1), bias)])
    y = np.r_[np.ones(pos.shape[0]), -np.ones(neg.shape[0])]
    ub = np.r_[np.full(pos.shape[0], C * pos_weight), np.full(neg.shape[0], C)]
    q = (y[:, None] * x) @ (y[:, None] * x).T

    def f(a):
        qa = q @ a
        return 0.5 * a @ qa - a.sum(), qa - 1.0

    res = scipy.optimize.minimize(f, np.zeros_like(y), jac=True, method="L-BFGS-B",
                                  bounds=list(zip(np.zeros_like(ub), ub)), options={"maxiter": 10000, "ftol": 1e-15, "gtol": 1e-12})
    wt = (res.x * y) @ x
    return torch.from_numpy(wt[:-1]), float(wt[-1] * bias)


def test_separable_case_and_objective_matches_dual_reference():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(15, 6, generator=g) + torch.tensor([4.0, 0, 0, 0, 0, 0])
    neg = torch.randn(40, 6, generator=g) - torch.tensor([4.0, 0, 0, 0, 0, 0])
    w, b = train_linear_svm(pos, neg, C=0.1, pos_weight=2.0, bias=10.0)
    assert w.shape == (6,) and w.dtype == torch.float32
    assert torch.all(pos @ w + b > 0) and torch.all(neg @ w + b < 0)
    w_ref, b_ref = _dual_reference(pos, neg, 0.1, 2.0, 10.0)
    ours = svm_objective(w, b, pos, neg, 0.1, 2.0, 10.0)["total"]
    ref = svm_objective(w_ref, b_ref, pos, neg, 0.1, 2.0, 10.0)["total"]
    assert ours == pytest.approx(ref, rel=1e-3)
    torch.testing.assert_close(w.double(), w_ref, atol=2e-3, rtol=1e-2)
    assert b == pytest.approx(b_ref, abs=2e-2)


def test_spec_options_on_overlapping_data_match_reference():
    """C = 0.001, -w1 2, -B 10 on features of mean norm 20 (the spec's regime), classes overlapping."""
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(30, 8, generator=g) + 1.0
    neg = torch.randn(60, 8, generator=g) - 0.5
    s = 20.0 / float(torch.cat([pos, neg]).norm(dim=1).mean())  # mean norm 20 (spec §7)
    pos, neg = pos * s, neg * s
    w, b = train_linear_svm(pos, neg, C=0.001, pos_weight=2.0, bias=10.0)
    w_ref, b_ref = _dual_reference(pos, neg, 0.001, 2.0, 10.0)
    ours = svm_objective(w, b, pos, neg, 0.001, 2.0, 10.0)
    ref = svm_objective(w_ref, b_ref, pos, neg, 0.001, 2.0, 10.0)
    assert ours["total"] == pytest.approx(ref["total"], rel=1e-3)
    # the positive weight matters: without it the objective of our solution is different
    assert ours["pos_loss"] > 0 and ours["neg_loss"] > 0


def test_train_requires_both_classes():
    with pytest.raises(ValueError, match="at least one positive"):
        train_linear_svm(torch.randn(3, 4), torch.zeros(0, 4), C=0.001, pos_weight=2.0, bias=10.0)


def test_svm_scores_one_matmul():
    f = torch.randn(7, 5)
    W = torch.randn(5, 3)
    b = torch.randn(3)
    torch.testing.assert_close(svm_scores(f, W, b), f @ W + b)
    with pytest.raises(ValueError):
        svm_scores(f, W, torch.randn(4))


def _image(g, n_easy, n_hard, n_pos_other=2):
    """Windows of one image for 2 classes in 4-d: class 0 along +e0, class 1 along +e1.

    Easy negatives of class 0 sit at e0 in [-40, -25]; planted hard ones at e0 in [-1, 1].
    Returns features, neg_mask [R, 2], is_hard [R].
    """
    easy = torch.zeros(n_easy, 4)
    easy[:, 0] = -25 - 15 * torch.rand(n_easy, generator=g)
    easy[:, 1] = -30.0
    hard = torch.zeros(n_hard, 4)
    hard[:, 0] = 2 * torch.rand(n_hard, generator=g) - 1
    hard[:, 1] = -30.0
    other = torch.zeros(n_pos_other, 4)  # windows on class-1 objects: negatives of class 0 only
    other[:, 1] = 10.0
    other[:, 0] = -30.0
    feats = torch.cat([easy, hard, other]) + 0.1 * torch.randn(n_easy + n_hard + n_pos_other, 4, generator=g)
    feats[:, 2:] += 1.0
    neg_mask = torch.ones(feats.shape[0], 2, dtype=torch.bool)
    neg_mask[n_easy + n_hard:, 1] = False
    is_hard = torch.zeros(feats.shape[0], dtype=torch.bool)
    is_hard[n_easy:n_easy + n_hard] = True
    return feats, neg_mask, is_hard


def test_hard_negative_mining_finds_planted_hard_negatives(caplog):
    g = torch.Generator().manual_seed(0)
    miner = HardNegativeMiner(num_classes=2, feat_dim=4, **{**SPEC, "retrain_every": 5}, class_names=["a", "b"])
    pos0 = torch.tensor([10.0, -30.0, 1.0, 1.0]) + 0.1 * torch.randn(30, 4, generator=g)
    pos1 = torch.tensor([-30.0, 10.0, 1.0, 1.0]) + 0.1 * torch.randn(30, 4, generator=g)
    miner.add_positives(0, pos0)
    miner.add_positives(1, pos1)
    all_negs, hard_keys, easy_later = [], [], []
    with caplog.at_level(logging.INFO, logger="detector.svm"):
        for i in range(8):
            n_hard = 0 if i == 0 else 3  # the first image has only easy negatives
            feats, neg_mask, is_hard = _image(g, n_easy=20, n_hard=n_hard)
            miner.process_image(feats, neg_mask)
            all_negs.append(feats[neg_mask[:, 0]])
            hard_keys += [i * 2**32 + int(r) for r in torch.nonzero(is_hard).flatten()]
            if i > 0:
                easy_later += [i * 2**32 + int(r) for r in range(20)]
        W, b = miner.finish()
    assert W.shape == (4, 2) and b.shape == (2,)
    cached = set(miner.negative_keys(0).tolist())
    # every planted hard negative was mined and is still cached (they sit inside the margin)
    assert set(hard_keys) <= cached
    # easy negatives of later images never enter the cache
    assert not (set(easy_later) & cached)
    # the first image's easy negatives were all taken, then evicted once the hard ones moved the boundary
    first_easy = {int(r) for r in range(20)}
    assert not (first_easy & cached)
    # memory is bounded: after finish() no cached negative scores below the eviction threshold
    hist = miner.history(0)
    assert len(hist) >= 3 and sum(h["evicted"] for h in hist) >= 20
    # the final classifier separates every positive from every negative ever seen
    negs = torch.cat(all_negs)
    assert torch.all(pos0 @ W[:, 0] + b[0] > 0) and torch.all(negs @ W[:, 0] + b[0] < 0)
    assert torch.all(pos1 @ W[:, 1] + b[1] > 0)
    assert "svm a" in caplog.text and "evicted" in caplog.text


def test_mining_dedups_keys_within_and_across_images():
    miner = HardNegativeMiner(num_classes=1, feat_dim=2, **{**SPEC, "retrain_every": 10**6})
    miner.add_positives(0, torch.tensor([[5.0, 0.0], [6.0, 0.0]]))
    feats = torch.tensor([[-5.0, 0.0], [-5.0, 0.0], [-6.0, 1.0]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    keys = torch.tensor([7, 7, 9])  # the first two are the same window (same conv5 cells and scale)
    out = miner.process_image(feats, mask, keys, image_index=0)
    assert out["added"] == 2 and miner.num_negatives(0) <= 2
    # W is now trained; the same image again adds nothing new (its keys are cached or easy)
    before = miner.num_negatives(0)
    miner.process_image(feats, mask, keys, image_index=0)
    assert miner.num_negatives(0) == before
    W, b = miner.finish()
    assert float(torch.tensor([5.0, 0.0]) @ W[:, 0] + b[0]) > 0


def test_class_without_positives_never_fires():
    miner = HardNegativeMiner(num_classes=2, feat_dim=2, **SPEC)
    miner.add_positives(0, torch.tensor([[5.0, 0.0]]))
    miner.process_image(torch.tensor([[-5.0, 0.0], [0.0, 3.0]]), torch.ones(2, 2, dtype=torch.bool))
    W, b = miner.finish()
    assert torch.all(W[:, 1] == 0) and b[1] < -100


def test_bad_inputs_have_clear_messages():
    miner = HardNegativeMiner(num_classes=2, feat_dim=3, **SPEC)
    with pytest.raises(ValueError, match="neg_mask"):
        miner.process_image(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="class id"):
        miner.add_positives(5, torch.randn(1, 3))


def test_max_hard_per_image_keeps_the_highest_scoring_negatives():
    from detector.svm import HardNegativeMiner

    g = torch.Generator().manual_seed(0)
    miner = HardNegativeMiner(1, 3, **SPEC, max_hard_per_image=2)
    miner.add_positives(0, torch.randn(20, 3, generator=g) + torch.tensor([3.0, 0.0, 0.0]))
    miner.process_image(torch.randn(30, 3, generator=g) - torch.tensor([3.0, 0.0, 0.0]), torch.ones(30, 1, dtype=torch.bool))
    before = miner.num_negatives(0)
    W, b = miner.W.clone(), miner.b.clone()
    feats = torch.randn(50, 3, generator=g)  # many windows near the boundary: all hard
    scores = (feats @ W + b)[:, 0]
    miner.process_image(feats, torch.ones(50, 1, dtype=torch.bool))
    added = miner.num_negatives(0) - before
    assert 0 < added <= 2
    # the two added are the two highest-scoring hard ones of the image
    hard = torch.nonzero(scores > -1.0001).flatten()
    expected = set(hard[torch.argsort(scores[hard], descending=True)[:2]].tolist())
    assert len(expected) == added


def test_linear_svms_module_scores_scaled_features_with_one_addmm():
    g = torch.Generator().manual_seed(0)
    W, b, f = torch.randn(6, 3, generator=g), torch.randn(3, generator=g), torch.rand(5, 6, generator=g)
    svms = LinearSVMs(W, b, feature_scale=2.5)
    torch.testing.assert_close(svms(f), (f * 2.5) @ W + b)
    assert set(svms.state_dict()) == {"weight", "bias"} and svms.num_classes == 3
    with pytest.raises(ValueError, match="feature_scale"):
        LinearSVMs(W, b, feature_scale=float("nan"))
    with pytest.raises(ValueError, match=r"bias \[K\]"):
        LinearSVMs(W, torch.zeros(4), 1.0)


@pytest.mark.parametrize("gt_negatives", [True, False])
def test_other_class_ground_truth_boxes_are_negatives(monkeypatch, gt_negatives):
    """Spec §7: a class's negatives are windows with IoU < 0.3 to every GT of that class, and the
    windows include the image's GT boxes, so another class's GT box is a negative (R-CNN's box list
    is GT + proposals). The mined windows are checked against the hand-made mask."""
    from pathlib import Path

    from detector.config import SVMConfig
    from detector.data.records import ImageRecord
    from detector.head import FCHead
    from detector.regions import Conv5Pyramid, ProjectionParams
    from detector.svm import train_svms
    from detector.train_items import TrainItem

    gt = torch.tensor([[8.0, 8.0, 70.0, 60.0], [90.0, 80.0, 150.0, 140.0]])  # class 0, class 1: apart
    props = torch.tensor([[8.0, 8.0, 50.0, 40.0], [0.0, 100.0, 40.0, 150.0]])  # IoU 0.42 with GT 0; background
    rec = ImageRecord("im0", Path("im0.jpg"), 160, 160, gt, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool))
    item = TrainItem(rec, False, gt, rec.labels, rec.difficult, props)
    pyr = Conv5Pyramid([torch.rand(4, 10, 10, generator=torch.Generator().manual_seed(0))], [(160, 160)], (160, 160))
    seen = []
    monkeypatch.setattr(HardNegativeMiner, "process_image",
                        lambda self, f, neg, keys=None, image_index=None: seen.append(neg.clone()) or {})
    head = FCHead(20, fc_dim=8, dropout=0.0)
    train_svms(head, [item], lambda it: pyr, (1, 2), ProjectionParams(16, 20.0, 2.0, 48.0), 2, 1.0,
               SVMConfig(gt_negatives=gt_negatives), progress=False)
    # rows: GT 0, GT 1, proposal on GT 0, background proposal (or the proposals only)
    want = [[False, True], [True, False], [False, True], [True, True]]
    assert seen[0].tolist() == (want if gt_negatives else want[2:])


def test_max_cache_keeps_the_hardest_negatives():
    """svm.max_cache: after a retrain at most N negatives stay per class, the highest-scoring ones."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(6, 3, generator=g) + 3.0
    neg = torch.randn(40, 3, generator=g) - 3.0
    miner = HardNegativeMiner(1, 3, **{**SPEC, "retrain_every": 10**6, "evict_thresh": -1e9}, max_cache=5)
    miner.add_positives(0, pos)
    miner.process_image(neg, torch.ones(40, 1, dtype=torch.bool))  # the first image: all, then a retrain
    assert miner.num_negatives(0) == 5
    w, b = miner.W[:, 0], miner.b[0]
    kept = miner.negative_keys(0).tolist()
    scores = neg @ w + b  # the retrain's scores (W has not changed since)
    assert sorted(kept) == sorted(torch.argsort(scores, descending=True)[:5].tolist())
    assert miner.history(0)[-1]["capped"] == 35.0  # 40 negatives, none evicted by score: 35 by the cap


def test_max_cache_drop_is_logged(caplog):
    g = torch.Generator().manual_seed(0)
    miner = HardNegativeMiner(1, 3, **{**SPEC, "retrain_every": 10**6, "evict_thresh": -1e9}, max_cache=5,
                              class_names=["cat"])
    miner.add_positives(0, torch.randn(6, 3, generator=g) + 3.0)
    with caplog.at_level("WARNING"):
        miner.process_image(torch.randn(40, 3, generator=g) - 3.0, torch.ones(40, 1, dtype=torch.bool))
    assert "svm cat (image 1): 40 cached negatives" in caplog.text and "svm.max_cache 5" in caplog.text
