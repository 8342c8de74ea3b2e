"""proposals: image normalisation, selective search (determinism, filters, odd inputs), grid, recall,
and the resumable whole-split computation. Images are tiny so the file stays fast."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

import proposals.compute as compute_mod
from proposals import (ImageError, compute_proposals_for_images, edge_boxes, grid_boxes,
                       load_proposals, proposal_recall, read_image, save_proposals,
                       selective_search, to_rgb_uint8)
from proposals.selective_search import _finish, _hash_order, _opencv_ss, _xywh_to_xyxy


def _scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A few coloured rectangles and discs on a noisy background, uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 110, size=(h, w, 3), dtype=np.uint8)
    cv2.rectangle(img, (5, 8), (50, 60), (200, 30, 30), -1)
    cv2.circle(img, (w - 35, h // 2), 22, (30, 180, 40), -1)
    cv2.rectangle(img, (60, h - 30), (w - 10, h - 5), (20, 20, 220), -1)
    return img


# ------------------------------------------------------------------------------------- imageio
def test_to_rgb_uint8_variants():
    rgb = _scene(40, 50)
    gray = rgb[:, :, 0]
    assert np.array_equal(to_rgb_uint8(gray), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(to_rgb_uint8(gray[:, :, None]), to_rgb_uint8(gray))
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(to_rgb_uint8(rgba), rgb)  # alpha dropped
    u16 = rgb.astype(np.uint16) * 257  # 0..255 -> 0..65535
    assert np.array_equal(to_rgb_uint8(u16), rgb)
    f = rgb.astype(np.float64) / 255.0
    assert np.array_equal(to_rgb_uint8(f), rgb)
    with pytest.raises(ImageError, match=r"my\.png: float image must be finite and in \[0, 1\]"):
        to_rgb_uint8(rgb.astype(np.float32), name="my.png")
    with pytest.raises(ImageError, match="got shape"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="unsupported dtype"):
        to_rgb_uint8(np.zeros((4, 4), np.int64))


def test_read_image_files(tmp_path):
    rgb = _scene(40, 50)
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), rgb[:, :, ::-1])
    assert np.array_equal(read_image(p), rgb)  # BGR -> RGB
    p16 = tmp_path / "b16.png"
    cv2.imwrite(str(p16), (rgb[:, :, ::-1].astype(np.uint16) * 257))
    assert np.array_equal(read_image(p16), rgb)
    pa = tmp_path / "rgba.png"
    cv2.imwrite(str(pa), np.concatenate([rgb[:, :, ::-1], np.zeros((40, 50, 1), np.uint8)], axis=2))
    assert np.array_equal(read_image(pa), rgb)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: file is empty"):
        read_image(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match=r"junk\.jpg: cannot decode"):
        read_image(junk)
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), rgb[:20, :40])
    with pytest.raises(ImageError, match=r"tiny\.png: image is 40x20 px, smaller than 32"):
        read_image(tiny)
    huge = tmp_path / "huge.png"
    cv2.imwrite(str(huge), np.zeros((33, 10001), np.uint8))
    with pytest.raises(ImageError, match=r"huge\.png: image is 10001x33 px, larger than 10000"):
        read_image(huge)
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------- selective search
def test_finish_min_size_and_dedup():
    boxes = np.array([[0, 0, 30, 30],  # kept
                      [5, 5, 24, 40],  # width 19 < 20: dropped
                      [0, 0, 30, 30],  # duplicate of the first: dropped
                      [1, 2, 21, 22],  # 20 x 20: kept (side >= min_size)
                      [0, 0, 30, 30.5]], np.float32)  # not an exact duplicate: kept
    got = _finish(boxes, min_size=20, max_boxes=None)
    np.testing.assert_array_equal(got, boxes[[0, 3, 4]])
    np.testing.assert_array_equal(_finish(boxes, 20, 2), boxes[[0, 3]])


def test_xywh_matches_detector_boxes():
    from detector.boxes import xywh_to_xyxy

    rects = np.array([[3, 4, 10, 20], [0, 0, 1, 1]], np.int32)  # OpenCV x, y, w, h
    np.testing.assert_array_equal(_xywh_to_xyxy(rects), [[3, 4, 13, 24], [0, 0, 1, 1]])
    np.testing.assert_array_equal(_xywh_to_xyxy(rects), xywh_to_xyxy(rects.astype(np.float32)).numpy())


def test_hash_order_is_a_fixed_permutation():
    boxes = np.unique(grid_boxes(64, 96, min_side=16, aspect_ratios=(1.0,)), axis=0)  # sorted
    o1, o2 = _hash_order(boxes), _hash_order(boxes.copy())
    assert np.array_equal(o1, o2) and np.array_equal(np.sort(o1), np.arange(len(boxes)))
    assert not np.array_equal(o1, np.arange(len(boxes)))  # actually shuffles


def test_grid_boxes_hand_computed():
    # 64x64 image, sides 32 and 64 (step 2), stride 16: 3x3 windows of 32 px + 1 window of 64 px
    g = grid_boxes(64, 64, min_side=32, step=2.0, stride=0.5, aspect_ratios=(1.0,))
    assert g.shape == (10, 4) and g.dtype == np.float32
    expect = {(x, y, x + 32, y + 32) for x in (0, 16, 32) for y in (0, 16, 32)} | {(0, 0, 64, 64)}
    assert {tuple(map(float, b)) for b in g} == expect
    # a 2:1 window of side 32 is 45.25 x 22.6 and fits; nothing leaves the image
    g2 = grid_boxes(50, 100, min_side=32, aspect_ratios=(1.0, 2.0, 0.5))
    assert (g2[:, 0] >= 0).all() and (g2[:, 2] <= 100 + 1e-3).all() and (g2[:, 3] <= 50 + 1e-3).all()


@pytest.mark.parametrize("mode", ["fast+", "fast"])
def test_selective_search_deterministic_and_filtered(mode):
    img = _scene()
    a = selective_search(img, mode=mode, min_size=10)
    b = selective_search(img.copy(), mode=mode, min_size=10)
    assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == 4 and len(a) > 0
    assert np.array_equal(a, b)  # same boxes, same order
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    assert (w >= 10).all() and (h >= 10).all()
    assert len(np.unique(a, axis=0)) == len(a)
    assert (a[:, :2] >= 0).all() and (a[:, 2] <= 128).all() and (a[:, 3] <= 96).all()
    assert np.array_equal(selective_search(img, mode=mode, min_size=10, max_boxes=5), a[:5])


def test_selective_search_fast_plus_has_the_fast_boxes_and_the_grid():
    img = _scene()
    plus = selective_search(img, mode="fast+", min_size=20)
    grid = grid_boxes(96, 128, min_side=32)
    fast = selective_search(img, mode="fast", min_size=20)  # 128 px < ss_side: same image
    as_set = {tuple(b) for b in plus}
    assert {tuple(b) for b in fast} <= as_set and {tuple(b) for b in grid} <= as_set
    assert len(plus) == len(as_set)


def _one_opencv_call(rgb: np.ndarray, mode: str) -> set[tuple[int, ...]]:
    """Reference: the rectangles of one whole OpenCV selective search, as the library made them
    before its search was split into parts."""
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(rgb[:, :, ::-1]))
    ss.switchToSelectiveSearchQuality() if mode == "quality" else ss.switchToSelectiveSearchFast()
    return {tuple(r) for r in ss.process().tolist()}


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_parts_of_the_search_are_the_whole_call(mode):
    """The union of the (colour image, k) parts is exactly one process() call's set, on 1 or 3 threads."""
    img = _scene(seed=3)
    ref = _one_opencv_call(img, mode)
    for threads in (1, 3):
        boxes = _opencv_ss(img, mode, threads)  # xyxy float32
        got = {(int(x0), int(y0), int(x1 - x0), int(y1 - y0)) for x0, y0, x1, y1 in boxes.tolist()}
        assert len(got) == len(boxes) and got == ref


def test_selective_search_threads_give_the_same_boxes():
    img = cv2.resize(_scene(seed=5), (200, 150), interpolation=cv2.INTER_NEAREST)
    one = selective_search(img, mode="fast+", min_size=10)
    assert np.array_equal(selective_search(img, mode="fast+", min_size=10, threads=2), one)
    from proposals import propose

    assert np.array_equal(propose(img, mode="fast+", min_size=10, threads=4), one)
    assert np.array_equal(selective_search(img, mode="fast+", min_size=10, threads=np.int64(2)), one)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            selective_search(img, threads=bad)


def test_selective_search_gray_rgba_uint16():
    img = _scene()
    ref = selective_search(img, mode="fast")
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(selective_search(rgba, mode="fast"), ref)
    assert np.array_equal(selective_search(img.astype(np.uint16) * 257, mode="fast"), ref)
    gray = selective_search(img[:, :, 1], mode="fast")
    assert gray.shape[1] == 4 and len(gray) > 0


@pytest.mark.parametrize("shape", [(12, 14), (24, 200), (160, 20)])
def test_selective_search_tiny_and_extreme_aspect(shape, caplog):
    h, w = shape
    img = np.random.default_rng(1).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (250, 0, 0)
    with caplog.at_level(logging.WARNING):
        boxes = selective_search(img, mode="fast", min_size=4)
    assert "padded" in caplog.text
    assert len(boxes) > 0
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes[:, :2] >= 0).all()


def test_selective_search_downscales_large_images():
    big = cv2.resize(_scene(), (512, 384), interpolation=cv2.INTER_NEAREST)
    boxes = selective_search(big, mode="fast", max_side=128, min_size=20)
    assert boxes.max() > 300  # mapped back to the 512x384 image
    assert (boxes[:, 2] <= 512).all() and (boxes[:, 3] <= 384).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mode 'slow'"):
        selective_search(_scene(), mode="slow")
    with pytest.raises(FileNotFoundError, match="model.yml.gz"):
        edge_boxes(_scene(), "/nonexistent/model.yml.gz")


# ------------------------------------------------------------------------------------ recall
def test_proposal_recall_hand_made():
    gt = [np.array([[0, 0, 10, 10]], np.float32), np.array([[20, 20, 40, 40]], np.float32)]
    props = [np.array([[0, 0, 10, 5],  # IoU 0.5 with image 0's box
                       [0, 0, 10, 8]], np.float32),  # IoU 0.8
             np.zeros((0, 4), np.float32)]  # image 1 has no proposals: its box is missed
    res = proposal_recall(props, gt, top_ks=(1, 2))
    r1, r2, rall = res["rows"]
    assert res["num_gt"] == 2 and res["mean_boxes"] == 1.0 and rall["k"] == "all"
    assert r1["recall@0.5"] == 0.5 and r1["recall@0.7"] == 0.0
    assert r2["recall@0.5"] == 0.5 and r2["recall@0.7"] == 0.5
    # AR: IoU 0.5 clears 1 of 10 thresholds (0.50), IoU 0.8 clears 7 (0.50..0.80); over 2 boxes
    assert r1["AR"] == pytest.approx(0.1 / 2) and r2["AR"] == pytest.approx(0.7 / 2)
    assert rall == {**r2, "k": "all"}


# ------------------------------------------------------------------------- whole-split compute
def _write_images(tmp_path, n=3):
    items = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), _scene(64, 80, seed=i)[:, :, ::-1])
        items.append((f"id{i}", p))
    return items


def test_compute_resumes_after_interruption(tmp_path, monkeypatch):
    items = _write_images(tmp_path)
    opts = {"method": "selective_search", "mode": "fast", "min_size": 10, "max_boxes": 50}
    kw = dict(workers=1, progress=False, chunk_size=1)
    ref = compute_proposals_for_images(items, tmp_path / "ref.npz", opts, **kw)
    assert list(ref) == ["id0", "id1", "id2"]
    assert not (tmp_path / "ref.npz.parts").exists()

    # interrupted run: the third image "crashes" the process
    real = compute_mod.propose
    calls = []

    def dying(img, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(img, **k)

    monkeypatch.setattr(compute_mod, "propose", dying)
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        compute_proposals_for_images(items, out, opts, **kw)
    parts = tmp_path / "run.npz.parts"
    assert not out.exists() and sorted(p.name for p in parts.glob("chunk_*")) == [
        "chunk_000000.npz", "chunk_000001.npz"]
    # mark chunk 0 so that reuse is visible, leave a temp file of a dead writer, a garbage shard 1,
    # and (below) a shard damaged in place
    save_proposals(parts / "chunk_000000.npz", {"id0": np.array([[1, 2, 30, 40]], np.float32)})
    (parts / ".chunk_000002.npz.999999999.tmp").write_bytes(b"half a file")
    (parts / "chunk_000001.npz").write_bytes(b"garbage")
    monkeypatch.setattr(compute_mod, "propose", real)
    got = compute_proposals_for_images(items, out, opts, **kw)
    np.testing.assert_array_equal(got["id0"], [[1, 2, 30, 40]])  # reused, not recomputed
    np.testing.assert_array_equal(got["id1"], ref["id1"])  # corrupt shard recomputed
    np.testing.assert_array_equal(got["id2"], ref["id2"])
    assert not parts.exists()
    loaded = load_proposals(out, ["id0", "id1", "id2"])
    np.testing.assert_array_equal(loaded["id2"], ref["id2"])
    # same options again: the file is the cache; other options: recomputed
    assert np.array_equal(compute_proposals_for_images(items, out, opts, **kw)["id0"], got["id0"])
    again = compute_proposals_for_images(items, out, {**opts, "max_boxes": 49}, **kw)
    np.testing.assert_array_equal(again["id0"], ref["id0"][:49])
    # the final file damaged in place (same size): its content check fails and it is recomputed
    data = bytearray(out.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
    out.write_bytes(bytes(data))
    np.testing.assert_array_equal(compute_proposals_for_images(items, out, {**opts, "max_boxes": 49}, **kw)["id2"],
                                  ref["id2"][:49])
    # fast+ options travel to selective_search
    plus_opts = {"method": "selective_search", "mode": "fast+", "min_size": 10, "grid_min": 40.0,
                 "grid_aspect_ratios": (1.0, 2.0)}
    plus = compute_proposals_for_images(items[:1], tmp_path / "plus.npz", plus_opts, **kw)
    direct = selective_search(cv2.imread(str(items[0][1]))[:, :, ::-1], mode="fast+", min_size=10,
                              grid_min=40.0, grid_aspect_ratios=(1.0, 2.0))
    np.testing.assert_array_equal(plus["id0"], direct)


def test_compute_here_splits_selective_search_over_the_cores(tmp_path, monkeypatch):
    """workers <= 1: selective search runs here on the process's cores (one thread per rank with
    ``shard``), with the boxes of one thread."""
    import os

    items = _write_images(tmp_path, n=2)
    opts = {"method": "selective_search", "mode": "fast", "min_size": 10}
    ref = compute_proposals_for_images(items, tmp_path / "ref.npz", opts, workers=1, progress=False)
    real, seen = compute_mod.propose, []

    def recording(img, threads=1, **k):
        seen.append(threads)
        return real(img, threads=threads, **k)

    monkeypatch.setattr(compute_mod, "propose", recording)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    got = compute_proposals_for_images(items, tmp_path / "a.npz", opts, workers=1, progress=False)
    assert seen == [3, 3] and all(np.array_equal(got[i], ref[i]) for i in ("id0", "id1"))
    seen.clear()
    compute_mod.prepare_parts(items, tmp_path / "b.npz", opts)
    compute_proposals_for_images(items, tmp_path / "b.npz", opts, workers=1, progress=False, shard=(0, 2))
    assert seen == [1, 1]  # rank 0 of 2 holds the one shard of 8 images: both of them, one thread each


def test_compute_bad_image_and_two_workers(tmp_path, caplog):
    items = _write_images(tmp_path, n=2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    items.append(("broken", bad))
    with pytest.raises(ImageError, match=r"'broken'.*bad\.jpg: file is empty"):
        compute_proposals_for_images(items, tmp_path / "a.npz", {"method": "selective_search", "mode": "fast"},
                                     workers=1, progress=False)
    fast10 = {"method": "selective_search", "mode": "fast", "min_size": 10}
    with caplog.at_level(logging.WARNING):
        got = compute_proposals_for_images(items, tmp_path / "b.npz", fast10, workers=2, progress=False,
                                           skip_bad_images=True, chunk_size=1)
    assert got["broken"].shape == (0, 4) and "skipped with 0 proposals" in caplog.text
    one = compute_proposals_for_images(items[:2], tmp_path / "c.npz", fast10, workers=1, progress=False)
    for k in one:  # the spawned processes give the same boxes
        np.testing.assert_array_equal(got[k], one[k])


def test_parts_segment_with_the_switchs_float_sigma(monkeypatch):
    """Each part's graph segmentation gets the sigma the switch gives its own: a C float, so
    float32(0.8), not the double 0.8 (which changed a few rectangles on 3% of real images)."""
    seg = cv2.ximgproc.segmentation
    real, sigmas = seg.createGraphSegmentation, []

    def recording(sigma, k, **kw):
        sigmas.append(sigma)
        return real(sigma=sigma, k=k, **kw)

    monkeypatch.setattr(seg, "createGraphSegmentation", recording)
    _opencv_ss(_scene(seed=1), "fast", 1)
    assert sigmas and all(s == float(np.float32(0.8)) and s != 0.8 for s in sigmas)


def test_parts_of_the_search_are_the_whole_call_on_real_photos(bccd_root):
    """On BCCD photos where the double sigma had changed rectangles, the parts' union is one
    process() call's set, on 1 and 2 threads (at the configs' 320 px selective-search side)."""
    for name in ("BloodImage_00011", "BloodImage_00030"):
        img = read_image(bccd_root / "JPEGImages" / f"{name}.jpg")
        h, w = img.shape[:2]
        s = 320 / max(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        ref = _one_opencv_call(img, "fast")
        for threads in (1, 2):
            boxes = _opencv_ss(img, "fast", threads)
            assert {(int(x0), int(y0), int(x1 - x0), int(y1 - y0)) for x0, y0, x1, y1 in boxes.tolist()} == ref


def test_proposal_keys_carry_the_revision(monkeypatch, tmp_path):
    """Files computed by code that gave other boxes (an older PROPOSALS_REVISION) have another key,
    so a run recomputes them, and the training run's proposals stage gets another key too."""
    from detector.config import Config
    from detector.engine import proposals as stage_mod

    items = [("a", str(tmp_path / "a.jpg"))]
    opts = {"method": "selective_search", "mode": "fast+"}
    now = compute_mod.proposals_key(items, opts)
    stage = stage_mod.ProposalsStage(Config(), "trainval", [], tmp_path)
    settings_now = stage.settings()
    monkeypatch.setattr(compute_mod, "PROPOSALS_REVISION", compute_mod.PROPOSALS_REVISION - 1)
    assert compute_mod.proposals_key(items, opts) != now
    assert stage.settings() != settings_now
