"""detector.eval.errors and `sppnet errors`: false positives by cause, hand-computed, and the AP each cause costs.

Boxes here are project xyxy (0-based continuous pixels); the detections go through the per-image
dict form, so the devkit's VOC conversion is exercised on the way.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.data.voc import ImageRecord
from detector.eval import evaluate, jitter_detections, write_comp4
from detector.eval.errors import CAUSES, analyze_errors, false_positive_gallery, plot_confusion, plot_errors


def record(image_id: str, boxes, labels, difficult=None, size=(100, 100), path=Path("none.png")) -> ImageRecord:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    lab = torch.tensor(labels, dtype=torch.int64)
    diff = torch.zeros(len(labels), dtype=torch.bool) if difficult is None else torch.tensor(difficult)
    return ImageRecord(image_id=image_id, path=path, height=size[0], width=size[1], boxes=b, labels=lab,
                       difficult=diff)


def dets(*rows) -> dict[str, torch.Tensor]:
    """rows: (box, score, label)."""
    return {"boxes": torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([r[1] for r in rows], dtype=torch.float32),
            "labels": torch.tensor([r[2] for r in rows], dtype=torch.int64)}


def random_split(seed: int, images: int, max_objects: int, spread: float, extent: float, size) -> list[ImageRecord]:
    """Images of 1..max_objects-1 random boxes of 3 classes (corners in [0, spread), sides 10..10+extent)."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(images):
        n = int(torch.randint(1, max_objects, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * spread
        wh = 10 + torch.rand(n, 2, generator=g) * extent
        records.append(record(f"im{i}", torch.cat([xy, xy + wh], 1).tolist(),
                              torch.randint(0, 3, (n,), generator=g).tolist(), size=size))
    return records


def hand_case():
    """Class "a" (0): one object in image m, one in f (never found); class "b" (1): one in m.

    Detections of "a", by score: 0.95 on the empty image e (background), 0.9 exact (true), 0.8 one
    pixel off (IoU 0.95: duplicate), 0.7 half-width (IoU 160/400 = 0.4: localization), 0.6 on the
    "b" object (confusion), 0.5 in empty space (background), 0.4 on the left edge (background at
    the frame). Class "b" has no detection.
    """
    records = [record("m", [(10, 10, 30, 30), (60, 60, 80, 80)], [0, 1]),
               record("e", [], [], size=(50, 50)),
               record("f", [(10, 10, 30, 30)], [0])]
    detections = {
        "e": dets(((20, 20, 30, 30), 0.95, 0)),
        "m": dets(((10, 10, 30, 30), 0.9, 0), ((11, 10, 30, 30), 0.8, 0), ((10, 10, 18, 30), 0.7, 0),
                  ((60, 60, 80, 80), 0.6, 0), ((40, 40, 50, 50), 0.5, 0), ((0, 40, 10, 50), 0.4, 0)),
        "f": dets(),
    }
    return records, ("a", "b"), detections


def test_each_false_positive_gets_its_cause():
    records, names, detections = hand_case()
    rep = analyze_errors(records, names, detections, keep_worst=3)
    a, b = rep.classes
    assert (a.n_gt, a.n_det, a.missed) == (2, 7, 1)
    assert a.all == {"true": 1, "duplicate": 1, "localization": 1, "confusion": 1, "background": 3,
                     "background_at_border": 1, "ignored": 0}
    # the 2 best-scored: the background box on the empty image, then the true one
    assert a.top == {"true": 1, "duplicate": 0, "localization": 0, "confusion": 0, "background": 1,
                     "background_at_border": 0, "ignored": 0}
    assert [(w.image_id, w.score, w.cause, w.at_border) for w in a.worst] == [
        ("e", pytest.approx(0.95), "background", False), ("m", pytest.approx(0.8), "duplicate", False),
        ("m", pytest.approx(0.7), "localization", False)]
    assert a.worst[0].box == (20.0, 20.0, 30.0, 30.0)  # back in project xyxy
    assert a.confused_with == {}  # the box on the "b" object is not among the 2 best-scored
    # scored first, the box on m's "b" object is a confusion among the 2 best, attributed to "b"
    first = analyze_errors(records, names, {**detections, "e": dets(), "m": dets(
        ((60, 60, 80, 80), 0.99, 0), ((10, 10, 30, 30), 0.9, 0))})
    assert first.classes[0].confused_with == {"b": 1} and first.classes[0].top["confusion"] == 1
    assert (b.n_gt, b.n_det, b.missed, b.ap) == (1, 0, 1, 0.0)
    assert b.all == {k: 0 for k in a.all}


def test_ap_without_each_cause_hand_computed():
    records, names, detections = hand_case()
    a = analyze_errors(records, names, detections).classes[0]
    # ranked tp: 0 1 0 0 0 0 0, npos 2: precision 0.5 at recall 0.5, recall 1 never reached:
    # the 6 levels 0..0.5 of the 11 at 0.5
    assert a.ap == pytest.approx(6 * 0.5 / 11)
    assert a.ap == pytest.approx(evaluate(records, names, detections).classes[0].ap)
    # without the three background boxes the true one comes first: precision 1 at recall 0.5
    assert a.ap_without["background"] == pytest.approx(6 / 11)
    assert a.ap_without["all"] == pytest.approx(6 / 11)
    for cause in ("duplicate", "localization", "confusion"):  # all ranked after the true one
        assert a.ap_without[cause] == pytest.approx(a.ap)
    assert a.dap("background") == pytest.approx(3 / 11)


def test_difficult_objects_are_ignored_not_false_positives():
    records = [record("m", [(10, 10, 30, 30), (50, 50, 70, 70)], [0, 0], difficult=[False, True])]
    detections = {"m": dets(((50, 50, 70, 70), 0.9, 0), ((10, 10, 30, 30), 0.8, 0))}
    a = analyze_errors(records, ("a",), detections).classes[0]
    assert a.top == {"true": 0, "duplicate": 0, "localization": 0, "confusion": 0, "background": 0,
                     "background_at_border": 0, "ignored": 1}  # npos 1: only the best-scored one
    assert a.all["true"] == 1 and a.all["ignored"] == 1 and a.ap == pytest.approx(1.0)


def test_border_distance_is_the_given_margin():
    records = [record("m", [], [], size=(60, 80))]
    detections = {"m": dets(((5, 5, 20, 20), 0.9, 0), ((30, 30, 75, 40), 0.8, 0), ((30, 30, 50, 40), 0.7, 0))}
    flags = lambda px: [w.at_border for w in analyze_errors(records, ("a",), detections, border_px=px,
                                                                keep_worst=3).classes[0].worst]
    assert flags(2) == [False, False, False]
    assert flags(5) == [True, True, False]  # x1 = 5 <= 5; x2 = 75 >= 80 - 5


def test_counts_add_up_and_ap_matches_the_devkit_on_a_jittered_split():
    records = random_split(0, 12, 6, 150, 40, (200, 200))
    names = ("a", "b", "c")
    detections = jitter_detections(records, 3, noise=0.15, miss=0.2, dup=0.3, fp=3,
                                   generator=torch.Generator().manual_seed(1))
    rep = analyze_errors(records, names, detections)
    ref = evaluate(records, names, detections)
    for c, r in zip(rep.classes, ref.classes):
        assert c.ap == pytest.approx(r.ap, nan_ok=True)
        assert c.n_det == r.n_det and c.all["true"] == r.tp and c.missed == r.n_gt - r.tp
        assert sum(c.all[k] for k in CAUSES) == r.fp
        assert sum(c.top[k] for k in ("true", "ignored", *CAUSES)) == min(c.n_gt, c.n_det)
        assert c.ap_without["all"] >= max(c.ap_without[k] for k in CAUSES) - 1e-12
        assert min(c.dap(k) for k in CAUSES) >= -1e-12  # removing false positives never lowers AP


def test_pictures_are_written(tmp_path):
    from PIL import Image

    img = tmp_path / "m.png"
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(img)
    records, names, detections = hand_case()
    # images that are not there: no picture (scoring needs only the annotations), nothing written
    assert false_positive_gallery(records, names, analyze_errors(records, names, detections),
                                  tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    records = [ImageRecord(**{**r.__dict__, "path": img}) for r in records]
    rep = analyze_errors(records, names, detections)
    assert plot_errors(rep, tmp_path / "errors.png").stat().st_size > 0
    assert plot_confusion(rep, tmp_path / "confusion.png").stat().st_size > 0
    pic = false_positive_gallery(records, names, rep, tmp_path / "fp.png", crop_height=60)
    with Image.open(pic) as im:
        assert im.width > 60 * 6  # one row of the 6 false positives of class "a"


def test_bad_arguments_are_refused():
    records, names, detections = hand_case()
    with pytest.raises(ValueError, match="metric"):
        analyze_errors(records, names, detections, metric="11")
    with pytest.raises(ValueError, match="border_px"):
        analyze_errors(records, names, detections, border_px=-1)


def test_sppnet_errors_on_comp4_files(tmp_path, capsys):
    from detector.commands.errors import main
    from detector.data.digits_build import make_digits_dataset
    from detector.data.voc import load_voc_split

    root = tmp_path / "digits"
    make_digits_dataset(root, seed=3, n_trainval=2, n_test=3)
    records, names = load_voc_split(root, "test", None, raw_boxes=True)
    detections = jitter_detections(records, len(names), noise=0.2, miss=0.2, dup=0.3, fp=2, generator=torch.Generator().manual_seed(0))
    write_comp4(tmp_path / "res", "test", names, detections)
    assert main(["--data-root", str(root), "--split", "test", "--results", str(tmp_path / "res"),
                 "--out", str(tmp_path / "out"), "--gallery", "2"]) == 0
    out = capsys.readouterr().out
    assert "+bkg" in out and "missed" in out
    report = json.loads((tmp_path / "out" / "errors.json").read_text())
    ref = evaluate(records, names, detections)
    assert [c["ap"] for c in report["classes"]] == pytest.approx([c.ap for c in ref.classes], nan_ok=True)
    assert (tmp_path / "out" / "errors.png").stat().st_size > 0
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0
    assert (tmp_path / "out" / "false_positives.png").stat().st_size > 0
    # with the proposals: the missed objects no proposal reaches (here the objects themselves: none)
    from proposals.store import save_proposals

    save_proposals(tmp_path / "p.npz", {r.image_id: r.boxes.numpy() for r in records})
    assert main(["--data-root", str(root), "--split", "test", "--results", str(tmp_path / "res"),
                 "--out", str(tmp_path / "out2"), "--gallery", "0", "--proposals", str(tmp_path / "p.npz")]) == 0
    report = json.loads((tmp_path / "out2" / "errors.json").read_text())
    assert [c["missed_no_proposal"] for c in report["classes"]] == [0] * len(names)
    assert not (tmp_path / "out2" / "false_positives.png").exists()
    # a missing results folder: one error line, exit code 2
    assert main(["--data-root", str(root), "--split", "test", "--results", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_causes_match_a_reference_loop():
    """Every false positive's cause, recomputed one detection at a time with torchvision's box_iou."""
    from torchvision.ops import box_iou

    from detector.eval.voc_ap import per_class_detections

    records = random_split(4, 10, 7, 120, 50, (180, 190))
    names = ("a", "b", "c")
    detections = jitter_detections(records, 3, noise=0.3, miss=0.1, dup=0.4, fp=4,
                                   generator=torch.Generator().manual_seed(2))
    rep = analyze_errors(records, names, detections, border_px=3, keep_worst=10 ** 6)
    per_class = per_class_detections(detections, names, strict=True)
    by_id = {r.image_id: r for r in records}
    for k, c in enumerate(rep.classes):
        assert len(c.worst) == sum(c.all[x] for x in CAUSES)  # every false positive kept, by score
        for fp in c.worst:
            rec = by_id[fp.image_id]
            box = torch.tensor([fp.box], dtype=torch.float64)
            same = rec.labels == k
            iou_same = box_iou(box, rec.boxes[same].double())[0] if bool(same.any()) else torch.zeros(0)
            iou_other = box_iou(box, rec.boxes[~same].double())[0] if bool((~same).any()) else torch.zeros(0)
            best_same = float(iou_same.max()) if len(iou_same) else 0.0
            if best_same >= 0.5 - 1e-6:
                want = "duplicate"
            elif best_same >= 0.1:
                want = "localization"
            elif len(iou_other) and float(iou_other.max()) >= 0.1:
                want = "confusion"
            else:
                want = "background"
            assert fp.cause == want, (fp, best_same)
            x1, y1, x2, y2 = fp.box
            edge = x1 <= 3 or y1 <= 3 or x2 >= rec.width - 3 or y2 >= rec.height - 3
            assert fp.at_border == (want == "background" and edge)
        # the confusions among the best-scored, by the class of the object they sit on
        assert sum(c.confused_with.values()) == c.top["confusion"]
        assert len(per_class[k]) == c.n_det


def test_missed_objects_without_a_proposal():
    records, names, detections = hand_case()
    far = np.array([[70.0, 70.0, 90.0, 90.0]])
    props = {"m": far, "e": np.zeros((0, 4)), "f": far}
    a, b = analyze_errors(records, names, detections, proposals=props).classes
    # "a" misses its object in f (no proposal there reaches it); "b"'s object in m has none either
    assert (a.missed, a.missed_no_proposal) == (1, 1) and (b.missed, b.missed_no_proposal) == (1, 1)
    props["f"] = np.array([[70.0, 70.0, 90.0, 90.0], [11.0, 10.0, 30.0, 31.0]])  # IoU 0.95 with f's object
    props["m"] = torch.tensor([[60.0, 60.0, 80.0, 70.0]])  # IoU 0.5 with "b"'s object: reached
    a, b = analyze_errors(records, names, detections, proposals=props).classes
    assert (a.missed, a.missed_no_proposal) == (1, 0) and (b.missed, b.missed_no_proposal) == (1, 0)
    assert analyze_errors(records, names, detections).classes[0].missed_no_proposal is None
    assert "(no proposal)" in analyze_errors(records, names, detections, proposals=props).text()


def test_rank_outcomes_marks_the_objects_found():
    from detector.eval.voc_ap import class_ground_truth, per_class_detections, rank_outcomes

    records, names, detections = hand_case()
    m = rank_outcomes(class_ground_truth(records, 0), per_class_detections(detections, names, strict=True)[0])
    assert m.found.tolist() == [True, False]  # m's object, then f's (e has none)
    assert m.tp.tolist() == [0, 1, 0, 0, 0, 0, 0] and m.npos == 2
