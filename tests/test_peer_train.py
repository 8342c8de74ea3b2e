"""The peer trainer (detector.peer_train): its schedule against hand-computed rates, its data
order and flips against reference code, a tiny run scored through the project's evaluators, and a
killed run resumed to the same weights."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from detector.boxes import hflip_boxes
from detector.data.voc import load_voc_split
from detector.eval.voc_ap import evaluate as voc_evaluate
from detector.peer_train import RECIPES, _batch_ids, _detect, _sample, build_peer, lr_at, peer_transform, train_peer
import detector.peer_train as PT

FRCNN = "fasterrcnn_mobilenet_v3_large_fpn"


def test_multistep_schedule_hand_computed():
    r = replace(RECIPES[FRCNN], lr=0.02, warmup_iters=1000, warmup_factor=0.001, lr_steps=(16 / 26, 22 / 26),
                warmup_fraction=1.0)
    # 51 iterations per epoch: warm-up min(1000, 50) = 50 iterations; 260 in all: steps at 160, 220
    assert lr_at(r, 0, 260, 51) == pytest.approx(0.02 * 0.001)
    assert lr_at(r, 25, 260, 51) == pytest.approx(0.02 * (0.001 + 0.999 * 25 / 50))
    assert lr_at(r, 50, 260, 51) == pytest.approx(0.02)
    assert lr_at(r, 159, 260, 51) == pytest.approx(0.02)
    assert lr_at(r, 160, 260, 51) == pytest.approx(0.002)
    assert lr_at(r, 220, 260, 51) == pytest.approx(0.0002)
    # the recipe's own warm-up share: 1/26 of a 260-iteration run is 10 iterations
    r26 = replace(r, warmup_fraction=1 / 26)
    assert lr_at(r26, 5, 260, 51) == pytest.approx(0.02 * (0.001 + 0.999 * 5 / 10))
    assert lr_at(r26, 10, 260, 51) == pytest.approx(0.02)


def test_cosine_schedule_hand_computed():
    r = replace(RECIPES["ssdlite320_mobilenet_v3_large"], lr=0.1, warmup_iters=10, warmup_fraction=1.0)
    assert lr_at(r, 5, 100, 1000) == pytest.approx(0.1 * (0.001 + 0.999 * 0.5) * (0.5 * (1 + 0.9876883405951378)))
    assert lr_at(r, 50, 100, 1000) == pytest.approx(0.05)
    assert lr_at(r, 100, 100, 1000) == pytest.approx(0.0, abs=1e-12)


def test_batches_cover_each_epoch_once_and_repeat_exactly():
    got = [_batch_ids(10, 3, it, seed=4) for it in range(6)]  # 3 batches per epoch, 1 record dropped
    for epoch in (got[:3], got[3:]):
        flat = [i for b in epoch for i in b]
        assert len(flat) == 9 and len(set(flat)) == 9
    assert got == [_batch_ids(10, 3, it, seed=4) for it in range(6)]
    assert got[:3] != got[3:]
    small = _batch_ids(2, 5, 7, seed=0)
    assert len(small) == 5 and set(small) == {0, 1}


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    from detector.data.digits_build import make_digits_dataset

    root = tmp_path_factory.mktemp("peer") / "digits"
    make_digits_dataset(root, seed=3, n_trainval=4, n_test=2)
    return root


def test_flip_moves_boxes_like_the_reference(tiny_digits):
    from proposals.imageio import read_image

    records, _ = load_voc_split(tiny_digits, "trainval")
    r = next(r for r in records if len(r.boxes))
    raw = torch.from_numpy(read_image(r.path)).permute(2, 0, 1).float() / 255
    flips = 0
    for seed in range(8):
        img, tgt = _sample(r, peer_transform("hflip", train=True), seed)
        assert torch.equal(tgt["labels"], r.labels + 1)
        if torch.allclose(img, raw.flip(-1)):
            flips += 1
            torch.testing.assert_close(tgt["boxes"], hflip_boxes(r.boxes, r.width))
        else:
            assert torch.allclose(img, raw)
            torch.testing.assert_close(tgt["boxes"], r.boxes)
        again, tgt2 = _sample(r, peer_transform("hflip", train=True), seed)
        assert torch.equal(again, img) and torch.equal(tgt2["boxes"], tgt["boxes"])
    assert 0 < flips < 8


def _small(model=FRCNN):
    return replace(RECIPES[model], batch_size=2, min_size=96, max_size=128) if model == FRCNN else \
        replace(RECIPES[model], batch_size=2)


def test_tiny_run_is_scored_by_the_devkit_evaluator(tiny_digits, tmp_path):
    res = train_peer(tiny_digits, FRCNN, tmp_path / "run", budget_s=1, iterations=2, recipe=_small(),
                     progress=False)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["iterations"] == 2 and res.iterations == 2
    assert set(report["coco"]) == {"AP", "AP50", "AP75"} and report["mAP"] == pytest.approx(res.mAP)
    assert (tmp_path / "run" / "pr_curves.png").stat().st_size > 0
    # the comp4 files it writes score to the same mAP (what `sppnet eval` / `sppnet errors` read)
    test0, names0 = load_voc_split(tiny_digits, "test", None, raw_boxes=True)
    from detector.eval import read_comp4
    files = read_comp4(tmp_path / "run" / "results", "test", names0, image_ids=[r.image_id for r in test0])
    assert voc_evaluate(test0, names0, files).mAP == pytest.approx(report["mAP"], nan_ok=True)
    # peer.pt is a plain weights file; the saved model's detections give eval.json's mAP
    ck = torch.load(tmp_path / "run" / "peer.pt", weights_only=True)
    net = build_peer(ck["model"], ck["num_classes"], _small())
    net.load_state_dict(ck["state_dict"])
    test, names = load_voc_split(tiny_digits, "test", ck["class_names"], raw_boxes=True)
    dets, _ = _detect(net, test, progress=False)
    assert voc_evaluate(test, names, dets).mAP == pytest.approx(report["mAP"], nan_ok=True)
    assert "| fasterrcnn_mobilenet_v3_large_fpn |" in res.row()


def _killed_at(n: int, monkeypatch) -> None:
    """Training iteration ``n`` (1-based) raises KeyboardInterrupt, as a kill at that point."""
    real_step, calls = PT._step, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(PT, "_step", dies)


def test_killed_run_resumes_to_the_same_weights(tiny_digits, tmp_path, monkeypatch, caplog):
    kw = dict(budget_s=1, iterations=3, recipe=_small(), progress=False, save_every_s=0.0)
    whole = train_peer(tiny_digits, FRCNN, tmp_path / "whole", **kw)
    _killed_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_peer(tiny_digits, FRCNN, tmp_path / "killed", **kw)
    monkeypatch.undo()
    state = torch.load(tmp_path / "killed" / "train_state.pt", weights_only=True)
    assert state["it"] == 2 and state["total"] == 3
    with caplog.at_level("INFO", logger="detector"):
        resumed = train_peer(tiny_digits, FRCNN, tmp_path / "killed", **kw)
    assert "resuming" in caplog.text and "iteration 2 of 3" in caplog.text
    a = torch.load(tmp_path / "whole" / "peer.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "peer.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.mAP == pytest.approx(whole.mAP, nan_ok=True)


def test_a_changed_annotation_starts_the_run_over(tiny_digits, tmp_path, monkeypatch, caplog):
    """A training state saved for other ground truth is not resumed."""
    import shutil

    data = tmp_path / "digits"
    shutil.copytree(tiny_digits, data)
    kw = dict(budget_s=1, iterations=2, recipe=_small(), progress=False, save_every_s=0.0)
    _killed_at(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_peer(data, FRCNN, tmp_path / "run", **kw)
    monkeypatch.undo()
    xml = sorted((data / "Annotations").glob("*.xml"))[0]
    text = xml.read_text()
    i = text.index("<xmin>") + len("<xmin>")
    j = text.index("</xmin>")
    xml.write_text(text[:i] + str(int(float(text[i:j])) + 1) + text[j:])  # one box moves by a pixel
    with caplog.at_level("INFO", logger="detector"):
        train_peer(data, FRCNN, tmp_path / "run", **kw)
    assert "resuming" not in caplog.text


def test_ssdlite_trains_with_its_crop_augmentation(tiny_digits, tmp_path):
    res = train_peer(tiny_digits, "ssdlite320_mobilenet_v3_large", tmp_path / "ssd", budget_s=1, iterations=1,
                     recipe=_small("ssdlite320_mobilenet_v3_large"), progress=False)
    assert res.report["recipe"]["augmentation"] == "ssdlite" and res.iterations == 1


def test_the_probe_sizes_the_run_and_leaves_the_model_untouched(tiny_digits, tmp_path, monkeypatch):
    """Without ``iterations``: the probe's copies train, the run starts from the untrained model, and
    the count is (budget - probe seconds) / seconds per iteration. Replaying that count gives the
    same weights."""
    clock = iter(range(0, 10 ** 6, 2))  # every perf_counter() call advances 2 s
    monkeypatch.setattr(PT.time, "perf_counter", lambda: float(next(clock)))
    res = train_peer(tiny_digits, FRCNN, tmp_path / "probed", budget_s=20, probe_iters=2, recipe=_small(),
                     progress=False)
    # the probe's clock: start 0; step 0 untimed (t0 = 2); steps 1 and 2 from 4 to 6 and 8 to 10;
    # end 12. So 2 s per iteration and (20 - 12) / 2 = 4 iterations.
    assert res.report["probe_s"] == 12.0 and res.iterations == 4
    monkeypatch.undo()
    again = train_peer(tiny_digits, FRCNN, tmp_path / "replayed", budget_s=20, iterations=res.iterations,
                       recipe=_small(), progress=False)
    a = torch.load(tmp_path / "probed" / "peer.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "replayed" / "peer.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.iterations == res.iterations


def test_unknown_peer_is_refused(tiny_digits, tmp_path):
    with pytest.raises(ValueError, match="unknown peer"):
        train_peer(tiny_digits, "yolo", tmp_path, budget_s=1)
