"""SPP classifier (detector.classifier), crop sampling (detector.data.crops), training loop (detector.pretrain)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector.backbones import build_backbone
from detector.boxes import pairwise_iou
from detector.classifier import (
    ClassifierCheckpointError, FixedGridPool, SPPClassifier, classifier_state, load_classifier, reinit_kaiming,
    save_classifier,
)
from detector.data.crops import (
    CropSet, crops_from_folder, crops_from_records, cut_crops, cut_native, sample_background_boxes,
    sample_object_boxes,
)
from detector.pretrain import (
    batch_size_schedule, evaluate_native, evaluate_warped, preprocess_crops, train_classifier,
)
from detector.data.voc import ImageRecord

W = 0.125  # ZF-5 width multiplier for tests: 12/32/48/48/32 channels


def tiny(num_classes: int = 3, spp: bool = True, fc_dim: int = 32) -> SPPClassifier:
    torch.manual_seed(0)
    return SPPClassifier(build_backbone("zf5", width_mult=W), num_classes, fc_dim=fc_dim, levels=(1, 2, 3, 6),
                         dropout=0.5, spp=spp)


def test_spp_width_independent_of_input_size():
    model = tiny().eval()
    C = model.backbone.out_channels
    with torch.no_grad():
        for h, w in [(64, 64), (112, 112), (97, 141), (48, 200)]:
            pooled = model.pooled(torch.randn(1, 3, h, w))
            assert pooled.shape == (1, C * (1 + 4 + 9 + 36)), (h, w)
            assert model.head(pooled).shape == (1, 4)


def test_nospp_head_is_a_fixed_6x6_grid_at_224():
    model = tiny(spp=False).eval()
    C = model.backbone.out_channels
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        fmap = model.backbone(x)
        assert fmap.shape[-2:] == (13, 13)
        pooled = model.pooled(x)
        assert pooled.shape == (1, C * 36)
        assert torch.equal(pooled, F.max_pool2d(fmap, 3, 2).flatten(1))  # pool5 3/2: 13 -> 6
        with pytest.raises(ValueError, match="training size"):
            model.pooled(torch.randn(1, 3, 180, 180))
    assert FixedGridPool(13).grid == 6


def _toy_crops(n_per_class: int = 8, size: int = 48, seed: int = 0) -> CropSet:
    """Class 0: bright square in the top-left, class 1: bright square bottom-right, 2 (= K, bg): noise."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for k in range(3):
        for _ in range(n_per_class):
            im = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
            if k == 0:
                im[2:22, 2:22] = 230
            elif k == 1:
                im[26:46, 26:46] = 230
            imgs.append(im)
            labels.append(k)
    return CropSet(images=torch.stack(imgs), labels=torch.tensor(labels), class_names=("a", "b"),
                   image_ids=[str(i) for i in range(len(labels))], native=[im.numpy() for im in imgs])


def _ce(model, crops: CropSet) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(preprocess_crops(crops.images, model.input_format)), crops.labels))


def test_tiny_training_run_reduces_loss():
    crops = _toy_crops()
    model = tiny(num_classes=2)
    reinit_kaiming(model, sample=preprocess_crops(crops.images[::3], model.input_format))
    before = _ce(model, crops)
    hist = train_classifier(model, crops, mode="multi", sizes=(40, 48), epochs=3, batch_size=8, lr=0.01,
                            momentum=0.9, weight_decay=0.0, seed=0, clip_grad=5.0, progress=False)
    after = _ce(model, crops)
    assert [h["size"] for h in hist] == [40, 48, 40]
    assert after < 0.8 * before, (before, after)
    err = evaluate_warped(model, crops, size=48)
    assert err["n"] == len(crops) and 0.0 <= err["error"] <= 1.0


def test_training_resumes_exactly_after_an_epoch():
    crops = _toy_crops(n_per_class=2)
    kw = dict(mode="random", sizes=(40, 48), batch_size=3, lr=0.01, momentum=0.9, weight_decay=1e-4, seed=3,
              progress=False)
    full = tiny(num_classes=2)
    reinit_kaiming(full, input_std=60.0)
    init = {k: v.clone() for k, v in full.state_dict().items()}
    train_classifier(full, crops, epochs=2, **kw)
    states = []
    part = tiny(num_classes=2)
    part.load_state_dict(init)
    train_classifier(part, crops, epochs=2, on_epoch_end=lambda s: states.append(s), **kw)
    resumed = tiny(num_classes=2)
    train_classifier(resumed, crops, epochs=2, resume=states[0], **kw)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_and_backbone_loading(tmp_path: Path):
    model = tiny(num_classes=2, spp=True).eval()
    path = save_classifier(tmp_path / "classifier.pt", classifier_state(
        model, arch="zf5", width_mult=W, class_names=("a", "b"), mode="multi", meta={"note": "x"}))
    st = torch.load(path, map_location="cpu", weights_only=True)
    assert st["class_names"] == ["a", "b"] and st["mode"] == "multi" and st["levels"] == [1, 2, 3, 6]
    assert set(st["fc"]) >= {"fc6.weight", "fc7.weight", "cls_score.weight"}
    loaded, _ = load_classifier(path)
    x = torch.randn(2, 3, 150, 200)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    trunk = build_backbone("zf5", width_mult=W, weights=str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(trunk.state_dict()[k], v)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ClassifierCheckpointError, match="other.pt"):
        load_classifier(tmp_path / "other.pt")


def test_background_boxes_never_overlap_objects():
    gt = torch.tensor([[10.0, 10.0, 60.0, 60.0], [100.0, 40.0, 180.0, 150.0], [30.0, 120.0, 50.0, 140.0]])
    g = torch.Generator().manual_seed(0)
    bg = sample_background_boxes(gt, (200, 240), 50, g)
    assert bg.shape == (50, 4)
    assert (pairwise_iou(bg, gt) < 0.3).all()
    assert (bg[:, 0] >= 0).all() and (bg[:, 2] <= 240).all() and (bg[:, 1] >= 0).all() and (bg[:, 3] <= 200).all()
    assert ((bg[:, 2] - bg[:, 0]) >= 1).all() and ((bg[:, 3] - bg[:, 1]) >= 1).all()
    # no objects: any box goes
    assert sample_background_boxes(torch.zeros((0, 4)), (50, 50), 5, g).shape == (5, 4)


def test_object_boxes_belong_to_their_object():
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [35.0, 30.0, 90.0, 95.0]])  # overlapping objects
    g = torch.Generator().manual_seed(1)
    boxes, which = sample_object_boxes(gt, (100, 100), 200, g, jitter=0.2, context=1.5)
    iou = pairwise_iou(boxes, gt)
    assert (iou.gather(1, which[:, None]).squeeze(1) >= 0.5).all()
    assert torch.equal(iou.argmax(1), which)
    assert set(which.tolist()) == {0, 1}


def test_cut_crops_exact_on_a_linear_ramp():
    yy, xx = np.mgrid[0:20, 0:20]
    img = np.repeat((5 * xx + 7 * yy).astype(np.uint8)[..., None], 3, axis=2)
    crops = cut_crops(img, torch.tensor([[4.0, 6.0, 8.0, 10.0]]), 4)  # 4x4 px box -> 4x4: identity
    assert torch.equal(crops[0, :, :, 0], torch.from_numpy(img[6:10, 4:8, 0]))
    nat = cut_native(img, torch.tensor([[4.2, 6.0, 7.5, 10.0]]))
    assert nat[0].shape == (4, 4, 3) and np.array_equal(nat[0], img[6:10, 4:8])


def test_crops_from_records_labels():
    img = np.zeros((120, 160, 3), np.uint8)
    img[20:50, 30:60] = 200  # object of class 1
    img[70:110, 100:150] = 100  # object of class 0 (difficult in the held-out set test below)
    rec = ImageRecord("im0", Path("im0.jpg"), 120, 160, torch.tensor([[30.0, 20.0, 60.0, 50.0],
                                                                     [100.0, 70.0, 150.0, 110.0]]),
                      torch.tensor([1, 0]), torch.tensor([False, True]))
    train = crops_from_records([rec], ("zero", "one"), lambda p: img, size=32, objects_per_image=6,
                               bg_per_image=3, seed=0)
    assert train.images.shape == (9, 32, 32, 3) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1] * 6 + [2] * 3  # difficult object never sampled; bg = K = 2
    assert train.images[:6].float().mean() > 120  # the crops show the bright class-1 object
    held = crops_from_records([rec], ("zero", "one"), lambda p: img, size=32, objects_per_image=0,
                              bg_per_image=2, seed=0, heldout=True)
    assert held.labels.tolist() == [1, 2, 2] and held.native[0].shape == (30, 30, 3)


def test_own_size_evaluation_and_nospp_refusal():
    crops = _toy_crops(n_per_class=2)
    crops.native = [crops.native[0][:20, :30], *crops.native[1:]]  # one tiny crop: enlarged to 40
    res = evaluate_native(tiny(num_classes=2), crops, min_side=40)
    assert res["n"] == 6 and res["upscaled"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="SPP"):
        evaluate_native(tiny(num_classes=2, spp=False), crops)


def test_size_schedule_per_mode():
    g = torch.Generator().manual_seed(0)
    assert [batch_size_schedule("multi", (180, 224), e, g) for e in range(4)] == [180, 224, 180, 224]
    assert batch_size_schedule("single", (180, 224), 1, g) == 224
    assert batch_size_schedule("nospp", (180, 224), 0, g) == 224
    rs = {batch_size_schedule("random", (180, 224), 0, g) for _ in range(200)}
    assert min(rs) >= 180 and max(rs) <= 224 and len(rs) > 20
    with pytest.raises(ValueError, match="mode"):
        batch_size_schedule("bogus", (224,), 0, g)


def test_image_folder_crops(tmp_path: Path):
    from PIL import Image

    for name, val in (("cat", 30), ("dog", 220)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40 + i, 50, 3), val, np.uint8)).save(tmp_path / name / f"{i}.png")
    train, held = crops_from_folder(tmp_path, lambda p: np.asarray(Image.open(p).convert("RGB")), size=32,
                                    holdout_fraction=0.34, seed=0)
    assert train.class_names == ("cat", "dog")
    assert len(train) == 4 and len(held) == 2 and sorted(held.labels.tolist()) == [0, 1]
    assert held.native[0].shape[1] == 50


def test_context_crops_record_the_object_window():
    img = np.zeros((200, 200, 3), np.uint8)
    img[80:120, 90:110] = 250  # a 20 x 40 object in the middle
    rec = ImageRecord("im0", Path("im0.jpg"), 200, 200, torch.tensor([[90.0, 80.0, 110.0, 120.0]]),
                      torch.tensor([0]), torch.tensor([False]))
    held = crops_from_records([rec], ("a",), lambda p: img, size=64, objects_per_image=0, bg_per_image=1, seed=0,
                              heldout=True, windows=True, heldout_context=2.0)
    # crop = the box doubled about its centre, so the object fills the middle half of the crop
    assert torch.allclose(held.windows[0], torch.tensor([16.0, 16.0, 48.0, 48.0]))
    assert torch.equal(held.windows[1], torch.tensor([0.0, 0.0, 64.0, 64.0]))  # background: whole crop
    assert held.images[0, 20:44, 20:44].float().mean() > 240 and held.images[0, :10].float().mean() < 5
    assert held.native[0].shape == (40, 20, 3)  # own-size copy: the exact box
    train = crops_from_records([rec], ("a",), lambda p: img, size=64, objects_per_image=5, bg_per_image=0, seed=0,
                               context=2.0, windows=True)
    for im, w in zip(train.images, train.windows):  # every window covers exactly the bright object
        x1, y1, x2, y2 = (int(round(float(v))) for v in w)
        assert im[y1 + 1:y2 - 1, x1 + 1:x2 - 1].float().mean() > 240
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = True
        assert im[~inside].float().mean() < 5


def test_window_pooling_equals_spp_of_each_projected_window():
    from detector.projection import project_boxes
    from detector.spp import spp_pool

    model = tiny().eval()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 96, 96) * 50
    win = torch.tensor([[10.0, 20.0, 80.0, 90.0], [0.0, 0.0, 96.0, 96.0], [30.0, 30.0, 40.0, 41.0],
                        [50.0, 5.0, 95.0, 60.0]])
    with torch.no_grad():
        got = model.pooled(x, win)
        f = model.backbone(x)  # (4, C, 5, 5)
        bb = model.backbone
        cells = project_boxes(win, (96, 96), (96, 96), tuple(f.shape[-2:]), bb.stride, bb.proj_offset0,
                              bb.proj_shrink)
        want = torch.cat([spp_pool(f[i], cells[i:i + 1]) for i in range(4)])
        assert torch.equal(got, want)
        assert torch.equal(model.pooled(x, torch.tensor([[0.0, 0.0, 96.0, 96.0]] * 4)), model.pooled(x))
    with pytest.raises(ValueError, match="windows"):
        model.pooled(x, win[:2])


def test_training_with_windows_learns():
    """Class 0: a vertical bar, class 1: a horizontal bar, each somewhere in its crop with its window
    around it; background: noise pooled whole. Mirroring keeps the classes, so hflip is on."""
    g = torch.Generator().manual_seed(0)
    imgs, labels, wins = [], [], []
    for k in range(3):
        for _ in range(8):
            im = torch.randint(0, 60, (64, 64, 3), generator=g, dtype=torch.uint8)
            x, y = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
            if k == 0:
                im[y:y + 32, x + 12:x + 20] = 230
            elif k == 1:
                im[y + 12:y + 20, x:x + 32] = 230
            imgs.append(im)
            labels.append(k)
            wins.append([x, y, x + 32, y + 32] if k < 2 else [0, 0, 64, 64])
    crops = CropSet(images=torch.stack(imgs), labels=torch.tensor(labels), class_names=("a", "b"),
                    windows=torch.tensor(wins, dtype=torch.float32))
    model = tiny(num_classes=2)
    reinit_kaiming(model, sample=preprocess_crops(crops.images[::3], model.input_format))
    before = evaluate_warped(model, crops, size=64)["error"]
    hist = train_classifier(model, crops, mode="multi", sizes=(48, 64), epochs=8, batch_size=8, lr=3e-3,
                            momentum=0.9, weight_decay=0.0, seed=0, clip_grad=5.0, hflip=True, optimizer="adamw",
                            input_std=60.0, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"], [h["loss"] for h in hist]
    err = evaluate_warped(model, crops, size=64)
    assert err["n"] == len(crops) and err["error"] < min(before, 0.5), (before, err)
    # the no-SPP baseline ignores the windows (a fixed pool5 grid pools the whole crop)
    nospp = SPPClassifier(build_backbone("zf5", width_mult=W), 2, fc_dim=32, levels=(1, 2, 3, 6), dropout=0.5,
                          spp=False, nospp_conv5=3)  # 64 px
    h = train_classifier(nospp, crops, mode="nospp", sizes=(64,), epochs=1, batch_size=8, lr=1e-3, momentum=0.9,
                         weight_decay=0.0, seed=0, optimizer="adamw", progress=False)
    assert len(h) == 1 and evaluate_warped(nospp, crops, size=64)["n"] == len(crops)
