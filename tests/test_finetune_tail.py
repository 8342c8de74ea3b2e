"""Fine-tuning the trunk's last conv units with the fc head (finetune.conv_layers, a deviation
from spec §6 that Fast R-CNN showed pays): the trunk split, what is trained, resume, learning."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detector.backbones import ZF5, ResNet50C4, TrunkPrefix, VGG16Conv5
from detector.head import FCHead
from detector.bench.random_model import random_boxes
from detector.regions import Conv5Pyramid, ProjectionParams
from detector.spp import spp_out_dim
from detector.training import TrainItem, finetune_head_and_tail
from detector.data.voc import ImageRecord

LEVELS = (1, 2)


@pytest.mark.parametrize("cls,kw", [(ZF5, {"width_mult": 0.125}), (VGG16Conv5, {}), (ResNet50C4, {})])
def test_prefix_then_tail_is_the_trunk(cls, kw):
    torch.manual_seed(0)
    trunk = cls(**kw).eval()
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        ref = trunk(x)  # (1, C, Hs, Ws)
        for n in range(trunk.tail_units + 1):
            pre = TrunkPrefix(trunk, n)
            mid = pre(x)
            assert mid.shape[1] == pre.out_channels and mid.shape[-2:] == ref.shape[-2:]  # stride 16 throughout
            torch.testing.assert_close(trunk.forward_tail(mid, n), ref, rtol=0, atol=0)
    assert len(trunk.tail_modules(trunk.tail_units)) == trunk.tail_units
    with pytest.raises(ValueError, match="tail has 0"):
        trunk.forward_prefix(x, trunk.tail_units + 1)


def _setup(n_items: int = 3, seed: int = 0):
    """A width-1/8 ZF-5, its prefix maps of random images at two scales, GT boxes and proposals."""
    torch.manual_seed(seed)
    trunk = ZF5(width_mult=0.125).eval()
    for m in trunk.modules():  # He init: the spec's N(0, 0.01^2) leaves a random trunk's maps ~constant
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    gen = torch.Generator().manual_seed(seed)
    items, prefix = [], {}
    for i in range(n_items):
        gt = torch.tensor([[8.0, 8.0, 60.0, 56.0], [64.0, 50.0, 124.0, 120.0]])
        lab = torch.tensor([0, 1])
        props = torch.cat([gt.repeat(3, 1) + torch.randn(6, 4, generator=gen).mul(4),  # 3 jittered copies
                           random_boxes(128, 128, 30, gen, min_size=24)])
        rec = ImageRecord(f"im{i}", Path(f"im{i}.jpg"), 128, 128, gt, lab, torch.zeros(2, dtype=torch.bool))
        items.append(TrainItem(rec, False, gt, lab, rec.difficult, props))
        img = torch.rand(1, 3, 128, 128, generator=gen) * 255 - 128
        with torch.no_grad():
            maps = [trunk.forward_prefix(F.interpolate(img, size=(s, s), mode="bilinear"), 2)[0] for s in (96, 128)]
        prefix[rec.image_id] = Conv5Pyramid([m.half() for m in maps], [(96, 96), (128, 128)], (128, 128))
    proj = ProjectionParams.of(trunk, target_side=48)
    head = FCHead(spp_out_dim(trunk.out_channels, LEVELS), fc_dim=32, num_classes=2, dropout=0.0)
    return trunk, head, items, (lambda it: prefix[it.record.image_id]), proj


@torch.no_grad()
def _train_loss(trunk, head, items, load, proj) -> float:
    """Mean cross-entropy of every labelled window of ``items`` (spec §5 scales, eval mode)."""
    from detector.regions import pool_regions
    from detector.sampling import label_windows

    total, n = 0.0, 0
    for it in items:
        cand = torch.cat([it.gt_boxes, it.proposals])
        lab, _, _ = label_windows(cand, it.gt_boxes, it.gt_labels, 2, fg_iou=0.5, bg_low=0.1, bg_high=0.5)
        keep = lab >= 0
        pre = load(it)
        pyr = Conv5Pyramid([trunk.forward_tail(f.float()[None], 2)[0] for f in pre.fmaps], pre.scaled_sizes,
                           pre.image_size)
        logits = head.eval()(pool_regions(pyr, cand[keep], LEVELS, proj))
        total += float(F.cross_entropy(logits, lab[keep], reduction="sum"))
        n += int(keep.sum())
    return total / n


def _run(trunk, head, items, load, proj, iters, **kw):
    return finetune_head_and_tail(head, trunk, 2, items[:2], items[2:], load, LEVELS, proj, 2, iters=iters,
                                  lr=0.01, lr_steps=[6], batch_size=16, images_per_batch=2, val_every=4,
                                  val_batches=1, progress=False, **kw)


def _tune(trunk, head, items, load, proj, mult: float = 1.0):
    return finetune_head_and_tail(head, trunk, 2, items[:2], items[2:], load, LEVELS, proj, 2, iters=100,
                                  lr=0.001, lr_steps=[80], tail_lr_mult=mult, batch_size=16, val_every=50,
                                  val_batches=1, progress=False)


def test_only_the_tail_and_head_change_and_the_loss_falls():
    trunk, head, items, load, proj = _setup()
    before = copy.deepcopy(trunk.state_dict())
    head0 = copy.deepcopy(head.state_dict())
    loss0 = _train_loss(trunk, head, items[:2], load, proj)
    head, hist = _tune(trunk, head, items, load, proj)
    after = trunk.state_dict()
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "conv3.bias"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    for name in ("conv4.weight", "conv5.weight", "conv5.bias"):
        assert not torch.equal(after[name], before[name]), name
    assert not torch.equal(head.state_dict()["fc6.weight"], head0["fc6.weight"])
    assert not trunk.training and not head.training
    assert hist["val_iter"] == [50, 100] and hist["best_iter"] in (50, 100)
    # 2 images, 2 GT + 6 jittered copies each: their windows are learnt, and better with the tail
    # learning than with it frozen (conv_lr_mult 0: the same run, the tail left as it was)
    loss1 = _train_loss(trunk, head, items[:2], load, proj)
    trunk_f, head_f, _, _, _ = _setup()
    head_f, _ = _tune(trunk_f, head_f, items, load, proj, mult=0.0)
    for k, v in trunk_f.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    loss_frozen = _train_loss(trunk_f, head_f, items[:2], load, proj)
    assert loss1 < 0.3 * loss0 and loss1 < loss_frozen, (loss0, loss1, loss_frozen)


def test_resume_replays_the_same_run():
    """A run interrupted after its first validation and resumed from the saved state ends with the
    same head and tail as an uninterrupted run (batches are drawn per iteration from the seed)."""
    trunk, head, items, load, proj = _setup()
    trunk_b, head_b = copy.deepcopy(trunk), copy.deepcopy(head)
    saved = []
    head_a, _ = _run(trunk, head, items, load, proj, 8, save_state=lambda st: saved.append(copy.deepcopy(st)))
    assert [s["iter"] for s in saved] == [4]
    head_b, _ = _run(trunk_b, head_b, items, load, proj, 8, resume_state=saved[0])
    for k, v in head_a.state_dict().items():
        torch.testing.assert_close(head_b.state_dict()[k], v, rtol=0, atol=0)
    for k, v in trunk.state_dict().items():
        torch.testing.assert_close(trunk_b.state_dict()[k], v, rtol=0, atol=0)


def test_bad_arguments_are_named():
    trunk, head, items, load, proj = _setup(n_items=2)
    with pytest.raises(ValueError, match="n_tail"):
        finetune_head_and_tail(head, trunk, 4, items, [], load, LEVELS, proj, 2, iters=1, lr=0.01, lr_steps=[],
                               progress=False)
    with pytest.raises(ValueError, match="images_per_batch"):
        finetune_head_and_tail(head, trunk, 1, items, [], load, LEVELS, proj, 2, iters=1, lr=0.01, lr_steps=[],
                               images_per_batch=0, progress=False)
