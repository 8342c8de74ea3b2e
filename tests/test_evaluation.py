"""detector.eval (voc_ap, comp4, coco, plots, score_files, jitter): hand-computed VOCevaldet cases, a slow MATLAB-transcribed reference, comp4, COCO.

Boxes in the eval_class cases are written directly in VOC coordinates (1-based inclusive), as in
the devkit and the spec's examples.
"""
from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.boxes import voc_to_xyxy
from detector.eval import (
    RECALL_LEVELS_11,
    ClassDetections,
    ap_11point,
    class_ground_truth,
    coco_evaluate,
    coco_ground_truth,
    eval_class,
    evaluate,
    jitter_detections,
    plot_pr_curves,
    read_comp4,
    write_comp4,
    write_jittered_comp4,
)
from detector.data.voc import ImageRecord, load_voc_split

REPO = Path(__file__).resolve().parents[1]


def gt_of(**images) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """gt_of(a=[(box, difficult), ...]) -> eval_class's ground truth (VOC coords)."""
    out = {}
    for image_id, objs in images.items():
        boxes = np.array([b for b, _ in objs], dtype=np.float64).reshape(-1, 4)
        out[image_id] = (boxes, np.array([d for _, d in objs], dtype=bool))
    return out


def dets_of(rows) -> ClassDetections:
    """rows: [(image_id, score, (x1, y1, x2, y2)), ...] in results-file order."""
    if not rows:
        return ClassDetections.empty()
    return ClassDetections(tuple(r[0] for r in rows), np.array([r[1] for r in rows], dtype=np.float64),
                           np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4))


def grid_boxes(n: int) -> list[tuple[int, int, int, int]]:
    """n disjoint 10x10 VOC boxes in a row."""
    return [(1 + 20 * i, 1, 10 + 20 * i, 10) for i in range(n)]


A = (1, 1, 10, 10)
FAR = (200, 200, 220, 220)


# ----------------------------------------------------------------------------------------------
# hand-computed cases


def test_recall_levels_are_matlabs():
    assert RECALL_LEVELS_11 == (0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    # numpy's arange is not MATLAB's colon at 0.6 and 0.7
    assert np.arange(0.0, 1.1, 0.1)[6] > 0.6 and np.arange(0.0, 1.1, 0.1)[7] > 0.7


def test_perfect():
    gt = gt_of(a=[(A, False), ((30, 30, 60, 70), False)], b=[((5, 5, 50, 40), False)])
    d = dets_of([("a", 0.9, A), ("b", 0.8, (5, 5, 50, 40)), ("a", 0.7, (30, 30, 60, 70))])
    for metric in ("07", "area"):
        r = eval_class(gt, d, metric=metric)
        assert r.ap == pytest.approx(1.0, abs=1e-15) and (r.tp, r.fp, r.n_gt, r.recall) == (3, 0, 3, 1.0)


def test_all_wrong():
    gt = gt_of(a=[(A, False)], b=[])
    d = dets_of([("a", 0.9, FAR), ("b", 0.8, A), ("a", 0.7, (1, 1, 10, 3))])  # IoU 0.3
    for metric in ("07", "area"):
        r = eval_class(gt, d, metric=metric)
        assert r.ap == 0.0 and (r.tp, r.fp) == (0, 3) and r.recall == 0.0


def test_detections_on_difficult_are_ignored():
    # best GT difficult -> ignored (not FP) any number of times; difficult not in npos
    gt = gt_of(a=[(A, False), ((101, 101, 130, 130), True)])
    d = dets_of([("a", 0.95, (101, 101, 130, 130)), ("a", 0.9, (101, 101, 130, 130)), ("a", 0.8, A)])
    r = eval_class(gt, d)
    # treated as FP it would be (6*... ) < 1: precision 1/3 at the TP
    assert r.ap == pytest.approx(1.0, abs=1e-15)
    assert (r.n_gt, r.n_difficult, r.tp, r.fp, r.ignored) == (1, 1, 1, 0, 2)


def test_only_difficult_hits_matlab_nan():
    # every detection ignored: prec = 0/0 = NaN everywhere; MATLAB 11-point max(NaN...) = NaN,
    # xVOCap = 0 (the envelope's trailing 0 replaces NaN)
    gt = gt_of(a=[(A, False), ((101, 101, 130, 130), True)])
    d = dets_of([("a", 0.9, (101, 101, 130, 130))])
    assert math.isnan(eval_class(gt, d, metric="07").ap)
    assert eval_class(gt, d, metric="area").ap == 0.0


def test_difficult_wins_over_free_gt():
    # det's best GT is difficult (IoU 1) while a non-difficult GT also has IoU >= 0.5: ignored
    gt = gt_of(a=[((1, 2, 10, 11), False), (A, True)])
    d = dets_of([("a", 0.9, A)])
    r = eval_class(gt, d)
    assert (r.tp, r.fp, r.ignored) == (0, 0, 1) and math.isnan(r.ap)


def test_duplicates_are_false_positives():
    gt = gt_of(a=[(A, False), ((31, 31, 50, 50), False)])
    d = dets_of([("a", 0.9, A), ("a", 0.8, A), ("a", 0.7, (31, 31, 50, 50))])
    # rec [.5, .5, 1], prec [1, .5, 2/3]: levels 0..0.5 -> 1 (6 of them), 0.6..1 -> 2/3 (5)
    r = eval_class(gt, d)
    assert (r.tp, r.fp) == (2, 1)
    assert r.ap == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-15)
    # area: 0.5 * 1 + 0.5 * 2/3
    assert eval_class(gt, d, metric="area").ap == pytest.approx(0.5 + 1 / 3, abs=1e-15)


def test_tied_scores_keep_file_order():
    gt = gt_of(a=[(A, False)], b=[])
    fp_first = dets_of([("b", 0.5, A), ("a", 0.5, A)])
    tp_first = dets_of([("a", 0.5, A), ("b", 0.5, A)])
    # stable: FP then TP -> prec [0, .5] at rec [0, 1] -> AP 0.5; TP first -> AP 1
    assert eval_class(gt, fp_first).ap == pytest.approx(0.5, abs=1e-15)
    assert eval_class(gt, tp_first).ap == pytest.approx(1.0, abs=1e-15)
    assert eval_class(gt, fp_first, metric="area").ap == pytest.approx(0.5, abs=1e-15)
    # many ties: reversing a tie group with a 1-element prefix must still follow file order
    big = dets_of([("a", 0.9, FAR)] + [("b", 0.5, A)] * 20 + [("a", 0.5, A)])
    assert eval_class(gt, big).ap == pytest.approx(1 / 22, abs=1e-15)


def _recall_case(npos: int, first_tps: int):
    """npos disjoint GTs; `first_tps` TPs, 3 FPs, then 1 more TP."""
    boxes = grid_boxes(npos)
    rows = [("a", 1.0 - 0.01 * i, boxes[i]) for i in range(first_tps)]
    rows += [("a", 0.5 - 0.01 * i, FAR) for i in range(3)]
    rows += [("a", 0.1, boxes[first_tps])]
    return gt_of(a=[(b, False) for b in boxes]), dets_of(rows)


def test_recall_exactly_06_matlab_level():
    gt, d = _recall_case(5, 3)  # rec 0.6 = 3/5 with prec 1, then rec 0.8 with prec 4/7
    ap = eval_class(gt, d).ap
    # MATLAB's level 0.6 is the double 0.6: p(0.6) = 1 (7 levels at 1), p(0.7) = p(0.8) = 4/7
    assert ap == pytest.approx((7 + 2 * 4 / 7) / 11, abs=1e-15)
    numpy_levels = (6 + 3 * 4 / 7) / 11  # what np.arange's 0.6000000000000001 would give
    assert abs(ap - numpy_levels) > 0.03


def test_recall_exactly_07_matlab_level():
    gt, d = _recall_case(10, 7)  # rec 0.7 with prec 1, then rec 0.8 with prec 8/11
    ap = eval_class(gt, d).ap
    assert ap == pytest.approx((8 + 8 / 11) / 11, abs=1e-15)
    assert abs(ap - (7 + 2 * 8 / 11) / 11) > 0.02  # numpy levels


def test_recall_exactly_03_is_dropped_as_in_matlab():
    gt, d = _recall_case(10, 3)  # rec 0.3 (prec 1) does not reach the level 0.30000000000000004
    ap = eval_class(gt, d).ap
    # levels 0, .1, .2 -> 1; .3 and .4 -> 4/7 (rec 0.4); the rest 0
    assert ap == pytest.approx((3 + 2 * 4 / 7) / 11, abs=1e-15)


def test_iou_exactly_half_is_a_match():
    gt = gt_of(a=[(A, False)])
    r = eval_class(gt, dets_of([("a", 0.9, (1, 1, 10, 5))]))  # 10*5 / 10*10 = 0.5
    assert (r.tp, r.fp, r.ap) == (1, 0, pytest.approx(1.0))


def test_plus_one_case_from_spec():
    # GT (1,1,20,20) vs det (1,2,16,14): 16*13 / (400 + 208 - 208) = 0.52 with +1 widths: TP
    # (0.4986 without +1 on the raw VOC numbers: FP)
    gt = gt_of(a=[((1, 1, 20, 20), False)])
    r = eval_class(gt, dets_of([("a", 0.9, (1, 2, 16, 14))]))
    assert r.tp == 1 and r.ap == pytest.approx(1.0)
    # through the xyxy edge: records and per-image dicts in project coordinates
    rec = ImageRecord("a", Path("a.jpg"), 30, 30, voc_to_xyxy(torch.tensor([[1.0, 1, 20, 20]])),
                      torch.tensor([0]), torch.tensor([False]))
    det = {"a": {"boxes": voc_to_xyxy(torch.tensor([[1.0, 2, 16, 14]])), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])}}
    assert evaluate([rec], ["x"], det).classes[0].tp == 1


def test_no_fallback_to_second_best_gt():
    # det 2's best GT (A, IoU 1) is taken; GT B (IoU 0.818 with det 2) is free but not used
    gt = gt_of(a=[(A, False), ((1, 2, 10, 11), False)])
    d = dets_of([("a", 0.9, A), ("a", 0.8, A)])
    r = eval_class(gt, d)
    assert (r.tp, r.fp) == (1, 1)
    assert r.ap == pytest.approx(6 / 11, abs=1e-15)  # spec: no_reassign 0.5455
    assert eval_class(gt, d, metric="area").ap == pytest.approx(0.5, abs=1e-15)


def test_empty_detections_and_class_without_positives():
    gt = gt_of(a=[(A, False)])
    for metric in ("07", "area"):
        assert eval_class(gt, ClassDetections.empty(), metric=metric).ap == 0.0
    no_pos = gt_of(a=[(A, True)], b=[])
    d = dets_of([("b", 0.9, A)])
    assert eval_class(no_pos, d, metric="07").ap == 0.0  # rec = NaN: no level reached
    assert math.isnan(eval_class(no_pos, d, metric="area").ap)  # NaN recall steps
    assert eval_class(no_pos, ClassDetections.empty(), metric="area").ap == 0.0
    r = eval_class(no_pos, d)
    assert r.n_gt == 0 and math.isnan(r.recall)


def test_unknown_image_is_an_error():
    with pytest.raises(ValueError, match="zzz"):
        eval_class(gt_of(a=[(A, False)]), dets_of([("zzz", 0.9, A)]), name="dog")


def test_map_is_plain_mean_and_nan_propagates():
    recs = [ImageRecord("a", Path("a.jpg"), 50, 50, voc_to_xyxy(torch.tensor([[1.0, 1, 10, 10]])),
                        torch.tensor([0]), torch.tensor([False]))]
    dets = {"a": {"boxes": voc_to_xyxy(torch.tensor([[1.0, 1, 10, 10], [1.0, 1, 10, 10]])),
                  "scores": torch.tensor([0.9, 0.9]), "labels": torch.tensor([0, 1])}}
    r07 = evaluate(recs, ["x", "y"], dets)
    assert [c.ap for c in r07.classes] == [pytest.approx(1.0), 0.0] and r07.mAP == pytest.approx(0.5)
    rarea = evaluate(recs, ["x", "y"], dets, metric="area")
    assert math.isnan(rarea.classes[1].ap) and math.isnan(rarea.mAP)
    assert rarea.to_dict()["mAP"] is None


def test_ap_11point_ignores_nan_like_matlab_max():
    rec = np.array([0.0, 0.5, 1.0])
    prec = np.array([np.nan, 1.0, 0.5])
    assert ap_11point(rec, prec) == pytest.approx((6 + 5 * 0.5) / 11, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# slow reference: VOCevaldet.m / xVOCap.m transcribed line by line with Python floats


def _matlab_max(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) if vals else math.nan


def ref_vocevaldet(gt, ids, conf, BB, metric):
    npos = 0
    det = {}
    for i, (boxes, diff) in gt.items():
        det[i] = [False] * len(diff)
        npos += sum(1 for x in diff if not x)
    si = sorted(range(len(conf)), key=lambda k: -conf[k])  # Python sort is stable, like MATLAB
    nd = len(conf)
    tp = [0.0] * nd
    fp = [0.0] * nd
    for d in range(nd):
        i = ids[si[d]]
        bb = [float(v) for v in BB[si[d]]]
        ovmax = -math.inf
        jmax = None
        boxes, diff = gt[i]
        for j in range(len(boxes)):
            bbgt = [float(v) for v in boxes[j]]
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)
                ov = iw * ih / ua if ua else math.inf  # MATLAB: x/0 = Inf (iw*ih > 0 here)
                if ov > ovmax:
                    ovmax = ov
                    jmax = j
        if ovmax >= 0.5:
            if not diff[jmax]:
                if not det[i][jmax]:
                    tp[d] = 1.0
                    det[i][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    ctp, cfp, rec, prec = 0.0, 0.0, [], []
    for d in range(nd):
        ctp += tp[d]
        cfp += fp[d]
        rec.append(ctp / npos if npos else math.nan)
        prec.append(ctp / (cfp + ctp) if cfp + ctp else math.nan)
    if metric == "07":
        ap = 0.0
        for t in [0.0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 1 - 4 * 0.1, 1 - 3 * 0.1, 1 - 2 * 0.1, 1 - 0.1, 1.0]:
            sel = [p for p, r in zip(prec, rec) if r >= t]
            p = _matlab_max(sel) if sel else 0.0
            ap = ap + p / 11
        return ap
    mrec = [0.0] + rec + [1.0]
    mpre = [0.0] + prec + [0.0]
    for k in range(len(mpre) - 2, -1, -1):
        mpre[k] = _matlab_max([mpre[k], mpre[k + 1]])
    return sum((mrec[k] - mrec[k - 1]) * mpre[k] for k in range(1, len(mrec)) if mrec[k] != mrec[k - 1])


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12


def test_matches_matlab_reference_on_random_cases():
    rng = np.random.default_rng(1234)
    n_checked = 0
    for case in range(250):
        n_img = int(rng.integers(1, 5))
        npos_target = int(rng.choice([1, 3, 5, 10, 7]))
        gt = {}
        for i in range(n_img):
            g = int(rng.integers(0, npos_target + 2))
            xy = rng.integers(1, 40, size=(g, 2)).astype(float)
            wh = rng.integers(0, 25, size=(g, 2)).astype(float)
            if case % 3 == 0:
                wh += rng.random((g, 2)).round(1)  # float coordinates
            if case % 7 == 0:
                wh -= 3  # some corrupt GT (xmax < xmin): only intersecting GTs are candidates
            gt[f"im{i}"] = (np.concatenate([xy, xy + wh], 1).reshape(-1, 4), rng.random(g) < 0.15)
        nd = int(rng.integers(0, 25))
        ids, conf, BB = [], [], []
        for _ in range(nd):
            i = f"im{int(rng.integers(n_img))}"
            boxes = gt[i][0]
            if len(boxes) and rng.random() < 0.7:
                b = boxes[int(rng.integers(len(boxes)))] + rng.integers(-4, 5, size=4)
            else:
                xy = rng.integers(1, 40, size=2)
                b = np.concatenate([xy, xy + rng.integers(0, 25, size=2)]).astype(float)
            ids.append(i)
            conf.append(float(rng.integers(0, 6)) / 5)  # coarse scores: many ties
            BB.append([float(v) for v in b])
        dets = ClassDetections(tuple(ids), np.array(conf, dtype=np.float64),
                               np.array(BB, dtype=np.float64).reshape(-1, 4))
        for metric in ("07", "area"):
            ours = eval_class(gt, dets, metric=metric).ap
            ref = ref_vocevaldet(gt, ids, conf, BB, metric)
            assert _same(ours, ref), (case, metric, ours, ref)
            n_checked += 1
    assert n_checked == 500


# ----------------------------------------------------------------------------------------------
# comp4 files


def _records_and_dets():
    recs = []
    for i in range(3):
        boxes = torch.tensor([[10.0 + i, 20.0, 60.0, 90.5], [5.0, 5.0, 30.0, 25.0]])
        recs.append(ImageRecord(f"img{i}", Path(f"img{i}.jpg"), 120, 100, boxes,
                                torch.tensor([0, 1]), torch.tensor([False, i == 2])))
    g = torch.Generator().manual_seed(0)
    dets = {}
    for r in recs:
        b = r.boxes + torch.randn(2, 4, generator=g)
        b = torch.cat([b, torch.tensor([[70.0, 70.0, 99.5, 110.25]])])  # (3, 4)
        dets[r.image_id] = {"boxes": b, "scores": torch.tensor([0.9, 0.5, 0.5], dtype=torch.float64),
                            "labels": torch.tensor([0, 1, 0])}
    return recs, dets


def test_comp4_round_trip_exact(tmp_path: Path):
    recs, dets = _records_and_dets()
    classes = ("cat", "dog")
    paths = write_comp4(tmp_path, "test", classes, dets)
    assert [p.name for p in paths] == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]
    back = read_comp4(tmp_path, "test", classes, image_ids=[r.image_id for r in recs])
    assert len(back["cat"]) == 6 and len(back["dog"]) == 3
    direct = evaluate(recs, classes, dets)
    from_file = evaluate(recs, classes, back)
    assert [c.ap for c in direct.classes] == [c.ap for c in from_file.classes]
    # first line: 1-based VOC coordinates of the first cat detection, bit-exact
    first = (tmp_path / "comp4_det_test_cat.txt").read_text().splitlines()[0].split()
    assert first[0] == "img0" and float(first[1]) == 0.9
    exp = dets["img0"]["boxes"][0].double() + torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert [float(v) for v in first[2:]] == exp.tolist()


def test_comp4_parsing_whitespace_floats_blank_lines(tmp_path: Path):
    (tmp_path / "comp4_det_val_cat.txt").write_text(
        "img0\t0.9\t11 21 60 90.5\n\n  img1  0.25   1.5  2.25 30 40  \n\t\nimg2 1e-3 1 1 5 5"
    )
    (tmp_path / "comp4_det_val_dog.txt").write_text("")  # empty file: no detections
    got = read_comp4(tmp_path, "val", ["cat", "dog", "bird"], image_ids=["img0", "img1", "img2"])
    cat = got["cat"]
    assert cat.image_ids == ("img0", "img1", "img2")
    np.testing.assert_array_equal(cat.scores, [0.9, 0.25, 1e-3])
    np.testing.assert_array_equal(cat.voc_boxes, [[11, 21, 60, 90.5], [1.5, 2.25, 30, 40], [1, 1, 5, 5]])
    assert len(got["dog"]) == 0 and len(got["bird"]) == 0  # bird: file missing, warned


def test_comp4_errors_name_file_and_image(tmp_path: Path):
    (tmp_path / "comp4_det_val_cat.txt").write_text("img0 0.9 1 1 5 5\nimgX 0.8 1 1 5 5\n")
    with pytest.raises(ValueError, match=r"comp4_det_val_cat.txt:2: image 'imgX'"):
        read_comp4(tmp_path, "val", ["cat"], image_ids=["img0"])
    (tmp_path / "comp4_det_val_cat.txt").write_text("img0 0.9 1 1 5\n")
    with pytest.raises(ValueError, match=r"comp4_det_val_cat.txt:1: expected"):
        read_comp4(tmp_path, "val", ["cat"])
    (tmp_path / "comp4_det_val_cat.txt").write_bytes(b"img0 0.9 1 1 5 5\n\xff\xfe binary\n")
    with pytest.raises(ValueError, match=r"comp4_det_val_cat.txt: not a text results file"):
        read_comp4(tmp_path, "val", ["cat"])


# ----------------------------------------------------------------------------------------------
# COCO, plot


def test_coco_round_trip_and_perfect_detections(tmp_path: Path):
    from pycocotools.coco import COCO

    recs, _ = _records_and_dets()
    classes = ("cat", "dog")
    coco_gt = coco_ground_truth(recs, classes)
    (tmp_path / "gt.json").write_text(json.dumps(coco_gt))
    c = COCO(str(tmp_path / "gt.json"))
    assert len(c.getImgIds()) == 3 and len(c.getAnnIds()) == 6
    ann = c.loadAnns(c.getAnnIds(imgIds=[1], catIds=[1]))[0]
    assert ann["bbox"] == [10.0, 20.0, 50.0, 70.5] and ann["iscrowd"] == 0
    assert sum(a["iscrowd"] for a in coco_gt["annotations"]) == 1  # the one difficult object
    perfect = {r.image_id: {"boxes": r.boxes, "scores": torch.ones(len(r.labels)), "labels": r.labels}
               for r in recs}
    figs = coco_evaluate(recs, classes, perfect, out_dir=tmp_path)
    assert figs == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}
    assert (tmp_path / "coco_dets.json").is_file()
    # through comp4 (VOC coordinates) the figures are the same
    write_comp4(tmp_path / "res", "t", classes, perfect)
    assert coco_evaluate(recs, classes, read_comp4(tmp_path / "res", "t", classes)) == figs
    assert coco_evaluate(recs, classes, {})["AP"] == 0.0


def test_plot_pr_curves(tmp_path: Path):
    recs, dets = _records_and_dets()
    p = plot_pr_curves(evaluate(recs, ("cat", "dog"), dets), tmp_path / "pr.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_leave_the_backend_alone(tmp_path: Path):
    # a notebook user's backend must survive a plot: the library draws without pyplot
    code = ("import sys, matplotlib; matplotlib.use('svg'); "
            "from tests.test_evaluation import _records_and_dets; "
            "from detector.eval import evaluate, plot_pr_curves, plot_recall_curve; "
            "recs, dets = _records_and_dets(); "
            f"plot_pr_curves(evaluate(recs, ('cat', 'dog'), dets), {str(tmp_path / 'pr.png')!r}); "
            "curve = [{'k': k, 'recall@0.5': 0.1 * k, 'recall@0.7': 0.05 * k, 'AR': 0.04 * k} for k in (1, 2, 4)]; "
            f"plot_recall_curve(curve, {str(tmp_path / 'recall.png')!r}, 'x'); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pr.png", "recall.png"]  # no temp files left


def test_class_ground_truth_uses_voc_edge():
    recs, _ = _records_and_dets()
    gt = class_ground_truth(recs, 0)
    np.testing.assert_array_equal(gt["img1"][0], [[12.0, 21.0, 60.0, 90.5]])


# ----------------------------------------------------------------------------------------------
# CLI on BCCD


def test_cli_on_bccd_jittered_gt(bccd_root: Path, tmp_path: Path, capsys):
    # jittered GT comp4 files in-process (tools/jitter_gt_comp4.py's function), then the CLI in a
    # subprocess as a user runs it
    recs, classes = load_voc_split(bccd_root, "test")
    dets = jitter_detections(recs, len(classes), noise=0.08, miss=0.1, dup=0.05, fp=1.0,
                  generator=torch.Generator().manual_seed(0))
    res = tmp_path / "res"
    write_comp4(res, "test", classes, dets)
    out = subprocess.run([sys.executable, str(REPO / "tools/eval_detections.py"), "--data-root",
                          str(bccd_root), "--split", "test", "--results", str(res)], check=True,
                         capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    assert lines[-1].startswith("mAP: 0.") and len(lines[-1]) == len("mAP: 0.xxxxxx")
    assert "COCO (pycocotools): AP" in out and "WBC" in out and "Platelets" in out
    saved = json.loads((res / "eval.json").read_text())
    assert f"{saved['mAP']:.6f}" == lines[-1].split()[1]
    # the CLI (raw_boxes GT, comp4 round trip) agrees with the in-process evaluation
    assert saved["mAP"] == pytest.approx(evaluate(recs, classes, dets).mAP, abs=1e-12)
    assert {c["class"]: c["n_gt"] for c in saved["classes"]}["WBC"] > 0
    assert 0.3 < saved["mAP"] < 1.0 and (res / "pr_curves.png").is_file()
    # a results file naming an image outside the split: clear error, exit 2 (main() in-process)
    (res / "comp4_det_test_WBC.txt").write_text("NotAnImage 0.9 1 1 10 10\n")
    main = runpy.run_path(str(REPO / "tools/eval_detections.py"))["main"]
    capsys.readouterr()
    assert main(["--data-root", str(bccd_root), "--split", "test", "--results", str(res)]) == 2
    assert "NotAnImage" in capsys.readouterr().err


def _voc_annotations(root: Path) -> None:
    """Two annotated images (no image files: scoring reads annotations only), split 'val'."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    objs = {"img0": [("cat", (11, 21, 60, 90))], "img1": [("dog", (5, 5, 30, 25)), ("cat", (40, 40, 90, 99))]}
    for image_id, boxes in objs.items():
        xml = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                      f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in boxes)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>120</width><height>100</height><depth>3</depth></size>{xml}</annotation>")
    (root / "ImageSets" / "Main" / "val.txt").write_text("img0\nimg1\n")


def test_score_comp4_files_perfect_detections(tmp_path: Path):
    from detector.eval import score_comp4_files

    _voc_annotations(tmp_path / "voc")
    res = tmp_path / "res"
    res.mkdir()
    (res / "comp4_det_val_cat.txt").write_text("img0 0.9 11 21 60 90\nimg1 0.8 40 40 90 99\n")
    (res / "comp4_det_val_dog.txt").write_text("img1 0.7 5 5 30 25\n")
    rep = score_comp4_files(tmp_path / "voc", "val", res, coco=False, argv=["x"])
    lines = rep.text().splitlines()
    assert lines[0] == "val: 2 images, metric VOC07 11-point" and lines[-1] == "mAP: 1.000000"
    assert lines[-2] == f"wrote {res / 'eval.json'} and {res / 'pr_curves.png'}"
    saved = json.loads((res / "eval.json").read_text())
    assert saved["mAP"] == pytest.approx(1.0) and saved["argv"] == ["x"] and saved["coco"] is None
    assert sorted(p.name for p in res.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_eval_detections_tool_user_errors(tmp_path: Path, capsys):
    main = runpy.run_path(str(REPO / "tools/eval_detections.py"))["main"]
    _voc_annotations(tmp_path / "voc")
    args = ["--data-root", str(tmp_path / "voc"), "--split", "val", "--no-coco", "--results"]

    def one_error() -> str:
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err
        return errors[0]

    assert main(args + [str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in one_error()
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "comp4_det_val_cat.txt").write_text("img0 0.9 11 21 60\n")  # a field short
    assert main(args + [str(tmp_path / "res")]) == 2
    assert "comp4_det_val_cat.txt:1: expected" in one_error()
    assert main(["--data-root", str(tmp_path / "nope")] + args[2:] + [str(tmp_path / "res")]) == 2
    assert "split file not found" in one_error()
    jitter = runpy.run_path(str(REPO / "tools/jitter_gt_comp4.py"))["main"]
    assert jitter(["--data-root", str(tmp_path / "nope"), "--split", "val", "--out", str(tmp_path / "j")]) == 2
    assert "split file not found" in one_error()


def test_write_jittered_comp4_is_seeded(tmp_path: Path):
    _voc_annotations(tmp_path / "voc")
    (tmp_path / "voc" / "JPEGImages").mkdir()  # the split is read as for training: image files must exist
    for image_id in ("img0", "img1"):
        (tmp_path / "voc" / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")
    paths, n = write_jittered_comp4(tmp_path / "voc", "val", tmp_path / "a", miss=0.0, fp=0.0, seed=3)
    again, _ = write_jittered_comp4(tmp_path / "voc", "val", tmp_path / "b", miss=0.0, fp=0.0, seed=3)
    assert [p.name for p in paths] == ["comp4_det_val_cat.txt", "comp4_det_val_dog.txt"] and n >= 3
    assert [p.read_text() for p in paths] == [p.read_text() for p in again]


def test_bad_detection_dicts_are_clear_errors():
    recs, _ = _records_and_dets()
    with pytest.raises(ValueError, match="img0.*labels must be in 0..1"):
        evaluate(recs, ("cat", "dog"), {"img0": {"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                                  "labels": torch.tensor([2])}})
    with pytest.raises(ValueError, match=r"img0.*expected \[N, 4\]"):
        evaluate(recs, ("cat", "dog"), {"img0": {"boxes": torch.zeros(2, 4), "scores": torch.ones(1),
                                                  "labels": torch.tensor([0])}})
    with pytest.raises(ValueError, match="imgZ"):
        evaluate(recs, ("cat", "dog"), {"imgZ": {"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                                  "labels": torch.tensor([0])}})
