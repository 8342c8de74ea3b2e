"""CropStore: crops in a temporary file index exactly like the in-memory tensor they replace."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.data.crop_store import CropStore
from detector.data.crops import crops_from_records
from detector.data.records import ImageRecord


def test_store_indexes_like_the_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 256, (11, 6, 6, 3), generator=g, dtype=torch.uint8)
    store = CropStore(6, tmp_path)
    store.append(ref[:4])
    store.append(ref[4:])
    assert len(store) == 11 and store.shape == (11, 6, 6, 3)
    assert list(tmp_path.iterdir()) == []  # an unnamed temporary file: nothing left behind
    for index in (3, -1, slice(None), slice(2, 9), slice(None, None, 3), torch.tensor([7, 2, 3, 4, 2]),
                  np.array([10, 0]), [5, 6, 7], torch.tensor([], dtype=torch.int64)):
        assert torch.equal(store[index], ref[index]), index
    with pytest.raises(ValueError, match="uint8"):
        store.append(ref.float())
    with pytest.raises(IndexError):
        store[11]


def test_crops_on_disk_equal_crops_in_memory(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    recs = [ImageRecord(f"im{i}", Path(f"im{i}.jpg"), 120, 160, torch.tensor([[30.0, 20.0, 60.0, 50.0]]),
                        torch.tensor([0]), torch.tensor([False])) for i in range(3)]
    kw = dict(size=32, objects_per_image=4, bg_per_image=2, seed=3, windows=True)
    mem = crops_from_records(recs, ("a",), lambda p: img, **kw)
    disk = crops_from_records(recs, ("a",), lambda p: img, store=tmp_path, **kw)
    assert isinstance(disk.images, CropStore) and disk.size == mem.size == 32
    assert torch.equal(disk.images[:], mem.images)
    assert torch.equal(disk.labels, mem.labels) and torch.equal(disk.windows, mem.windows)
