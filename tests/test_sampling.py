"""Window labels by IoU (hand cases); the one fine-tuning sampler: its foreground share, its
determinism and how it mixes images."""
from __future__ import annotations

import torch

from detector.sampling import label_windows, sample_windows

IOU = {"fg_iou": 0.5, "bg_low": 0.1, "bg_high": 0.5}  # spec §6 (detector.config.FinetuneConfig)


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
    labels, max_iou, gt_index = label_windows(props, gt, gt_labels, num_classes=3, **IOU)
    assert labels.tolist() == [2, 2, 3, 3, -1, 0, -1]
    torch.testing.assert_close(max_iou, torch.tensor([1.0, 0.5, 0.4, 0.1, 1 / 11, 0.5, 0.0]))
    assert gt_index.tolist()[:6] == [0, 0, 0, 0, 0, 1]


def test_label_windows_argmax_picks_best_gt_class():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    props = torch.tensor([[1.5, 0.0, 11.5, 10.0]])  # closer to gt1
    labels, _, idx = label_windows(props, gt, torch.tensor([0, 1]), num_classes=2, **IOU)
    assert labels.tolist() == [1] and idx.tolist() == [1]


def test_label_windows_without_gt():
    labels, max_iou, idx = label_windows(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.zeros(0, 4),
                                         torch.zeros(0, dtype=torch.int64), num_classes=3, **IOU)
    assert labels.tolist() == [-1] and max_iou.tolist() == [0.0] and idx.tolist() == [-1]


def _labels(n_images: int, seed: int, n: int = 60, k: int = 4) -> list[torch.Tensor]:
    """Per-image window labels: 3..9 foreground windows of one class, 5 unused, the rest background."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        lab = torch.full((n,), k)
        lab[:int(torch.randint(3, 10, (1,), generator=g))] = int(torch.randint(0, k, (1,), generator=g))
        lab[-5:] = -1
        out.append(lab[torch.randperm(n, generator=g)])
    return out


def test_sample_windows_exact_foreground_share_without_repeats():
    labels = _labels(40, seed=0)
    g = torch.Generator().manual_seed(1)
    sel, nfg, nbg = sample_windows(labels, range(40), 4, n_fg=32 * 6, n_total=128 * 6, generator=g)
    assert (nfg, nbg) == (192, 576) and len(sel) == 768 and len(set(sel)) == 768
    lab = torch.stack([labels[i][j] for i, j in sel])
    assert bool((lab[:nfg] < 4).all()) and bool((lab[nfg:] == 4).all())  # foreground first, never -1


def test_sample_windows_short_pools_give_short_draws():
    labels = [torch.tensor([0, 0, 3, 3, 3, -1]), torch.tensor([1, 3, 3])]
    sel, nfg, nbg = sample_windows(labels, [0, 1], 3, n_fg=8, n_total=10, generator=torch.Generator().manual_seed(0))
    assert (nfg, nbg) == (3, 5) and len(set(sel)) == 8  # every window once; background fills, then it ends
    sel, nfg, nbg = sample_windows(labels, [1], 3, n_fg=1, n_total=2, generator=torch.Generator().manual_seed(0))
    assert (nfg, nbg) == (1, 1) and sel[0] == (1, 0) and sel[1][0] == 1


def test_sample_windows_is_a_function_of_the_generator_state():
    labels = _labels(10, seed=3)
    draw = lambda s: sample_windows(labels, [2, 5, 7], 4, 8, 32, torch.Generator().manual_seed(s))[0]  # noqa: E731
    assert draw(11) == draw(11) and draw(11) != draw(12)


def test_sample_windows_mixes_the_images_of_a_chunk_uniformly():
    """Drawn from the pooled windows of many images: a batch's windows come from many images, and
    every foreground window is equally likely (uniform without replacement over the pool)."""
    labels = _labels(40, seed=0)
    sel, nfg, _ = sample_windows(labels, range(40), 4, n_fg=32, n_total=128, generator=torch.Generator().manual_seed(2))
    assert len({i for i, _ in sel}) >= 30
    pool = [(i, j) for i in range(40) for j in torch.nonzero(labels[i] < 4).flatten().tolist()
            if int(labels[i][j]) >= 0]
    counts = dict.fromkeys(pool, 0)
    g = torch.Generator().manual_seed(4)
    for _ in range(400):
        for pair in sample_windows(labels, range(40), 4, n_fg=32, n_total=32, generator=g)[0]:
            counts[pair] += 1
    freq = torch.tensor(list(counts.values()), dtype=torch.float32) / 400
    assert torch.allclose(freq, torch.full_like(freq, 32 / len(pool)), atol=0.08)
