"""Fine-tuning (detector.finetune): the one loop with both window sources. With the trunk's last
conv units (finetune.conv_layers, a deviation from spec §6 that Fast R-CNN showed pays): the trunk
split, what is trained, learning. Both sources: the batches' composition, and a resumed run equal
to an uninterrupted one with dropout on."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detector.backbones import ZF5, ZF5BN, ResNet50C4, TrunkPrefix, VGG16Conv5
from detector.config import FinetuneConfig
from detector.data.voc import ImageRecord
from detector.finetune import CachedWindows, TunedTailWindows, finetune
from detector.head import FCHead
from detector.regions import Conv5Pyramid, ProjectionParams
from detector.spp import spp_out_dim
from detector.train_items import TrainItem

LEVELS = (1, 2)


@pytest.mark.parametrize("cls,kw", [(ZF5, {"width_mult": 0.125}), (ZF5BN, {"width_mult": 0.125}), (VGG16Conv5, {}),
                                    (ResNet50C4, {})])
def test_prefix_then_tail_is_the_trunk(cls, kw):
    torch.manual_seed(0)
    trunk = cls(**kw).eval()
    for m in trunk.modules():  # BatchNorms with statistics of their own, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
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


def random_boxes(h: int, w: int, n: int, g: torch.Generator, min_size: int) -> torch.Tensor:
    """n random xyxy boxes inside an h x w image, each side at least min_size."""
    wh = min_size + torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - min_size)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
    return torch.cat([xy, xy + wh], 1)


def _setup(n_items: int = 3, seed: int = 0, dropout: float = 0.0):
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
    head = FCHead(spp_out_dim(trunk.out_channels, LEVELS), fc_dim=32, num_classes=2, dropout=dropout)
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


def _params(**kw) -> FinetuneConfig:
    base = dict(iters=100, lr=0.001, lr_steps=(80,), batch_size=16, images_per_batch=2, val_every=50,
                val_batches=1, conv_layers=2)
    return FinetuneConfig(**{**base, **kw})


def _tail(trunk, head, items, load, proj, params, **kw):
    source = TunedTailWindows(trunk, 2, items[:2], items[2:], load, LEVELS, proj, 2, params)
    return finetune(head, source, params, progress=False, **kw)


def _tune(trunk, head, items, load, proj, mult: float = 1.0):
    return _tail(trunk, head, items, load, proj, _params(conv_lr_mult=mult))


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


@pytest.mark.parametrize("with_tail", [True, False])
def test_resume_replays_the_same_run_with_dropout(with_tail):
    """A run interrupted after its first validation and resumed from the saved state ends with the
    same head (and tail) as an uninterrupted run, bit for bit, with dropout 0.5: batch draws are
    functions of the iteration (or chunk) and the dropout generator's state is in the resume file.
    The resumed run starts from a different global RNG state, as a new process would."""
    trunk, head, items, load, proj = _setup(dropout=0.5)
    trunk_b, head_b = copy.deepcopy(trunk), copy.deepcopy(head)
    params = _params(iters=10, val_every=4, lr_steps=(6,), lr=0.01, chunk_iters=4, chunk_images=2)

    def run(tr, hd, **kw):
        if with_tail:
            return _tail(tr, hd, items, load, proj, params, **kw)
        src = CachedWindows(items[:2], items[2:], lambda it: _full(tr, load(it)), LEVELS, proj, 2, params)
        return finetune(hd, src, params, progress=False, **kw)

    saved = []
    torch.manual_seed(5)
    head_a, hist_a = run(trunk, head, save_state=lambda st: saved.append(copy.deepcopy(st)))
    assert [s["iter"] for s in saved] == [4, 8]
    torch.manual_seed(123)  # another process: another global generator state
    head_b, hist_b = run(trunk_b, head_b, resume_state=saved[0])
    assert hist_b["loss"] == hist_a["loss"]
    for k, v in head_a.state_dict().items():
        torch.testing.assert_close(head_b.state_dict()[k], v, rtol=0, atol=0)
    for k, v in trunk.state_dict().items():
        torch.testing.assert_close(trunk_b.state_dict()[k], v, rtol=0, atol=0)


def _full(trunk, pre: Conv5Pyramid) -> Conv5Pyramid:
    """conv5 maps from prefix maps (the fc-only source pools fixed conv5 maps)."""
    with torch.no_grad():
        return Conv5Pyramid([trunk.forward_tail(f.float()[None], 2)[0] for f in pre.fmaps], pre.scaled_sizes,
                            pre.image_size)


def test_cached_windows_batches_mix_images_with_the_foreground_share():
    trunk, head, items, load, proj = _setup(n_items=6)
    params = _params(batch_size=16, chunk_iters=3, chunk_images=4, fg_fraction=0.25)
    src = CachedWindows(items, [], lambda it: _full(trunk, load(it)), LEVELS, proj, 2, params)
    batches = list(src.batches(0, 6))
    assert len(batches) == 6
    for x, y, n, rows in batches:
        assert n == 16 and x.shape == (16, head.in_dim) and int((y < 2).sum()) == 4 and int((y == 2).sum()) == 12
        assert torch.equal(rows, torch.arange(16))  # one process: the whole batch, in order
    again = list(src.batches(0, 6))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # a resume inside a chunk replays its draw: iterations 4.. equal the uninterrupted ones
    tail = list(src.batches(4, 6))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[4:], tail))


def test_bad_arguments_are_named():
    trunk, head, items, load, proj = _setup(n_items=2)
    with pytest.raises(ValueError, match="n_tail"):
        TunedTailWindows(trunk, 4, items, [], load, LEVELS, proj, 2, _params())
    with pytest.raises(ValueError, match="images_per_batch"):
        TunedTailWindows(trunk, 1, items, [], load, LEVELS, proj, 2, _params(images_per_batch=0))


def test_tuned_tail_rows_place_each_rank_in_the_one_process_batch(monkeypatch):
    """With 2 processes each rank pools its images of the batch; ``rows`` says where its windows sit
    in the batch one process would build, which is where its dropout masks come from."""
    from detector import distributed
    from detector.distributed import DistInfo

    trunk, head, items, load, proj = _setup(n_items=4)
    params = _params(batch_size=12, images_per_batch=3, conv_layers=2)
    one = list(TunedTailWindows(trunk, 2, items, [], load, LEVELS, proj, 2, params).batches(0, 2))
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "current", lambda r=rank: DistInfo(r, 2, r))
        part = list(TunedTailWindows(trunk, 2, items, [], load, LEVELS, proj, 2, params).batches(0, 2))
        for (x1, y1, n1, r1), (x, y, n, rows) in zip(one, part):
            assert n == n1 == x1.shape[0] and torch.equal(r1, torch.arange(n1))
            torch.testing.assert_close(x, x1[rows], rtol=0, atol=1e-5)
            assert torch.equal(y, y1[rows])


class _Windows:
    """A WindowSource of fixed features: K = 3 classes + background, 1 foreground window in 4."""

    def __init__(self, learnable: bool, d: int = 8, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.tensor([3, 3, 3, 0, 3, 3, 3, 1, 3, 3, 3, 2] * (n // 12 + 1))[:n]
        self.x = torch.randn(n, d, generator=g)
        if learnable:  # the label written into the features
            self.x[:, :4] += 4.0 * F.one_hot(self.y, 4).float()

    def trainable(self):
        return []

    def batches(self, start, iters):
        for _ in range(start, iters):
            yield self.x, self.y, self.x.shape[0], torch.arange(self.x.shape[0])

    def validation(self):
        return self.x, self.y

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("learnable", [True, False])
def test_a_head_that_never_beats_all_background_is_warned_about(learnable, caplog):
    """Validation error no better than the foreground share (every window called background) means
    the head collapsed to the class prior: a warning names finetune.lr. A head that learns is quiet."""
    from detector.finetune import warn_if_collapsed

    params = FinetuneConfig(iters=60, lr=0.05, lr_steps=(), val_every=20, val_batches=1)
    src = _Windows(learnable)
    with caplog.at_level("WARNING", logger="detector.finetune"):
        _, hist = finetune(FCHead(8, fc_dim=16, num_classes=3, dropout=0.0), src, params, progress=False)
    fg_share = float((src.y != 3).float().mean())
    warned = "fine-tuning did not learn" in caplog.text
    assert warned == (not learnable), (hist["best_val_error"], fg_share)
    if learnable:
        assert hist["best_val_error"] < fg_share
    else:
        assert hist["best_val_error"] >= fg_share and "finetune.lr (now 0.05" in caplog.text
    assert warn_if_collapsed(None, 0.25, 0.02) is False and warn_if_collapsed(0.1, 0.25, 0.02) is False
