"""The trunk in bfloat16 at test time (detector/conv_precision.py): conv5 maps against a float64
reference of the same trunk, the fallback where bfloat16 is not native, and the setting stored in
the checkpoint and applied by load."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from detector import conv_precision as CP
from detector.backbones import ZF5
from detector.bench.inputs import voc_sized_photos
from detector.bench.random_model import random_boxes, random_detector
from detector.pyramid import trunk_pyramid
from detector.regions import pool_regions


@torch.no_grad()
def test_bfloat16_trunk_is_within_bfloat16_error_of_a_float64_reference():
    torch.manual_seed(0)
    net = ZF5(width_mult=0.25).eval()
    x = torch.rand(2, 3, 97, 131) * 255 - 128  # (N, 3, H, W) like bgr255_mean128 input
    sizes = [(97, 131), (64, 86)]
    ref = [m.double() for m in trunk_pyramid(net.double(), x.double(), sizes)]  # float64: the exact net
    net.float()
    f32 = trunk_pyramid(net, x, sizes)
    b16 = trunk_pyramid(net, x, sizes, conv_dtype=torch.bfloat16)
    for r, a, b in zip(ref, f32, b16):
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and b.shape == a.shape == r.shape
        rel32 = float((a.double() - r).norm() / r.norm())
        rel16 = float((b.double() - r).norm() / r.norm())
        # bfloat16 keeps 8 mantissa bits (unit roundoff 2^-9 = 0.2%): a few of those through five
        # convs, far above float32's error and far below a changed network's
        assert rel32 < 1e-5
        assert 1e-4 < rel16 < 0.03
    # the float32 path is the trunk's own arithmetic, bit for bit
    assert all(torch.equal(a, net(x if s == (97, 131) else torch.nn.functional.interpolate(
        x, size=s, mode="bilinear", align_corners=False)).contiguous()) for a, s in zip(f32, sizes))
    # and the bfloat16 one is deterministic
    assert all(torch.equal(b, c) for b, c in zip(b16, trunk_pyramid(net, x, sizes, conv_dtype=torch.bfloat16)))


def test_runnable_precision_falls_back_to_float32_where_bfloat16_is_not_native(monkeypatch, caplog):
    monkeypatch.setattr(CP, "native_bfloat16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="detector.conv_precision"):
        assert CP.runnable_conv_precision("bfloat16", torch.device("cpu")) == "float32"
    assert "no native bfloat16" in caplog.text
    monkeypatch.setattr(CP, "native_bfloat16", lambda device: True)
    assert CP.runnable_conv_precision("bfloat16", torch.device("cpu")) == "bfloat16"
    assert CP.runnable_conv_precision("float32", torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match="conv_precision must be one of"):
        CP.runnable_conv_precision("float16", torch.device("cpu"))
    assert CP.conv_dtype("bfloat16") is torch.bfloat16 and CP.conv_dtype("float32") is None


@torch.no_grad()
def test_precision_is_a_stored_setting_applied_by_load(tmp_path, monkeypatch):
    from detector.detector import SPPDetector
    from detector.export import ExportError, export_detector

    monkeypatch.setattr(CP, "native_bfloat16", lambda device: True)  # autocast runs (emulated) on any CPU
    det = random_detector(width_mult=0.125, fc_dim=32, num_classes=2, scales=(96, 128))
    det.params = dataclasses.replace(det.params, conv_precision="bfloat16", fc_precision="float32")
    assert det.conv_precision == "float32"  # a setting; load applies it
    det.save(tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["backbone"]["conv1.weight"].dtype == torch.float32
    loaded = SPPDetector.load(tmp_path / "m.pt")
    assert loaded.conv_precision == "bfloat16"
    ref = SPPDetector.load(tmp_path / "m.pt", conv_precision="float32")
    assert ref.conv_precision == "float32"
    im = voc_sized_photos(1, size=(120, 160))[0][1]
    a, b = loaded.compute_pyramid(im), ref.compute_pyramid(im)
    for fa, fb in zip(a.fmaps, b.fmaps):
        assert fa.dtype == torch.bfloat16 and fb.dtype == torch.float32
        assert 0 < float((fa.float() - fb).norm() / fb.norm()) < 0.03
    boxes = random_boxes(120, 160, 80, torch.Generator().manual_seed(0))
    # the bfloat16 maps pool to exactly their float32 copies' vectors (the kernel converts the bins)
    a32 = dataclasses.replace(a, fmaps=[f.float() for f in a.fmaps])
    assert torch.equal(pool_regions(a, boxes, loaded.levels, loaded.proj),
                       pool_regions(a32, boxes, loaded.levels, loaded.proj))
    got = loaded.detect(im, proposals=boxes)
    assert torch.equal(got["scores"], loaded.detect(im, proposals=boxes)["scores"])
    # a batch of equal-size images gives each image's own detections
    batch = loaded.detect_batch([im, im.copy()], proposals=[boxes, boxes], workers=0)
    assert all(torch.equal(d["scores"], got["scores"]) and torch.equal(d["boxes"], got["boxes"]) for d in batch)
    with pytest.raises(ExportError, match="export the float32 model"):
        export_detector(loaded, tmp_path / "m.ts")
    with pytest.raises(ValueError, match="conv_precision must be one of"):
        SPPDetector.load(tmp_path / "m.pt", conv_precision="int8")
    # a checkpoint written before the setting existed loads as float32
    st = torch.load(tmp_path / "m.pt", weights_only=True)
    del st["params"]["conv_precision"]
    torch.save(st, tmp_path / "old.pt")
    assert SPPDetector.load(tmp_path / "old.pt").conv_precision == "float32"


def test_config_checks_the_key_and_keeps_old_stage_keys_at_its_default(tmp_path):
    from detector.config import Config, ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("test:\n  conv_precision: float16\n")
    with pytest.raises(ConfigError, match="conv_precision"):
        load_config(p)
    p.write_text("test:\n  conv_precision: bfloat16\n")
    assert load_config(p).test.conv_precision == "bfloat16"
    assert Config().test.conv_precision == "float32"
