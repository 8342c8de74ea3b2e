"""fc6/fc7 at a lower precision (detector/fc_precision.py): int8 against a slow reference of dynamic
quantisation, composed with the SVD, stored as a setting in the checkpoint and applied by load."""
from __future__ import annotations

import logging

import pytest
import torch

from detector.bench.inputs import voc_sized_photos
from detector.bench.random_model import random_boxes, random_detector
from detector.fc_precision import lower_fc_precision
from detector.head import FCHead


def _reference_int8_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 Linear spelled out: the input gets one affine quint8 scale and zero point from
    its min/max (range 0..127 on x86, which leaves fbgemm's accumulation room), the weight its
    stored per-row int8 values; integer products summed exactly in float64, then rescaled."""
    from torch.ao.quantization.observer import MinMaxObserver

    w = layer.weight()  # quantised, per output row
    wi = w.int_repr().double()  # (out, in)
    sw, zw = w.q_per_channel_scales().double(), w.q_per_channel_zero_points().double()  # (out,)
    ob = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=127)
    ob(x)
    sx, zx = (float(v) for v in ob.calculate_qparams())
    xi = torch.clamp(torch.round(x * torch.tensor(1.0 / sx, dtype=torch.float32)) + zx, 0, 127).double()  # (R, in)
    acc = (xi - zx) @ (wi - zw[:, None]).t()  # (R, out) exact integers
    b = layer.bias()
    return acc * sx * sw[None, :] + (0.0 if b is None else b.double())


@torch.no_grad()
def test_int8_head_matches_the_reference_and_stays_near_float32():
    torch.manual_seed(0)
    head = FCHead(300, 64, dropout=0.5, init_std=0.05).eval()
    q = lower_fc_precision(head, "int8")
    assert isinstance(head.fc6, torch.nn.Linear)  # the original is untouched
    x = torch.rand(50, 300) * 3  # (R, D) non-negative like pooled ReLU maps
    h = torch.relu(_reference_int8_linear(q.fc6, x)).float()  # (R, F)
    ref = torch.relu(_reference_int8_linear(q.fc7, h))  # (R, F)
    out = q.features(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    # per-row int8 weights are within half a step of the float weights
    for name in ("fc6", "fc7"):
        w = getattr(q, name).weight()
        err = (w.dequantize() - getattr(head, name).weight).abs().amax(dim=1)  # (out,)
        assert bool((err <= w.q_per_channel_scales() / 2 + 1e-7).all())
    # and the features stay close to float32's (2% of their range)
    assert float((out - head.features(x)).abs().max()) < 0.02 * float(head.features(x).abs().max())
    # deterministic for the same input
    assert torch.equal(q.features(x), out)


@torch.no_grad()
def test_int8_composes_with_svd_factors():
    torch.manual_seed(1)
    head = FCHead(300, 64, dropout=0.5, init_std=0.05).eval()
    low = head.compress_svd(16)
    q = lower_fc_precision(low, "int8")
    x = torch.rand(40, 300) * 3
    h = _reference_int8_linear(q.fc6.up, _reference_int8_linear(q.fc6.down, x).float())
    h = torch.relu(h).float()
    ref = torch.relu(_reference_int8_linear(q.fc7.up, _reference_int8_linear(q.fc7.down, h).float()))
    torch.testing.assert_close(q.features(x).double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already at a lower precision"):
        lower_fc_precision(q, "int8")
    with pytest.raises(ValueError, match="fc_precision must be one of"):
        lower_fc_precision(head, "int4")


def test_precision_is_a_stored_setting_applied_by_load(tmp_path, caplog):
    import dataclasses

    from detector.checkpoint import CheckpointError  # noqa: F401  (load's documented error type)
    from detector.detector import SPPDetector
    from detector.export import ExportError, export_detector

    det = random_detector(width_mult=0.125, fc_dim=32, num_classes=2, scales=(96,))
    det.params = dataclasses.replace(det.params, fc_precision="int8")
    det.save(tmp_path / "m.pt")
    loaded = SPPDetector.load(tmp_path / "m.pt")
    assert loaded.fc_precision == "int8" and loaded.params.fc_precision == "int8"
    im = voc_sized_photos(1, size=(120, 160))[0][1]
    boxes = random_boxes(120, 160, 80, torch.Generator().manual_seed(0))
    a = loaded.detect(im, proposals=boxes)
    assert torch.equal(a["scores"], loaded.detect(im, proposals=boxes)["scores"])
    with pytest.raises(ValueError, match="save the float32 model"):
        loaded.save(tmp_path / "again.pt")
    with pytest.raises(ExportError, match="export the float32 model"):
        export_detector(loaded, tmp_path / "m.ts")
    # the argument overrides the stored setting; svd and int8 compose
    assert SPPDetector.load(tmp_path / "m.pt", fc_precision="float32").fc_precision == "float32"
    both = SPPDetector.load(tmp_path / "m.pt", svd_rank=8)
    assert both.svd_rank == 8 and both.fc_precision == "int8"
    with pytest.raises(ValueError, match="fc_precision must be one of"):
        SPPDetector.load(tmp_path / "m.pt", fc_precision="int4")
    # float16 is for CUDA: on the CPU the layers stay float32, with a warning
    with caplog.at_level(logging.WARNING, logger="detector.fc_precision"):
        half = SPPDetector.load(tmp_path / "m.pt", fc_precision="float16")
    assert half.fc_precision == "float32" and "stay float32" in caplog.text
    # a checkpoint written before the setting existed loads as float32
    st = torch.load(tmp_path / "m.pt", weights_only=True)
    del st["params"]["fc_precision"]
    torch.save(st, tmp_path / "old.pt")
    assert SPPDetector.load(tmp_path / "old.pt").fc_precision == "float32"


def test_config_refuses_an_unknown_precision(tmp_path):
    from detector.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("test:\n  fc_precision: int4\n")
    with pytest.raises(ConfigError, match="fc_precision"):
        load_config(p)


def test_auto_is_int8_on_the_cpu_and_float32_on_a_gpu():
    from detector.fc_precision import runnable_precision

    assert runnable_precision("auto", torch.device("cpu")) == "int8"
    assert runnable_precision("auto", torch.device("cuda", 0)) == "float32"
    assert runnable_precision("float16", torch.device("cuda", 0)) == "float16"
    det = random_detector(width_mult=0.125, fc_dim=32, num_classes=2, scales=(96,))
    assert det.lower_fc("auto").fc_precision == "int8"
