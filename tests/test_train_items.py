"""Training items read their proposals on demand: the same windows as holding them, mirrored by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detector.boxes import hflip_boxes
from detector.config import FinetuneConfig
from detector.data.voc import ImageRecord
from detector.finetune import window_labels
from detector.sampling import label_windows
from detector.train_items import TrainItem, candidates, make_items
from proposals.store import NpzProposals, save_proposals


def _records() -> list[ImageRecord]:
    gt = torch.tensor([[10.0, 20.0, 50.0, 60.0], [70.0, 5.0, 90.0, 40.0]])
    return [ImageRecord(f"im{i}", Path(f"im{i}.jpg"), 100, 120 + i, gt + i, torch.tensor([0, 1]),
                        torch.zeros(2, dtype=torch.bool)) for i in range(3)]


PROPS = {  # width 120, 121, 122
    "im0": np.array([[0.0, 0.0, 30.0, 40.0], [100.0, 10.0, 120.0, 90.0]], np.float32),
    "im1": np.array([[12.0, 22.0, 51.0, 61.0]], np.float32),
    "im2": np.zeros((0, 4), np.float32),
}


def test_items_read_and_mirror_their_proposals(tmp_path):
    recs = _records()
    lazy = NpzProposals(save_proposals(tmp_path / "p.npz", PROPS))
    for source in (PROPS, lazy):
        items = make_items(recs, source, flips=True)
        assert [(it.record.image_id, it.flipped) for it in items] == [(f"im{i}", f) for i in range(3) for f in (False, True)]
        assert all(it.source is source for it in items)  # the items hold the mapping, not boxes
        torch.testing.assert_close(items[0].proposals, torch.from_numpy(PROPS["im0"]), rtol=0, atol=0)
        # mirrored by hand, x' = W - x with x1 and x2 swapped (W = 120): [0, 0, 30, 40] -> [90, 0, 120, 40]
        torch.testing.assert_close(items[1].proposals, torch.tensor([[90.0, 0.0, 120.0, 40.0], [0.0, 10.0, 20.0, 90.0]]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(items[3].proposals, hflip_boxes(torch.from_numpy(PROPS["im1"]), 121), rtol=0, atol=0)
        assert items[4].proposals.shape == (0, 4) and items[5].proposals.shape == (0, 4)
        c = candidates(items[3])  # GT first (mirrored), then proposals
        torch.testing.assert_close(c[:2], hflip_boxes(recs[1].boxes, 121), rtol=0, atol=0)
        assert c.shape == (3, 4)


def test_a_tensor_source_is_the_items_own_frame():
    rec = _records()[0]
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    item = TrainItem(rec, True, rec.boxes, rec.labels, rec.difficult, boxes)
    assert item.proposals is boxes  # given in the item's frame: not mirrored again


def test_window_labels_are_int16_copies_of_label_windows(tmp_path):
    recs = _records()
    items = make_items(recs, NpzProposals(save_proposals(tmp_path / "p.npz", PROPS)), flips=True)
    params = FinetuneConfig()
    got = window_labels(items, 2, params)
    for it, lab in zip(items, got):
        ref = label_windows(candidates(it), it.gt_boxes, it.gt_labels, 2, fg_iou=params.fg_iou,
                            bg_low=params.bg_iou_low, bg_high=params.bg_iou_high)[0]
        assert lab.dtype == torch.int16
        assert lab.tolist() == ref.tolist()
    assert got[0].tolist()[:2] == [0, 1]  # the GT boxes are foreground of their own class
