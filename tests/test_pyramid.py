"""Pre-processing values, the one resize rule, and the pyramid's forward passes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector.backbones import build_backbone, conv5_size
from detector.pyramid import (IMAGENET_MEAN, IMAGENET_STD, ZF_MEAN, hwc_layout, image_pyramid, preprocess,
                              preprocess_float, pyramid_sizes, resized_size, trunk_pyramid)


def test_preprocess_zf5_bgr_mean128():
    im = np.array([[[10, 20, 30], [0, 128, 255]]], dtype=np.uint8)  # 1x2 RGB
    x = preprocess(im, "bgr255_mean128")
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == [30 - 128, 20 - 128, 10 - 128]  # B, G, R
    assert x[:, 0, 1].tolist() == [127, 0, -128]


def test_preprocess_torchvision_imagenet():
    im = np.array([[[10, 20, 30]]], dtype=np.uint8)
    x = preprocess(im, "rgb_imagenet")
    want = [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(want))


def test_preprocess_grey_and_errors():
    grey = np.array([[7, 9]], dtype=np.uint8)
    x = preprocess(grey, "bgr255_mean128")
    assert x.shape == (3, 1, 2) and x[:, 0, 1].tolist() == [9 - 128] * 3
    assert torch.equal(preprocess(grey[:, :, None], "bgr255_mean128"), x)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((2, 2, 3), dtype=np.float32), "bgr255_mean128")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        preprocess(np.zeros((2, 2, 4), dtype=np.uint8), "bgr255_mean128")
    with pytest.raises(ValueError, match="input_format"):
        preprocess(grey, "yuv")


def test_resized_size_rule():
    assert resized_size(375, 500, 688) == (688, 917)  # 500*688/375 = 917.33
    assert resized_size(500, 375, 688) == (917, 688)
    assert resized_size(4, 6, 3) == (3, 5)  # 4.5 rounds half up
    assert resized_size(480, 640, 480) == (480, 640)
    assert resized_size(375, 500, 688, max_size=800) == (600, 800)  # cap: 375*800/500 = 600
    assert resized_size(375, 500, 688, max_size=1000) == (688, 917)  # cap not reached
    assert pyramid_sizes(480, 640, (480, 576)) == [(480, 640), (576, 768)]
    with pytest.raises(ValueError, match="bad sizes"):
        resized_size(0, 10, 5)


def test_image_pyramid_one_pass_per_scale():
    torch.manual_seed(0)
    net = build_backbone("zf5", 0.25).eval()
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    fmaps = image_pyramid(net, im, (100, 60, 120), max_size=150)
    sizes = pyramid_sizes(60, 80, (100, 60, 120), max_size=150)
    assert sizes == [(100, 133), (60, 80), (113, 150)]
    x = preprocess(im, "bgr255_mean128")[None]
    for f, (h, w) in zip(fmaps, sizes):
        assert f.shape == (1, 64, conv5_size("zf5", h), conv5_size("zf5", w))
        assert not f.requires_grad
        xs = x if (h, w) == (60, 80) else F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        with torch.no_grad():
            torch.testing.assert_close(f, net(xs))


def test_resize_is_bilinear_without_antialias_like_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    im = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = preprocess(im, "bgr255_mean128")[None]
    for h, w in ((20, 25), (90, 113)):  # down (where antialiasing would differ) and up
        ours = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]
        ref = cv2.resize(im.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        ref = torch.from_numpy(ref[:, :, ::-1].copy()).permute(2, 0, 1) - 128  # BGR, mean 128
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("fmt", ["bgr255_mean128", "rgb_imagenet"])
def test_preprocess_float_equals_uint8_path_bit_for_bit(fmt):
    """model([uint8 / 255]) and detect(uint8) feed the trunk the same numbers: every value 0..255 in
    every channel, exactly."""
    k = np.arange(256, dtype=np.uint8)
    im = np.stack([k, k[::-1], np.roll(k, 7)], axis=1)[None]  # (1, 256, 3) RGB
    t = torch.from_numpy(im).permute(2, 0, 1).float() / 255  # (3, 1, 256)
    assert torch.equal(preprocess_float(t, fmt), preprocess(im, fmt))
    assert torch.equal(preprocess_float(t[None], fmt)[0], preprocess(im, fmt))  # batched (N, 3, H, W)


def test_preprocess_float_constants_are_the_modules():
    # preprocess_float writes its constants out (TorchScript cannot read module globals)
    one = torch.ones(3, 1, 1)
    assert torch.equal(preprocess_float(torch.zeros(3, 1, 1), "bgr255_mean128"), -ZF_MEAN * one)
    got = preprocess_float(torch.zeros(3, 1, 1), "rgb_imagenet").flatten()
    want = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="input_format"):
        preprocess_float(torch.zeros(3, 1, 1), "yuv")


def test_trunk_pyramid_matches_image_pyramid():
    bb = build_backbone("zf5", width_mult=0.125).eval()
    im = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    ref = image_pyramid(bb, im, (64, 80))
    x = preprocess(im, bb.input_format)[None]  # (1, 3, H, W)
    got = trunk_pyramid(bb, x, pyramid_sizes(70, 90, (64, 80)))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        trunk_pyramid(bb, x[0], [(64, 82)])


def test_every_single_image_pass_runs_in_one_memory_layout():
    # the CPU convolution picks its kernel by the input's strides: the HWC view preprocess returns
    # and a contiguous NCHW copy of the same numbers give conv5 maps that differ in the last bit
    # (here, as on the digits test images), so trunk_pyramid runs one image in one layout whatever
    # the caller hands it, and the training cache, detect() and model([t]) see the same bits.
    bb = build_backbone("zf5", width_mult=0.125).eval()
    im = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    x = preprocess(im, bb.input_format)[None]  # (1, 3, H, W) HWC view
    with torch.no_grad():
        assert not torch.equal(bb(x), bb(x.contiguous()))  # the effect this guards against
    assert hwc_layout(x.contiguous()).stride() == x.stride() == (3, 1, 270, 3)
    ref = image_pyramid(bb, im, (70, 80))  # 70 = the image's own size: not resized
    t = torch.from_numpy(im).permute(2, 0, 1).float() / 255  # (3, H, W) contiguous
    for given in (x.contiguous(), preprocess_float(t, bb.input_format)[None]):
        got = trunk_pyramid(bb, given, pyramid_sizes(70, 90, (70, 80)))
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
