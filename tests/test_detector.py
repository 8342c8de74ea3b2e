"""SPPDetector's public calls: the torchvision-style ``model(list[CHW])``, ``detect`` with its
channel order, and ``detect_batch`` / ``iter_detect`` against the per-image loop (same detections,
bit for bit)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import detector.detector as D
from detector.bench.inputs import voc_sized_photos
from detector.bench.random_model import random_boxes, random_detector
from proposals.imageio import ImageError


@pytest.fixture(scope="module")
def det():
    return random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))


@pytest.fixture(scope="module")
def photos():
    return [im for _, im in voc_sized_photos(3, size=(120, 160))]


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) == {"boxes", "scores", "labels"} and all(torch.equal(a[k], b[k]) for k in a)


def test_model_call_equals_detect(det, photos):
    """model([t]) with t = uint8 / 255 gives detect()'s detections exactly: given proposals, and
    selective search on the image (run on round(t * 255) == the uint8 image)."""
    im = photos[0]
    boxes = random_boxes(120, 160, 150, torch.Generator().manual_seed(0))
    ref = det.detect(im, proposals=boxes)
    assert len(ref["scores"]) > 0
    (out,) = det([_chw(im)], [boxes])
    assert _same(out, ref)
    assert out["labels"].dtype == torch.int64 and out["boxes"].dtype == torch.float32
    # selective search inside both calls
    assert _same(det([_chw(im)])[0], det.detect(im))
    # several images, one call; outputs are per image and in order
    outs = det([_chw(p) for p in photos], [boxes] * 3)
    assert all(_same(o, det.detect(p, proposals=boxes)) for o, p in zip(outs, photos))


def test_model_call_refuses_what_torchvision_would_not_take(det, photos):
    t = _chw(photos[0])
    with pytest.raises(ImageError, match="list of Tensor"):
        det(t)
    with pytest.raises(ImageError, match=r"images\[0\].*\[3, H, W\]"):
        det([t[0]])
    with pytest.raises(ImageError, match=r"images\[0\].*\[3, H, W\]"):
        det([t.permute(1, 2, 0)])  # HWC
    with pytest.raises(ImageError, match=r"images\[1\].*divide 0..255"):
        det([t, t * 255])
    with pytest.raises(ImageError, match=r"images\[0\].*finite"):
        det([torch.full_like(t, float("nan"))])
    with pytest.raises(ImageError, match=r"sides must be within"):
        det([t[:, :20, :20]])
    with pytest.raises(ValueError, match="2 entries for 1 images"):
        det([t], [torch.zeros(0, 4)] * 2)
    det.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            det([t])
    finally:
        det.eval()


def test_detect_refuses_a_tensor_with_a_pointer_to_the_model_call(det, photos):
    with pytest.raises(ImageError, match=r"model\(\[tensor\]\)"):
        det.detect(_chw(photos[0]))


def test_channel_order_bgr(det, photos):
    """A cv2.imread (BGR) array with channel_order='bgr' detects as its RGB original; the default
    takes a bare array as RGB; other values are refused by name."""
    im = photos[1]
    boxes = random_boxes(120, 160, 100, torch.Generator().manual_seed(1))
    ref = det.detect(im, proposals=boxes)
    bgr = np.ascontiguousarray(im[:, :, ::-1])
    assert _same(det.detect(bgr, proposals=boxes, channel_order="bgr"), ref)
    assert not _same(det.detect(bgr, proposals=boxes), ref)  # taken as RGB: other colours, other scores
    bgra = np.concatenate([bgr, np.full(im.shape[:2] + (1,), 255, np.uint8)], axis=2)  # cv2.IMREAD_UNCHANGED
    assert _same(det.detect(bgra, proposals=boxes, channel_order="bgr"), ref)
    assert _same(det.detect_batch([bgr], [boxes], channel_order="bgr")[0], ref)
    with pytest.raises(ValueError, match="channel_order.*'rgb', 'bgr'.*'BGR'"):
        det.detect(im, channel_order="BGR")


def test_outputs_follow_the_input_device(det, photos):
    (out,) = det([_chw(photos[0])], [torch.tensor([[0.0, 0.0, 80.0, 60.0]])])
    assert all(v.device == torch.device("cpu") for v in out.values())


def test_detect_batch_equals_the_loop_with_given_proposals(det, photos):
    """Images of two sizes (two through the trunk together) and an empty proposal set: every
    detection equals detect()'s on that image, bit for bit, whichever trunk path the batch took."""
    small = photos[2][:100, :140].copy()
    images = [photos[0], small, photos[1], photos[2]]
    props = [random_boxes(im.shape[0], im.shape[1], 120, torch.Generator().manual_seed(i)) for i, im in enumerate(images)]
    props[2] = torch.zeros((0, 4))
    det._batch_exact.clear()
    got = det.detect_batch(images, props, batch_size=4)
    assert det._batch_exact, "the batch never went through the trunk together"
    assert set(det.last_timings) == {"proposals", "conv", "pool", "fc", "svm", "bbox", "nms"}
    loop = [det.detect(im, proposals=b) for im, b in zip(images, props)]
    assert all(_same(g, r) for g, r in zip(got, loop))
    assert got[2]["boxes"].shape == (0, 4)
    det._batch_exact.clear()


@pytest.mark.parametrize("off", [0.0, 1e-3])
def test_trunk_batch_check(det, photos, monkeypatch, off):
    """The first batch of a size is checked against its first image's own pass: equal bits -> the
    batch is used (one batched pass, one single check, then batched passes only); different bits
    -> the images go one at a time. The verdict is remembered either way."""
    import detector.detector as D

    real = D.trunk_pyramid
    calls = []

    def trunk(backbone, x, sizes, device=None, conv_dtype=None):
        calls.append(x.shape[0])
        per = [real(backbone, x[i:i + 1], sizes, device, conv_dtype)
               for i in range(x.shape[0])]  # batch-invariant by construction
        out = [torch.cat([p[s] for p in per]) for s in range(len(sizes))]  # S x (N, C, Hs, Ws)
        return [f + off if x.shape[0] > 1 else f for f in out]  # off > 0: a batch off in the last bits

    images = [photos[0], photos[1]]
    props = [random_boxes(120, 160, 80, torch.Generator().manual_seed(i)) for i in range(2)]
    loop = [det.detect(im, proposals=b) for im, b in zip(images, props)]
    monkeypatch.setattr(D, "trunk_pyramid", trunk)
    det._batch_exact.clear()
    got = det.detect_batch(images, props, batch_size=4)
    assert list(det._batch_exact.values()) == [off == 0.0]
    assert calls == ([2, 1] if off == 0.0 else [2, 1, 1, 1])
    calls.clear()
    det.detect_batch(images, props, batch_size=4)
    assert calls == ([2] if off == 0.0 else [2, 1, 1])
    calls.clear()
    det.detect_batch(images, props)  # the CPU default: one image at a time, no batch to check
    assert calls == [1, 1]
    det._batch_exact.clear()
    assert all(_same(g, r) for g, r in zip(got, loop))


def test_detect_batch_selective_search_in_a_worker_pool(det, photos):
    """Proposals computed in a spawned worker process give the detections of selective search
    here; iter_detect streams the same results from a generator of inputs."""
    got = det.detect_batch(photos, batch_size=2, workers=1)
    loop = [det.detect(im) for im in photos]
    assert all(_same(g, r) for g, r in zip(got, loop))
    streamed = [{k: v.cpu() for k, v in d.items()}
                for d in det.iter_detect((im for im in photos), batch_size=2, workers=0)]
    assert all(_same(s, r) for s, r in zip(streamed, loop))


def test_default_workers_follow_the_spare_cores(det, photos, monkeypatch):
    """workers=None: a proposal worker (with the spare cores as its selective-search threads) only
    when cores beyond torch's threads exist; otherwise selective search runs here on the torch
    threads. Detections are those of the loop either way."""
    import concurrent.futures

    import proposals

    submitted = []

    class InlinePool:  # runs each job at once, records how it was asked for
        def submit(self, fn, *args, **kwargs):
            submitted.append(kwargs.get("threads"))
            fut = concurrent.futures.Future()
            fut.set_result(fn(*args, **kwargs))
            return fut

        def shutdown(self, **kwargs):
            pass

    started = []
    monkeypatch.setattr(proposals, "start_proposal_pool", lambda n: started.append(n) or InlinePool())
    loop = [det.detect(im) for im in photos[:2]]
    monkeypatch.setattr(D, "spare_cores", lambda: 0)
    assert all(_same(g, r) for g, r in zip(det.detect_batch(photos[:2]), loop))
    assert started == [] and submitted == []
    monkeypatch.setattr(D, "spare_cores", lambda: 3)
    assert all(_same(g, r) for g, r in zip(det.detect_batch(photos[:2]), loop))
    assert started == [1] and submitted == [3, 3]
    det.detect_batch(photos[:2], workers=np.int64(2), batch_size=np.int64(2))  # numpy integers are integers
    assert started == [1, 2] and submitted == [3, 3, 1, 1]  # 3 spare cores // 2 workers


def test_spare_cores_counts_the_affinity_beyond_torch_threads(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert D.spare_cores() == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert D.spare_cores() == 0


def test_detect_batch_argument_checks(det, photos):
    with pytest.raises(ValueError, match="1 entries for 2 images"):
        det.detect_batch(photos[:2], [None])
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            det.detect_batch(photos[:2], batch_size=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            det.detect_batch(photos[:2], workers=bad)


def test_a_script_without_main_guard_gets_a_clear_error(tmp_path):
    """Spawned proposal workers import the calling script; one without a __main__ guard breaks the
    pool, and the error says why and what to do instead of a bare BrokenProcessPool."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "no_guard.py"
    script.write_text(
        "import numpy as np\n"
        "from detector.bench.random_model import random_detector\n"
        "det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))\n"
        "ims = [np.full((64, 80, 3), v, np.uint8) for v in (60, 120, 180)]\n"
        "det.detect_batch(ims, workers=1)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0
    assert "RuntimeError: <array>: the proposal worker process ended" in r.stderr
    assert "__main__" in r.stderr.strip().splitlines()[-1]


def test_checkpoint_keeps_the_input_format(tmp_path):
    """A trunk trained on torchvision-style pixels detects on them after a save and load."""
    from detector.detector import SPPDetector

    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))
    det.backbone.input_format = "rgb_imagenet"
    det.save(tmp_path / "m.pt")
    st = torch.load(tmp_path / "m.pt", weights_only=True)
    assert st["input_format"] == "rgb_imagenet"
    assert SPPDetector.load(tmp_path / "m.pt").backbone.input_format == "rgb_imagenet"
    del st["input_format"]  # a file written before the format was stored: the arch's own
    torch.save(st, tmp_path / "old.pt")
    assert SPPDetector.load(tmp_path / "old.pt").backbone.input_format == "bgr255_mean128"


def test_windows_that_pool_the_same_cells_are_scored_once(det, photos):
    """Boxes that project to the same conv5 window at the same scale are pooled and run through fc
    once (last_counts), and the detections equal the reference that pools, scores and regresses
    every window on its own (to float tolerance: the fc matmul has fewer rows)."""
    from detector.regions import distinct_windows, pool_regions

    im = photos[0]
    base = random_boxes(120, 160, 60, torch.Generator().manual_seed(1))
    # each box again shifted by one pixel (stride 16: mostly the same window) and once more exactly
    boxes = torch.cat([base, base + 1.0, base])  # (180, 4)
    out = det.detect(im, proposals=boxes)
    pyr = det.compute_pyramid(im)
    first, inverse = distinct_windows(pyr, boxes, det.proj)
    assert det.last_counts == {"windows": 180, "distinct": first.shape[0]}
    assert first.shape[0] <= 120  # the exact copies at least
    # reference: every window on its own
    with torch.inference_mode():
        pooled = pool_regions(pyr, boxes, det.levels, det.proj)  # (R, D)
        assert torch.equal(pooled[first][inverse], pooled)  # same cells, same vector
        scores = det.svm_scores(det.fc_features(pooled))  # (R, K)
        ref = det.postprocess(boxes, pooled, scores, pyr.image_size)
    assert torch.equal(out["labels"], ref["labels"])
    torch.testing.assert_close(out["scores"], ref["scores"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=1e-5, atol=1e-4)
    assert len(out["scores"]) > 0


def test_cpu_width_resnet18_detector_saves_and_loads(tmp_path):
    """A detector on the CPU-width ResNet-18 comes back from its checkpoint with the same width and
    the same detections."""
    from detector.detector import SPPDetector

    det = random_detector(width_mult=0.25, fc_dim=16, num_classes=2, scales=(96,), arch="resnet18")
    det.save(tmp_path / "m.pt")
    back = SPPDetector.load(tmp_path / "m.pt")
    assert back.backbone.out_channels == 64 and back.width_mult == 0.25 and back.arch == "resnet18"
    img = (torch.rand(90, 120, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    boxes = torch.tensor([[0.0, 0.0, 60.0, 50.0], [30.0, 20.0, 110.0, 88.0], [5.0, 40.0, 45.0, 85.0]])
    a, b = det.detect(img, proposals=boxes), back.detect(img, proposals=boxes)
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=0, atol=0)
