"""Conv5 cache: reuse, invalidation by key (weights), interrupted builds resume without corrupt files."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detector.backbones import build_backbone
from detector.cache import Conv5Cache, conv5_cache_key, weights_hash
from detector.pyramid import image_pyramid, pyramid_sizes

SCALES = (64, 96)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(p)
        paths[f"im{i}"] = p
    return paths


def fake_compute(calls: list):
    def fn(image_id: str, flipped: bool):
        calls.append((image_id, flipped))
        seed = int(image_id[-1]) * 2 + int(flipped)
        fmaps = [torch.rand(4, 3 + s, 5, generator=torch.Generator().manual_seed(seed)) for s in range(2)]
        return fmaps, [(48, 64), (72, 96)]
    return fn


def test_weights_hash_tracks_values():
    a = build_backbone("zf5", 0.25)
    h = weights_hash(a)
    assert h == weights_hash(a) and len(h) == 16
    with torch.no_grad():
        a.conv3.weight[0, 0, 0, 0] += 1e-6
    assert weights_hash(a) != h


def test_build_reuses_valid_entries(tmp_path):
    calls: list = []
    cache = Conv5Cache(tmp_path / "c", {"weights": "w1", "scales": [1, 2]})
    items = [("im0", False), ("im0", True), ("im1", False)]
    stats = cache.build(items, fake_compute(calls), progress=False)
    assert stats["built"] == 3 and stats["reused"] == 0 and len(calls) == 3
    again = Conv5Cache(tmp_path / "c", {"scales": [1, 2], "weights": "w1"})  # same key, other order
    stats = again.build(items, fake_compute(calls), progress=False)
    assert stats == {"built": 0, "reused": 3, "disk_bytes": again.disk_bytes()} and len(calls) == 3
    fmaps, sizes = again.get("im0", True)
    assert sizes == [(48, 64), (72, 96)]
    want, _ = fake_compute([])("im0", True)
    assert all(f.dtype == torch.float16 for f in fmaps)
    assert all(torch.equal(f, w.half()) for f, w in zip(fmaps, want))
    assert again.get("im2") is None
    assert stats["disk_bytes"] == sum(p.stat().st_size for p in (tmp_path / "c").glob("*.pt")) > 0


def test_changed_weights_rebuild_and_replace(tmp_path, images, caplog):
    net = build_backbone("zf5", 0.25).eval()
    items = [(k, False, p) for k, p in images.items()]
    cache = Conv5Cache(tmp_path / "c", backbone=net, scales=SCALES)
    assert cache.key == conv5_cache_key(net, SCALES)
    assert cache.build(items, progress=False)["built"] == 3
    fmaps, sizes = cache.get("im1")
    im = np.array(Image.open(images["im1"]).convert("RGB"))
    assert sizes == pyramid_sizes(im.shape[0], im.shape[1], SCALES)
    for f, ref in zip(fmaps, image_pyramid(net, im, SCALES)):
        torch.testing.assert_close(f, ref[0].half())
    old_files = sorted(p.name for p in (tmp_path / "c").glob("*.pt"))

    with torch.no_grad():
        net.conv5.bias += 0.5  # new weights: every entry is stale
    cache2 = Conv5Cache(tmp_path / "c", backbone=net, scales=SCALES)
    assert "another key (changed: weights)" in caplog.text
    assert cache2.key_hash != cache.key_hash and cache2.get("im1") is None
    assert cache2.build(items, progress=False)["built"] == 3
    new_files = sorted(p.name for p in (tmp_path / "c").glob("*.pt"))
    assert len(new_files) == 3 and not set(new_files) & set(old_files)  # stale files replaced
    fmaps2, _ = cache2.get("im1")
    assert not torch.equal(fmaps2[0], fmaps[0])
    # other scales are another key too
    assert Conv5Cache(tmp_path / "c", backbone=net, scales=(64,)).key_hash != cache2.key_hash


def test_flipped_entry_is_the_mirrored_image(tmp_path, images):
    net = build_backbone("zf5", 0.25).eval()
    cache = Conv5Cache(tmp_path / "c", backbone=net, scales=(64,))
    cache.build([("im0", True, images["im0"])], progress=False)
    im = np.array(Image.open(images["im0"]).convert("RGB"))[:, ::-1]
    torch.testing.assert_close(cache.get("im0", True)[0][0], image_pyramid(net, im, (64,))[0][0].half())


def test_interrupted_build_resumes_without_corrupt_files(tmp_path):
    root = tmp_path / "c"
    key = {"weights": "w1", "scales": [1, 2]}
    calls: list = []
    compute = fake_compute(calls)

    def dies_on_third(image_id, flipped):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a build
        return compute(image_id, flipped)

    items = [("im0", False), ("im1", False), ("im2", False), ("im3", False)]
    with pytest.raises(KeyboardInterrupt):
        Conv5Cache(root, key).build(items, dies_on_third, progress=False)
    assert len(list(root.glob("*.pt"))) == 2 and not list(root.glob("*.tmp"))

    # what a kill during torch.save leaves: a temp file of a dead process; and a truncated entry
    cache = Conv5Cache(root, key)
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
    leftover = root / f".{cache.path('im2').name}.{dead_pid}.tmp"  # a name without host: this machine's
    leftover.write_bytes(b"PK\x03\x04 partial")
    good = cache.path("im1").read_bytes()
    cache.path("im1").write_bytes(good[: len(good) // 2])

    cache = Conv5Cache(root, key)  # opening removes the dead process's temp file
    assert not leftover.exists()
    assert not cache.has("im1")  # the truncated entry is not trusted
    calls.clear()
    stats = cache.build(items, compute, progress=False)
    assert stats["built"] == 3 and stats["reused"] == 1
    assert sorted(calls) == [("im1", False), ("im2", False), ("im3", False)]
    for image_id, _ in items:
        fmaps, _ = cache.get(image_id)
        want, _ = compute(image_id, False)
        assert all(torch.equal(f, w.half()) for f, w in zip(fmaps, want))
    assert not list(root.glob("*.tmp"))


def test_temp_file_of_a_live_writer_is_kept(tmp_path):
    cache = Conv5Cache(tmp_path, {"a": 1})
    live = tmp_path / f".{cache.path('x').name}.{os.getppid()}.tmp"
    live.write_bytes(b"being written")
    Conv5Cache(tmp_path, {"a": 1})
    assert live.exists()


def test_put_checks_shapes_and_counts(tmp_path):
    cache = Conv5Cache(tmp_path, {"scales": [1, 2]})
    with pytest.raises(ValueError, match="2 scales"):
        cache.put("a", False, [torch.zeros(2, 3, 3)], [(1, 1)])
    with pytest.raises(ValueError, match=r"\[C, Hs, Ws\]"):
        cache.put("a", False, [torch.zeros(3, 3), torch.zeros(3, 3)], [(1, 1), (2, 2)])
    with pytest.raises(ValueError, match="no image path"):
        cache.build([("a", False)], progress=False)


def test_entry_damaged_in_place_is_rebuilt_not_read(tmp_path, caplog):
    """Bytes overwritten without a change of size (a bad disk, a stray write): the entry fails its
    content check before it is read, is reported by name and rebuilt; it never yields NaN maps."""
    root = tmp_path / "c"
    calls: list = []
    compute = fake_compute(calls)
    cache = Conv5Cache(root, {"weights": "w", "scales": [1, 2]})
    cache.build([("im0", False), ("im1", False)], compute, progress=False)
    data = bytearray(cache.path("im1").read_bytes())
    n = len(data)
    data[n // 2: n // 2 + 64] = b"\xff" * 64
    cache.path("im1").write_bytes(bytes(data))
    fresh = Conv5Cache(root, {"weights": "w", "scales": [1, 2]})  # a new process: nothing checked yet
    with caplog.at_level("WARNING"):
        assert fresh.get("im1") is None
    assert "im1" in caplog.text and "CRC" in caplog.text
    calls.clear()
    assert fresh.build([("im0", False), ("im1", False)], compute, progress=False)["built"] == 1
    assert calls == [("im1", False)]
    fmaps, _ = fresh.get("im1")
    assert all(torch.isfinite(f.float()).all() for f in fmaps)
    before = fresh.content_id([("im0", False), ("im1", False)])
    assert before == Conv5Cache(root, {"weights": "w", "scales": [1, 2]}).content_id([("im0", False), ("im1", False)])
