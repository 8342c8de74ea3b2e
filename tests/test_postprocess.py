"""Postprocess: per-class NMS equals torchvision.ops.nms and a slow greedy loop; top-k; thresholds."""
from __future__ import annotations

import pytest
import numpy as np
import torch
from torchvision.ops import nms as tv_nms

from detector.boxes import pairwise_iou, voc_to_xyxy
from torchvision.ops import batched_nms

from detector.postprocess import detections_from_scores, nms, nms_per_label, nms_top_per_label, topk_per_class

SPEC = {"score_thresh": -1.5, "nms_thresh": 0.3, "max_per_class": 100}  # spec §9 (detector.config.TestConfig)


def _slow_greedy_nms(boxes, scores, thresh):
    """Reference: the spec's greedy NMS written with +1 IoU on 1-based inclusive boxes."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i].tolist(), boxes[j].tolist()
            iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
            ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
            inter = max(iw, 0) * max(ih, 0)
            ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
            if inter / ua > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def _random_boxes(g, n, size=200):
    xy = torch.randint(0, size, (n, 2), generator=g).float()
    wh = torch.randint(5, 80, (n, 2), generator=g).float()
    return torch.cat([xy, xy + wh], 1)


def test_nms_matches_spec_plus_one_reference_on_voc_boxes():
    """Project IoU on voc_to_xyxy boxes == +1 IoU on inclusive VOC boxes, so NMS decisions agree."""
    g = torch.Generator().manual_seed(0)
    voc = _random_boxes(g, 300) + 1  # 1-based inclusive integer boxes
    scores = torch.rand(300, generator=g)
    keep = nms(voc_to_xyxy(voc), scores, 0.3)
    assert keep.tolist() == _slow_greedy_nms(voc, scores, 0.3)


def test_detections_equal_per_class_torchvision_nms():
    g = torch.Generator().manual_seed(1)
    R, K = 400, 4
    boxes = _random_boxes(g, R)
    scores = torch.randn(R, K, generator=g)
    out = detections_from_scores(boxes, scores, score_thresh=-0.5, nms_thresh=0.3, max_per_class=0)
    for k in range(K):
        m = scores[:, k] > -0.5
        idx = torch.nonzero(m).flatten()
        ref = idx[tv_nms(boxes[idx], scores[idx, k], 0.3)]
        got = out["boxes"][out["labels"] == k]
        torch.testing.assert_close(got, boxes[ref])
        torch.testing.assert_close(out["scores"][out["labels"] == k], scores[ref, k])
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64


def test_per_class_boxes_and_indices():
    g = torch.Generator().manual_seed(2)
    R, K = 60, 3
    base = _random_boxes(g, R)
    boxes = base[:, None, :] + torch.arange(K).float()[None, :, None] * 1000  # classes far apart
    scores = torch.rand(R, K, generator=g)
    out = detections_from_scores(boxes, scores, score_thresh=0.0, nms_thresh=0.3, max_per_class=100,
                                 return_indices=True)
    torch.testing.assert_close(out["boxes"], boxes[out["window_index"], out["labels"]])
    torch.testing.assert_close(out["scores"], scores[out["window_index"], out["labels"]])


def test_top_k_per_class_and_threshold():
    # 30 disjoint boxes, 2 classes: class 0 scores 0..29, class 1 scores -2..-1.0 (some below -1.5)
    xs = torch.arange(30).float() * 20
    boxes = torch.stack([xs, torch.zeros(30), xs + 10, torch.full((30,), 10.0)], 1)
    scores = torch.stack([torch.arange(30).float(), torch.linspace(-2.0, -1.0, 30)], 1)
    out = detections_from_scores(boxes, scores, score_thresh=-1.5, nms_thresh=0.3, max_per_class=7)
    lab0 = out["scores"][out["labels"] == 0]
    assert lab0.tolist() == [29.0, 28.0, 27.0, 26.0, 25.0, 24.0, 23.0]
    lab1 = out["scores"][out["labels"] == 1]
    assert lab1.numel() == 7 and torch.all(lab1 > -1.5)
    torch.testing.assert_close(lab1, scores[:, 1].sort(descending=True).values[:7])
    # strict threshold: a score equal to the threshold is dropped
    out2 = detections_from_scores(boxes[:1], torch.tensor([[-1.5, -1.4]]), **SPEC)
    assert out2["labels"].tolist() == [1]


@pytest.mark.parametrize("n_lab", [1, 5, 20])
def test_nms_per_label_equals_torchvision_batched_nms(n_lab):
    """Same kept boxes in the same order as torchvision's batched_nms, including labels with no
    candidates (gaps in the label values) and both of batched_nms's CPU paths (<= and > 1000 boxes)."""
    g = torch.Generator().manual_seed(n_lab)
    for n in (7, 400, 2500):
        boxes = _random_boxes(g, n, size=300)
        scores = torch.randperm(n, generator=g).float() / n  # distinct: the order of ties is unspecified
        labels = torch.randint(0, n_lab, (n,), generator=g) * 2  # only even labels occur
        for thresh in (0.3, 0.7):
            got = nms_per_label(boxes, scores, labels, thresh)
            assert got.tolist() == batched_nms(boxes, scores, labels, thresh).tolist()
    assert nms_per_label(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.3).numel() == 0


def _full_nms_topk(boxes, scores, labels, thresh, k):
    """Reference: NMS on every candidate of every label, then the k best kept per label."""
    keep = batched_nms(boxes, scores, labels, thresh)
    return keep[topk_per_class(labels[keep], k)]


@pytest.mark.parametrize("case", ["uniform", "clustered", "one_label_few_boxes"])
def test_nms_top_per_label_equals_full_nms(case):
    """NMS on each label's best candidates first keeps exactly what NMS on all candidates keeps
    (k best per label), also when the first round's candidates crowd one object and the label
    needs wider rounds (clustered)."""
    g = torch.Generator().manual_seed(3)
    n, n_lab, k = 1500, 5, 20
    boxes = _random_boxes(g, n, size=400)
    labels = torch.randint(0, n_lab, (n,), generator=g)
    scores = torch.randperm(n, generator=g).float() / n  # distinct (the order of ties is unspecified)
    if case == "clustered":
        # 600 jittered windows on one object hold every label's best scores: the first 2k
        # candidates of a label keep one or two boxes, so it needs a second and third round
        jitter = torch.randint(-3, 4, (600, 4), generator=g).float()
        boxes[:600] = torch.tensor([100.0, 100.0, 180.0, 170.0]) + jitter
        scores[:600] += 10.0
    if case == "one_label_few_boxes":
        labels = torch.zeros(n, dtype=torch.int64)
        labels[:7] = 3  # a label with fewer candidates than a round takes
    for thresh in (0.3, 0.5):
        got = nms_top_per_label(boxes, scores, labels, thresh, k, first=2 * k)
        got = got[topk_per_class(labels[got], k)]
        assert got.tolist() == _full_nms_topk(boxes, scores, labels, thresh, k).tolist()


def test_nms_top_per_label_widens_until_k_kept():
    """A label whose best candidates are all copies of one box keeps 1 box in round one; the call
    widens until 5 boxes are kept, equal to the full NMS."""
    dup = torch.tensor([[0.0, 0.0, 50.0, 50.0]]).repeat(40, 1)  # 40 copies, best scores
    far = torch.stack([torch.arange(10.0) * 100 + 200, torch.zeros(10), torch.arange(10.0) * 100 + 250,
                       torch.full((10,), 50.0)], 1)  # 10 disjoint boxes, lower scores
    boxes = torch.cat([dup, far])
    scores = torch.cat([torch.linspace(10, 9, 40), torch.linspace(5, 4, 10)])
    labels = torch.zeros(50, dtype=torch.int64)
    got = nms_top_per_label(boxes, scores, labels, 0.3, k=5, first=4)
    assert got[:5].tolist() == [0, 40, 41, 42, 43]
    assert got[:5].tolist() == _full_nms_topk(boxes, scores, labels, 0.3, 5).tolist()


def test_topk_per_class_mask():
    labels = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    assert topk_per_class(labels, 2).tolist() == [True, True, True, False, True, True, False]


def test_clipping_and_empty_boxes():
    boxes = torch.tensor([[-10.0, -5.0, 50.0, 40.0], [120.0, 10.0, 150.0, 20.0]])  # 2nd is outside a 100-wide image
    out = detections_from_scores(boxes, torch.tensor([[1.0], [2.0]]), image_size=(30, 100), **SPEC)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 50.0, 30.0]]))
    empty = detections_from_scores(torch.zeros(0, 4), torch.zeros(0, 5), **SPEC)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_iou_identity_used_in_docs():
    voc = torch.tensor([[1.0, 1.0, 10.0, 10.0], [6.0, 1.0, 15.0, 10.0]])  # inclusive, 10x10 each
    # +1 IoU: inter 5*10 = 50, union 150
    assert pairwise_iou(voc_to_xyxy(voc[:1]), voc_to_xyxy(voc[1:])).item() == pytest.approx(50 / 150)


def test_shape_errors():
    with pytest.raises(ValueError, match="boxes"):
        detections_from_scores(torch.zeros(3, 4), torch.zeros(4, 2), **SPEC)


def test_unusable_given_proposals_are_warned_about(caplog):
    """Inverted, empty or wholly outside proposals cannot yield a detection; detect() says so."""
    from detector.bench.random_model import random_detector

    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))
    img = np.full((80, 100, 3), 100, np.uint8)
    good = [[10.0, 10.0, 50.0, 60.0]]
    with caplog.at_level("WARNING"):
        det.detect(img, proposals=torch.tensor(good))
    assert "given proposals" not in caplog.text
    bad = good + [[50.0, 10.0, 10.0, 60.0], [5.0, 5.0, 5.0, 30.0], [200.0, 10.0, 260.0, 60.0]]
    with caplog.at_level("WARNING"):
        det.detect(img, proposals=torch.tensor(bad))
    assert "3 of 4 given proposals are empty, inverted" in caplog.text and "100x80 image" in caplog.text


def test_detector_postprocess_regresses_only_kept_boxes_in_spec_order():
    """SPPDetector.postprocess equals a per-class reference loop of spec §8-9: threshold, NMS 0.3 on the
    proposals, top-k, then each kept box refined by its own class's regressor from its proposal's
    features, clipped, NMS again, top-k."""
    import dataclasses

    from detector.bbox_reg import BoxRegressor, decode
    from detector.boxes import clip_boxes
    from detector.bench.random_model import random_detector

    g = torch.Generator().manual_seed(3)
    k, d, r = 3, 8, 60
    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=k)
    det.bbox = BoxRegressor(torch.randn(d + 1, 4 * k, generator=g) * 0.2, feature_scale=0.5)  # visible shifts
    det.params = dataclasses.replace(det.params, max_per_class=4)
    xy = torch.rand(r, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + 20 + torch.rand(r, 2, generator=g) * 60], 1)  # (R, 4), some past 200
    pooled = torch.rand(r, d, generator=g)
    scores = torch.randn(r, k, generator=g)
    h, w = 180, 200
    got = det.postprocess(boxes, pooled, scores, (h, w), score_threshold=-0.5)

    want_boxes, want_scores, want_labels = [], [], []
    for c in range(k):
        m = torch.nonzero(scores[:, c] > -0.5)[:, 0]
        b = clip_boxes(boxes[m], h, w)
        keep = tv_nms(b, scores[m, c], 0.3)[:4]
        idx = m[keep]  # windows kept for class c
        wc = det.bbox.weight[:, 4 * c:4 * c + 4]  # (D + 1, 4)
        deltas = pooled[idx] * 0.5 @ wc[:-1] + wc[-1]
        rb = clip_boxes(decode(boxes[idx], deltas), h, w)
        ok = (rb[:, 2] > rb[:, 0]) & (rb[:, 3] > rb[:, 1])
        rb, sc = rb[ok], scores[idx, c][ok]
        keep2 = tv_nms(rb, sc, 0.3)[:4]
        want_boxes.append(rb[keep2]), want_scores.append(sc[keep2])
        want_labels.append(torch.full((len(keep2),), c))
    ws = torch.cat(want_scores)
    order = torch.argsort(ws, descending=True)
    torch.testing.assert_close(got["scores"], ws[order])
    torch.testing.assert_close(got["boxes"], torch.cat(want_boxes)[order], atol=1e-4, rtol=1e-5)
    assert torch.equal(got["labels"], torch.cat(want_labels)[order])
    # the refinement did move boxes: a box equal to its proposal everywhere would not test anything
    assert not any(torch.isclose(got["boxes"], clip_boxes(b[None], h, w)).all(1).any() for b in boxes)


def test_nms_slices_on_threads_equal_one_thread(monkeypatch):
    """The per-label NMS calls spread over threads keep the same boxes in the same order."""
    import detector.postprocess as PP

    g = torch.Generator().manual_seed(5)
    n = 3000
    boxes = _random_boxes(g, n, size=300)
    scores = torch.randperm(n, generator=g).float() / n
    labels = torch.randint(0, 20, (n,), generator=g)
    want = batched_nms(boxes, scores, labels, 0.3).tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.setattr(PP, "_THREADED_NMS_MIN_BOXES", 0)
        assert nms_per_label(boxes, scores, labels, 0.3).tolist() == want
        assert PP._nms_pool is not None and PP._nms_pool_size >= 3  # the threaded path ran
        monkeypatch.setattr(PP, "_THREADED_NMS_MIN_BOXES", 10 ** 9)
        assert nms_per_label(boxes, scores, labels, 0.3).tolist() == want
    finally:
        torch.set_num_threads(threads)


def test_threaded_nms_works_in_a_forked_child(monkeypatch):
    """A child forked after the pool started gets its own pool (the parent's threads are not there)."""
    import multiprocessing as mp

    import detector.postprocess as PP

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method here")
    g = torch.Generator().manual_seed(6)
    boxes = _random_boxes(g, 500, size=200)
    scores = torch.rand(500, generator=g)
    labels = torch.randint(0, 5, (500,), generator=g)
    monkeypatch.setattr(PP, "_THREADED_NMS_MIN_BOXES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = nms_per_label(boxes, scores, labels, 0.3)  # starts the parent's pool
        with mp.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_nms_in_child, (boxes, scores, labels)).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert got == want.tolist()


def _nms_in_child(boxes, scores, labels):
    import detector.postprocess as PP

    PP._THREADED_NMS_MIN_BOXES = 0
    torch.set_num_threads(2)
    return nms_per_label(boxes, scores, labels, 0.3).tolist()
