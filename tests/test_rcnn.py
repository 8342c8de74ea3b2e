"""R-CNN mode (spec §10): warp_crops against a plain re-statement of rcnn_im_crop.m, the same pixels as
the pyramid, pooled width, detect_rcnn output format.

Shape shorthand: R windows, D = C * B pooled width, K classes, N detections.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detector.rcnn import crop_geometry, warp_crops


def _matlab_round(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """MATLAB imresize(..., 'bilinear', 'antialiasing', false) along one axis, 1-based, plainly."""
    scale = n_out / n_in
    m = np.zeros((n_out, n_in))
    for j in range(1, n_out + 1):
        u = j / scale + 0.5 * (1 - 1 / scale)  # source position of output pixel j (1-based)
        left = math.floor(u)
        frac = u - left
        for idx, wgt in ((left, 1 - frac), (left + 1, frac)):
            idx = min(max(idx, 1), n_in)  # edge replication
            m[j - 1, idx - 1] += wgt
    return m


def _reference_crop(image: np.ndarray, box_xyxy: list[float], crop_size: int = 227, padding: int = 16) -> np.ndarray:
    """rcnn_im_crop.m ('warp', padding 16) written out step by step; mean 128 in BGR (ZF-5).

    Returns [3, crop, crop] float64."""
    im = image[:, :, ::-1].astype(np.float64)  # BGR, 0..255
    H, W = im.shape[:2]
    # project xyxy (continuous, 0-based) -> VOC 1-based inclusive
    x1, y1, x2, y2 = box_xyxy[0] + 1, box_xyxy[1] + 1, box_xyxy[2], box_xyxy[3]
    scale = crop_size / (crop_size - padding * 2)
    half_h = (y2 - y1 + 1) / 2
    half_w = (x2 - x1 + 1) / 2
    cx, cy = x1 + half_w, y1 + half_h
    bx1 = _matlab_round(cx - half_w * scale)
    by1 = _matlab_round(cy - half_h * scale)
    bx2 = _matlab_round(cx + half_w * scale)
    by2 = _matlab_round(cy + half_h * scale)
    unclipped_h, unclipped_w = by2 - by1 + 1, bx2 - bx1 + 1
    pad_x1, pad_y1 = max(0, 1 - bx1), max(0, 1 - by1)
    bx1, by1, bx2, by2 = max(1, bx1), max(1, by1), min(W, bx2), min(H, by2)
    clipped_h, clipped_w = by2 - by1 + 1, bx2 - bx1 + 1
    scale_x, scale_y = crop_size / unclipped_w, crop_size / unclipped_h
    crop_w, crop_h = _matlab_round(clipped_w * scale_x), _matlab_round(clipped_h * scale_y)
    pad_x1, pad_y1 = _matlab_round(pad_x1 * scale_x), _matlab_round(pad_y1 * scale_y)
    if pad_y1 + crop_h > crop_size:
        crop_h = crop_size - pad_y1
    if pad_x1 + crop_w > crop_size:
        crop_w = crop_size - pad_x1
    window = im[by1 - 1:by2, bx1 - 1:bx2, :]
    my, mx = _interp_matrix(window.shape[0], crop_h), _interp_matrix(window.shape[1], crop_w)
    tmp = np.stack([my @ window[:, :, c] @ mx.T for c in range(3)], axis=2) - 128.0
    out = np.zeros((crop_size, crop_size, 3))
    out[pad_y1:pad_y1 + crop_h, pad_x1:pad_x1 + crop_w, :] = tmp
    return out.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(90, 120, 3)).astype(np.float64)
    # smooth-ish content plus noise so interpolation errors would show
    yy, xx = np.mgrid[0:90, 0:120]
    base[:, :, 0] = 0.5 * base[:, :, 0] + 60 * (1 + np.sin(xx / 7.0))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_geometry_hand_computed():
    # VOC (1,1,100,100): half 50, centre 51, scale 227/195; enlarged x1 = round(-7.205) = -7,
    # x2 = round(109.205) = 109; unclipped 117, 8 px off-image; clipped 1..109 -> round(109*227/117) = 211,
    # offset round(8*227/117) = 16.
    geo = crop_geometry(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), height=300, width=300)
    assert geo.tolist() == [[0, 0, 109, 109, 16, 16, 211, 211]]


@pytest.mark.parametrize(
    "box",
    [
        [30.0, 20.0, 90.0, 70.0],  # inside, context stays inside
        [0.0, 0.0, 50.0, 40.0],  # crosses the top-left border
        [80.0, 55.0, 120.0, 90.0],  # crosses the bottom-right border
        [40.0, 40.0, 42.0, 41.0],  # tiny (2 x 1 px): upsampled
        [-30.0, 10.0, 200.0, 60.0],  # wider than the image on both sides
    ],
)
def test_warp_crops_matches_reference(image, box):
    got = warp_crops(image, torch.tensor([box]), "bgr255_mean128")
    assert got.shape == (1, 3, 227, 227) and got.dtype == torch.float32
    ref = _reference_crop(image, box)
    np.testing.assert_allclose(got[0].numpy(), ref, atol=2e-3, rtol=0)


def test_border_crop_zero_padding_and_offset(image):
    box = [0.0, 0.0, 50.0, 40.0]
    geo = crop_geometry(torch.tensor([box]), 90, 120)[0]
    sx1, sy1, sx2, sy2, px, py, cw, ch = geo.tolist()
    assert (sx1, sy1) == (0, 0) and px > 0 and py > 0
    crop = warp_crops(image, torch.tensor([box]), "bgr255_mean128")[0]  # (3, 227, 227)
    assert torch.all(crop[:, :py, :] == 0) and torch.all(crop[:, :, :px] == 0)
    # the first pasted pixel is the image's top-left pixel (edge replication), mean-subtracted, BGR
    expect = torch.tensor(image[0, 0, ::-1].astype(np.float32) - 128.0)
    torch.testing.assert_close(crop[:, py, px], expect, atol=1e-3, rtol=0)
    # the rest of the canvas is covered by the warped patch
    assert py + ch <= 227 and px + cw <= 227


def test_off_image_box_is_all_zero(image):
    crop = warp_crops(image, torch.tensor([[500.0, 500.0, 600.0, 600.0]]), "bgr255_mean128")
    assert torch.all(crop == 0)


@pytest.mark.parametrize("fmt", ["bgr255_mean128", "rgb_imagenet"])
def test_crops_see_the_pyramid_pixels(fmt):
    """R-CNN crops use the project's one pre-processing: a box whose warped crop is a 1:1 copy of the
    image (VOC width 195 -> 227 with context) holds exactly detector.pyramid.preprocess's values."""
    from detector.pyramid import preprocess

    img = np.random.default_rng(3).integers(0, 256, size=(260, 270, 3), dtype=np.uint8)
    box = torch.tensor([[40.0, 40.0, 234.0, 234.0]])
    assert crop_geometry(box, 260, 270).tolist() == [[24, 24, 251, 251, 0, 0, 227, 227]]
    crop = warp_crops(img, box, fmt)[0]  # (3, 227, 227)
    assert torch.equal(crop, preprocess(img, fmt)[:, 24:251, 24:251])
    with pytest.raises(ValueError, match="input_format"):
        warp_crops(img, box, "yuv")


def test_warp_crops_rejects_bad_boxes(image):
    with pytest.raises(ValueError, match="boxes must be"):
        warp_crops(image, torch.zeros(3, 5), "bgr255_mean128")


# ------------------------------------------------------------------------ with a detector

@pytest.fixture(scope="module")
def tiny_det():
    pytest.importorskip("detector.pyramid")
    pytest.importorskip("detector.projection")
    from detector.bench.random_model import random_detector

    return random_detector(width_mult=0.0625, fc_dim=32, num_classes=3, scales=(160,), seed=0)


def test_pooled_width_equals_spp_mode(tiny_det, image):
    from detector.regions import pool_regions
    from detector.rcnn import rcnn_pooled_features

    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 120.0, 90.0], [70.0, 30.0, 100.0, 88.0]])
    crops = rcnn_pooled_features(tiny_det, image, boxes, batch_size=2)  # (R, D) in 2 batches
    pyr = tiny_det.compute_pyramid(image)
    spp = pool_regions(pyr, boxes, tiny_det.levels, tiny_det.proj)
    assert crops.shape == spp.shape == (3, tiny_det.head.in_dim)
    # whole-map SPP of the crop's conv5 = spp_pool with a full-map window (spec §4 bins)
    from detector.spp import spp_pool

    with torch.inference_mode():
        fmap = tiny_det.backbone(warp_crops(image, boxes[:1], tiny_det.backbone.input_format))[0]  # (C, 13, 13)
        full = torch.tensor([[0, 0, fmap.shape[2] - 1, fmap.shape[1] - 1]])
        torch.testing.assert_close(crops[:1], spp_pool(fmap, full, tiny_det.levels))


def test_detect_rcnn_output_format(tiny_det, image):
    from detector.rcnn import RCNN_STAGES, detect_rcnn

    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 120.0, 90.0], [70.0, 30.0, 100.0, 88.0]])
    dets, timings = detect_rcnn(tiny_det, image, boxes, score_threshold=-math.inf)
    assert set(dets) == {"boxes", "scores", "labels"}
    n = dets["boxes"].shape[0]
    assert 1 <= n <= 3 * 3
    assert dets["boxes"].dtype == torch.float32 and dets["boxes"].shape == (n, 4)
    assert dets["scores"].dtype == torch.float32 and dets["scores"].shape == (n,)
    assert dets["labels"].dtype == torch.int64 and int(dets["labels"].max()) < 3
    assert torch.all(dets["scores"][:-1] >= dets["scores"][1:])
    assert set(timings) == set(RCNN_STAGES) and all(v >= 0 for v in timings.values())
    empty, _ = detect_rcnn(tiny_det, image, torch.zeros((0, 4)))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_detect_on_cuda_matches_cpu(image):
    """The same detect() code path on CUDA: boxes, scores and labels equal the CPU run's."""
    from detector.bench.random_model import random_boxes, random_detector

    boxes = random_boxes(image.shape[0], image.shape[1], 300, torch.Generator().manual_seed(1))
    cpu = random_detector(width_mult=0.25, fc_dim=64, num_classes=3, scales=(160, 240), seed=0)
    gpu = random_detector(width_mult=0.25, fc_dim=64, num_classes=3, scales=(160, 240), seed=0, device="cuda")
    want = cpu.detect(image, proposals=boxes, score_threshold=-math.inf)
    got = gpu.detect(image, proposals=boxes.cuda(), score_threshold=-math.inf)
    assert all(v.device.type == "cpu" for v in got.values())  # detect() returns CPU tensors on any device
    n = min(50, want["scores"].shape[0])
    torch.testing.assert_close(got["scores"].cpu()[:n], want["scores"][:n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["boxes"].cpu()[:n], want["boxes"][:n], rtol=1e-4, atol=1e-2)
    assert torch.equal(got["labels"].cpu()[:n], want["labels"][:n])
