"""Window labels by IoU (hand cases) and foreground fractions of sampled mini-batches."""
from __future__ import annotations

import itertools

import pytest
import torch

from detector.sampling import MultiImageBatchSampler, label_windows, sample_fg_bg


def test_label_windows_hand_cases():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 120.0, 110.0]])
    gt_labels = torch.tensor([2, 0])
    props = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],      # IoU 1 with gt0 -> class 2
        [0.0, 0.0, 10.0, 20.0],      # IoU 0.5 with gt0 -> fg (>= 0.5), class 2
        [0.0, 0.0, 10.0, 25.0],      # IoU 0.4 -> background (3)
        [0.0, 0.0, 10.0, 100.0],     # IoU 0.1 -> background (boundary included)
        [0.0, 0.0, 10.0, 110.0],     # IoU 1/11 < 0.1 -> unused
        [100.0, 100.0, 110.0, 110.0],  # IoU 0.5 with gt1 -> class 0
        [500.0, 500.0, 510.0, 510.0],  # IoU 0 -> unused
    ])
    labels, max_iou, gt_index = label_windows(props, gt, gt_labels, num_classes=3)
    assert labels.tolist() == [2, 2, 3, 3, -1, 0, -1]
    torch.testing.assert_close(max_iou, torch.tensor([1.0, 0.5, 0.4, 0.1, 1 / 11, 0.5, 0.0]))
    assert gt_index.tolist()[:6] == [0, 0, 0, 0, 0, 1]


def test_label_windows_argmax_picks_best_gt_class():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    props = torch.tensor([[1.5, 0.0, 11.5, 10.0]])  # closer to gt1
    labels, _, idx = label_windows(props, gt, torch.tensor([0, 1]), num_classes=2)
    assert labels.tolist() == [1] and idx.tolist() == [1]


def test_label_windows_without_gt():
    labels, max_iou, idx = label_windows(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.zeros(0, 4),
                                         torch.zeros(0, dtype=torch.int64), num_classes=3)
    assert labels.tolist() == [-1] and max_iou.tolist() == [0.0] and idx.tolist() == [-1]


def test_sample_fg_bg_exact_quarter_when_enough_fg():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.randint(0, 5, (100,), generator=g), torch.full((400,), 5), torch.full((50,), -1)])
    for _ in range(20):
        idx = sample_fg_bg(labels, num_classes=5, batch_size=128, fg_fraction=0.25, generator=g)
        assert idx.numel() == 128 and idx.unique().numel() == 128
        lab = labels[idx]
        assert int((lab < 5).sum()) == 32 and int((lab == 5).sum()) == 96 and int((lab == -1).sum()) == 0


def test_sample_fg_bg_few_fg_fills_with_bg_and_short_batches():
    labels = torch.cat([torch.zeros(10, dtype=torch.int64), torch.full((200,), 3)])
    idx = sample_fg_bg(labels, num_classes=3, batch_size=128, generator=torch.Generator().manual_seed(0))
    assert idx.numel() == 128 and int((labels[idx] == 0).sum()) == 10
    idx = sample_fg_bg(labels[:40], num_classes=3, batch_size=128)
    assert idx.numel() == 40  # all windows, no repeats


def test_sample_fg_bg_uniform():
    labels = torch.cat([torch.zeros(8, dtype=torch.int64), torch.full((8,), 1)])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    for _ in range(2000):
        counts[sample_fg_bg(labels, 1, batch_size=8, fg_fraction=0.25, generator=g)] += 1
    # each fg window is picked with probability 2/8, each bg with 6/8
    assert torch.allclose(counts[:8] / 2000, torch.full((8,), 0.25), atol=0.04)
    assert torch.allclose(counts[8:] / 2000, torch.full((8,), 0.75), atol=0.04)


def test_multi_image_batches_mix_images_with_exact_fraction():
    g = torch.Generator().manual_seed(0)
    labels = []
    for _ in range(40):
        lab = torch.full((60,), 4)
        lab[:torch.randint(3, 10, (1,), generator=g).item()] = torch.randint(0, 4, (1,), generator=g).item()
        lab[-5:] = -1
        labels.append(lab[torch.randperm(60, generator=g)])
    sampler = MultiImageBatchSampler(labels, num_classes=4, batch_size=128, chunk_batches=6, pool_factor=2.0,
                                     generator=torch.Generator().manual_seed(1))
    seen = set()
    for b, batch in enumerate(itertools.islice(sampler, 15)):  # crosses two chunk boundaries
        assert batch.labels.shape == (128,)
        assert int((batch.labels < 4).sum()) == 32 and int((batch.labels == 4).sum()) == 96
        ref = torch.stack([labels[i][w] for i, w in zip(batch.image_index.tolist(), batch.window_index.tolist())])
        assert torch.equal(ref, batch.labels)
        assert batch.image_index.unique().numel() >= 10  # many images per batch
        if b < 6:  # inside the first chunk the pool is large enough: no window is drawn twice
            seen |= set(zip(batch.image_index.tolist(), batch.window_index.tolist()))
    assert len(seen) == 6 * 128


def test_multi_image_reproducible_and_no_fg_case():
    labels = [torch.tensor([0, 1, 2, 2, 2, 2]), torch.tensor([2, 2, 2, 1])]
    a = MultiImageBatchSampler(labels, 2, batch_size=8, chunk_batches=3, generator=torch.Generator().manual_seed(5))
    b = MultiImageBatchSampler(labels, 2, batch_size=8, chunk_batches=3, generator=torch.Generator().manual_seed(5))
    for _ in range(4):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.image_index, y.image_index) and torch.equal(x.window_index, y.window_index)
        assert int((x.labels < 2).sum()) == 2
    only_bg = MultiImageBatchSampler([torch.tensor([3, 3, -1])], 3, batch_size=4, chunk_batches=2)
    assert only_bg.next_batch().labels.tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError):
        MultiImageBatchSampler([torch.tensor([-1, -1])], 3)
