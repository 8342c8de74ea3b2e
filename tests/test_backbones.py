"""Backbones: ZF-5 geometry and LRN against spec §1, projection constants against the real receptive
field of every trunk, weight loading errors."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector import backbones as B
from detector.backbones import (
    ZF5,
    WithinChannelLRN,
    ResNet50C4,
    VGG16Conv5,
    WeightsError,
    build_backbone,
    conv5_size,
    rf_geometry,
    rf_size,
)

SPEC_SIZES = {224: 13, 180: 10, 480: 29, 576: 35, 688: 42, 874: 53, 1200: 74}  # spec §1


def test_conv5_size_matches_spec():
    assert {s: conv5_size("zf5", s) for s in SPEC_SIZES} == SPEC_SIZES


def test_zf5_forward_sizes_match_spec():
    # thin inputs: the height runs through the spec's sides, the width stays small
    net = ZF5(width_mult=0.25).eval()
    with torch.no_grad():
        for side, want in SPEC_SIZES.items():
            out = net(torch.zeros(1, 3, side, 48))
            assert out.shape == (1, 64, want, conv5_size("zf5", 48)), side


def test_zf5_channels_and_init():
    assert ZF5(0.25).channels == (24, 64, 96, 96, 64)
    net = ZF5()
    assert net.channels == (96, 256, 384, 384, 256) and net.out_channels == 256
    assert net.stride == 16 and net.input_format == "bgr255_mean128"
    for name, bias in (("conv1", 0.0), ("conv2", 1.0), ("conv3", 0.0), ("conv4", 1.0), ("conv5", 1.0)):
        conv = getattr(net, name)
        assert torch.all(conv.bias == bias), name
        assert abs(conv.weight.std().item() - 0.01) < 0.001, name
        assert abs(conv.weight.mean().item()) < 0.001, name
    pools = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.MaxPool2d)]
    assert not pools  # pooling is functional with ceil_mode=True (checked by the sizes above)


def test_within_channel_lrn_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64) * 40  # large: LRN visibly acts
    lrn = B.WithinChannelLRN(3, 5e-5, 0.75)
    got = lrn(x)
    want = torch.empty_like(x)
    n, c, h, w = x.shape
    for i in range(n):
        for k in range(c):
            for y in range(h):
                for xx in range(w):
                    s = 0.0
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            if 0 <= y + dy < h and 0 <= xx + dx < w:  # zeros outside the map
                                s += float(x[i, k, y + dy, xx + dx]) ** 2
                    want[i, k, y, xx] = x[i, k, y, xx] * (1 + 5e-5 / 9 * s) ** -0.75
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, x)  # it did something
    # the in-place inference path gives the same numbers and leaves its input alone
    x0 = x.clone()
    with torch.inference_mode():
        fast = lrn(x)
    assert torch.equal(fast, got) and torch.equal(x, x0)
    # the training path still differentiates
    xg = x.clone().requires_grad_(True)
    lrn(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_zf5_channels_last_forward_equals_default_layout():
    """ZF-5 runs channels-last inside; its conv5 map equals the plain NCHW composition of its layers."""
    torch.manual_seed(0)
    m = B.ZF5(0.25).eval()
    x = torch.randn(2, 3, 67, 91) * 60
    with torch.no_grad():
        got = m(x)
        y = F.max_pool2d(m.lrn(F.relu(m.conv1(x))), 3, 2, ceil_mode=True)
        y = F.max_pool2d(m.lrn(F.relu(m.conv2(y))), 3, 2, ceil_mode=True)
        want = F.relu(m.conv5(F.relu(m.conv4(F.relu(m.conv3(y))))))
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rf_geometry_constants():
    assert rf_geometry(ZF5.geometry) == (16, 20.0)  # spec §3: 1-based offset0 = 21
    assert rf_geometry(VGG16Conv5.geometry) == (16, 7.5)
    assert rf_geometry(ResNet50C4.geometry) == (16, 0.0)
    assert ZF5.proj_offset0 == 20.0 and VGG16Conv5.proj_offset0 == 7.5 and ResNet50C4.proj_offset0 == 0.0
    assert ZF5.proj_shrink == VGG16Conv5.proj_shrink == ResNet50C4.proj_shrink == 6.5
    assert rf_size(ZF5.geometry) == 139  # spec §1 / [P3 A.1]
    assert rf_size(VGG16Conv5.geometry) == 196 and rf_size(ResNet50C4.geometry) == 267


@pytest.fixture(scope="module")
def tv_nets() -> dict[str, nn.Module]:
    """The torchvision trunks, built once for the module (weights="none")."""
    return {"vgg16": build_backbone("vgg16").eval(), "resnet50": build_backbone("resnet50").eval()}


def _positive(net: nn.Module) -> nn.Module:
    """Weights 1/fan_in (> 0), biases 0, BN identity: a zero image gives exactly zero everywhere and
    a positive impulse reaches exactly the cells whose receptive field contains it."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
    return net


@pytest.mark.parametrize("arch,height,width,cell", [("zf5", 32, 200, 4), ("zf5_bn", 32, 200, 4), ("vgg16", 16, 208, 6),
                                                    ("resnet50", 16, 288, 9), ("resnet18", 16, 240, 7),
                                                    ("resnet18_x0.25", 16, 240, 7), ("mobilenet_v3", 16, 304, 9)])
def test_receptive_field_matches_projection_constants(arch, height, width, cell, tv_nets):
    """Impulses just inside and just outside the predicted receptive field of conv5 column ``cell``.

    The field is centred on ``stride * cell + proj_offset0`` (0-based pixel index) with the side of
    ``rf_size``; both edges are checked, so centre and size are the trunk's real ones. (On a zero
    image the LRN scales zeros, so ZF-5's field is the 139 px of its convolutions and pools.)
    """
    arch, _, width_mult = arch.partition("_x")  # "resnet18_x0.25": the CPU-width ResNet-18
    net = _positive(tv_nets[arch] if arch in tv_nets else
                    build_backbone(arch, width_mult=float(width_mult or (0.25 if arch.startswith("zf5") else 1.0))).eval())
    centre = net.stride * cell + net.proj_offset0
    half = (rf_size(net.geometry) - 1) / 2
    left, right = int(centre - half), int(centre + half)
    assert left >= 1 and right + 1 < width  # the field is not clipped by the image
    cols = [left - 1, left, right, right + 1]
    x = torch.zeros(len(cols), 3, height, width)
    for i, c in enumerate(cols):
        x[i, :, :, c] = 1.0
    with torch.no_grad():
        out = net(x)
    assert out.shape[-1] == conv5_size(arch, width) and out.shape[-2] == conv5_size(arch, height)
    reached = (out[:, :, :, cell].abs().flatten(1).sum(1) > 0).tolist()
    assert reached == [False, True, True, False], (arch, cols, reached)


def test_zf5_bn_keeps_the_spec_geometry_and_matches_a_slow_reference():
    """zf5_bn: ZF-5's sizes, projection constants and channels; its forward against the layers
    written out one by one (conv, BatchNorm in eval mode by its formula, ReLU, pools)."""
    from detector.backbones import ZF5BN

    net = build_backbone("zf5_bn", width_mult=0.25).eval()
    assert isinstance(net, ZF5BN) and net.geometry == ZF5.geometry and net.proj_offset0 == 20.0
    assert net.channels == (24, 64, 96, 96, 64) and net.stride == 16 and net.input_format == "bgr255_mean128"
    assert not any(isinstance(m, WithinChannelLRN) for m in net.modules())
    assert {s: conv5_size("zf5_bn", s) for s in SPEC_SIZES} == SPEC_SIZES
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in range(1, 6):
            bn = getattr(net, f"bn{k}")
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        x = torch.randn(2, 3, 83, 101, generator=g) * 50

        def unit(x, k):
            conv, bn = getattr(net, f"conv{k}"), getattr(net, f"bn{k}")
            y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
            return torch.clamp(y * bn.weight[:, None, None] + bn.bias[:, None, None], min=0)

        ref = F.max_pool2d(unit(x, 1), 3, 2, ceil_mode=True)
        ref = F.max_pool2d(unit(ref, 2), 3, 2, ceil_mode=True)
        for k in (3, 4, 5):
            ref = unit(ref, k)
        out = net(x)
    assert out.shape == (2, 64, conv5_size("zf5", 83), conv5_size("zf5", 101))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # float32 sums in another order
    fresh = ZF5BN()
    for k in range(1, 6):  # He fan-in init, biases 0, BatchNorm at identity
        conv = getattr(fresh, f"conv{k}")
        assert torch.all(conv.bias == 0)
        std = (2.0 / conv.weight[0].numel()) ** 0.5
        assert abs(conv.weight.std().item() - std) < 0.1 * std, k
        assert torch.all(getattr(fresh, f"bn{k}").weight == 1)


def test_light_trunks_geometry_and_sizes():
    """The light trunks' projection constants, hand-derived in detector/backbones.py, and their
    conv5 sizes against the modules' own outputs (odd sides included)."""
    from detector.backbones import MobileNetV3C4, ResNet18C4

    assert rf_geometry(ResNet18C4.geometry) == (16, 0.0) and rf_size(ResNet18C4.geometry) == 211
    assert rf_geometry(MobileNetV3C4.geometry) == (16, 0.0) and rf_size(MobileNetV3C4.geometry) == 275
    for arch, channels in (("resnet18", 256), ("mobilenet_v3", 112)):
        net = build_backbone(arch).eval()
        assert net.stride == 16 and net.out_channels == channels and net.input_format == "rgb_imagenet"
        with torch.no_grad():
            for h, w in ((33, 47), (100, 171), (17, 250)):
                out = net(torch.zeros(1, 3, h, w))
                assert out.shape == (1, channels, conv5_size(arch, h), conv5_size(arch, w)), (arch, h, w)
        # the tail split used by fine-tuning composes to the whole trunk
        x = torch.rand(1, 3, 64, 80)
        with torch.no_grad():
            torch.testing.assert_close(net.forward_tail(net.forward_prefix(x, net.tail_units), net.tail_units), net(x))


def test_torchvision_adapters_stride_and_channels(tv_nets):
    v, r = tv_nets["vgg16"], tv_nets["resnet50"]
    with torch.no_grad():
        assert v(torch.zeros(1, 3, 64, 80)).shape == (1, 512, 4, 5)
        assert r(torch.zeros(1, 3, 64, 80)).shape == (1, 1024, 4, 5)
    assert v.input_format == r.input_format == "rgb_imagenet"
    assert v.stride == r.stride == 16
    assert conv5_size("vgg16", 64) == 4 and conv5_size("resnet50", 80) == 5


def test_build_backbone_local_file_roundtrip(tmp_path):
    net = build_backbone("zf5", 0.25)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(net.state_dict(), plain)
    torch.save({"backbone": net.state_dict(), "epoch": 3}, wrapped)
    for f in (plain, wrapped):
        other = build_backbone("zf5", 0.25, weights=str(f))
        for k, v in net.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), (f, k)


def test_build_backbone_errors_name_the_file(tmp_path):
    f = tmp_path / "zf_quarter.pt"
    torch.save(build_backbone("zf5", 0.25).state_dict(), f)
    with pytest.raises(WeightsError, match="zf_quarter.pt.*shape mismatch"):
        build_backbone("zf5", 0.5, weights=str(f))
    with pytest.raises(WeightsError, match="zf_quarter.pt.*missing"):
        build_backbone("resnet50", weights=str(f))
    with pytest.raises(WeightsError, match="not found.*nope.pt"):
        build_backbone("zf5", weights=str(tmp_path / "nope.pt"))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        build_backbone("zf5", weights=str(bad))
    with pytest.raises(WeightsError, match="sppnet classifier"):
        build_backbone("zf5", weights="imagenet")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="width_mult"):
        build_backbone("vgg16", width_mult=0.5)


def test_both_key_styles_load_and_a_foreign_file_lists_its_keys(tmp_path):
    """The project's conv1..conv5 names and torchvision's features.N names load the same trunk (by
    layer order and shape); a file that fits neither way lists the missing and unexpected keys."""
    net = build_backbone("zf5", 0.25)
    sd = net.state_dict()
    tv_style = {f"features.{3 * (i // 2)}.{'weight' if i % 2 == 0 else 'bias'}": v for i, v in enumerate(sd.values())}
    assert list(tv_style)[:3] == ["features.0.weight", "features.0.bias", "features.3.weight"]
    f = tmp_path / "tv_style.pt"
    torch.save(tv_style, f)
    other = build_backbone("zf5", 0.25, weights=str(f))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    half = dict(list(tv_style.items())[:4])
    torch.save(half, f)
    with pytest.raises(WeightsError, match=r"tv_style.pt: 10 parameter\(s\) of ZF5 are missing from the file: "
                                           r"conv1.weight, conv1.bias.*unexpected key\(s\) in the file: features.0.weight"):
        build_backbone("zf5", 0.25, weights=str(f))


def test_input_format_travels_with_the_weights(tmp_path):
    net = build_backbone("zf5", 0.25)
    assert net.input_format == "bgr255_mean128"  # the arch's own (spec §2)
    f = tmp_path / "rgb_trained.pt"
    torch.save({"backbone": net.state_dict(), "input_format": "rgb_imagenet"}, f)
    assert build_backbone("zf5", 0.25, weights=str(f)).input_format == "rgb_imagenet"  # auto: declared
    assert build_backbone("zf5", 0.25, weights=str(f), input_format="rgb_imagenet").input_format == "rgb_imagenet"
    with pytest.raises(WeightsError, match="rgb_trained.pt: the weights were trained on input_format 'rgb_imagenet', "
                                           "but backbone.input_format asks for 'bgr255_mean128'"):
        build_backbone("zf5", 0.25, weights=str(f), input_format="bgr255_mean128")
    assert build_backbone("zf5", 0.25, input_format="rgb_imagenet").input_format == "rgb_imagenet"  # no file
    torch.save({"backbone": net.state_dict(), "input_format": "bgr"}, f)
    with pytest.raises(WeightsError, match="declares input_format 'bgr'"):
        build_backbone("zf5", 0.25, weights=str(f))


def test_imagenet_weights_offline_error_and_cache(tmp_path, monkeypatch, tv_nets):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"offline.*resnet50-0676ba61.pth.*backbone.weights"):
        build_backbone("resnet50", weights="imagenet")
    # a file in the torch.hub cache is used without a download (extra layer4/fc keys ignored)
    src = tv_nets["resnet50"]
    sd = dict(src.state_dict())
    sd["fc.weight"] = torch.zeros(3, 3)
    cached = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    torch.save(sd, cached)
    got = build_backbone("resnet50", weights="imagenet")
    assert torch.equal(got.conv1.weight, src.conv1.weight)


def test_imagenet_weights_through_torchvision_cache(tmp_path, monkeypatch):
    """weights="imagenet" offline, through torchvision's own loading code: a random state dict of the
    right shapes put where torchvision's weight cache looks ($TORCH_HOME/hub/checkpoints/<file name of
    the weights URL>) is what torchvision's ``get_state_dict`` returns and what ``build_backbone``
    loads (configs/custom.yaml's ImageNet block); without the file, the offline message says where
    to put it."""
    import os
    import urllib.error

    import torchvision

    def offline(url, *a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # under torchvision's weights API
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    with pytest.raises(WeightsError, match=rf"offline.*copy it to {re.escape(str(cached))}"):
        build_backbone("resnet50", weights="imagenet")
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v
          for k, v in torchvision.models.resnet50().state_dict().items()}  # the full net's keys, fc and layer4 too
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, cached)
    via_torchvision = weights.get_state_dict(progress=False)  # torchvision finds it offline
    assert via_torchvision.keys() == sd.keys() and torch.equal(via_torchvision["conv1.weight"], sd["conv1.weight"])
    net = build_backbone("resnet50", weights="imagenet")
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_cpu_width_resnet18_is_torchvisions_network_narrowed():
    """resnet18 at width_mult 0.25: torchvision's layers with a quarter of the channels (the same
    parameter names, kernels, strides and paddings, so the same projection constants), torchvision's
    initialisation, and the prefix/tail split of fine-tuning."""
    full, narrow = build_backbone("resnet18"), build_backbone("resnet18", width_mult=0.25)
    assert narrow.out_channels == 64 and narrow.width_mult == 0.25 and full.out_channels == 256
    assert narrow.geometry == full.geometry and narrow.proj_offset0 == full.proj_offset0 == 0.0
    fs, ns = full.state_dict(), narrow.state_dict()
    assert list(fs) == list(ns)  # torchvision's names, in its order
    for k, v in fs.items():
        if v.ndim == 4:  # convolutions: a quarter of the channels, the same kernels
            assert ns[k].shape == (v.shape[0] // 4, v.shape[1] // 4 if v.shape[1] > 3 else 3, *v.shape[2:]), k
    for (name, m), (_, n) in zip(full.named_modules(), narrow.named_modules()):
        if isinstance(m, nn.Conv2d):
            assert (m.kernel_size, m.stride, m.padding) == (n.kernel_size, n.stride, n.padding), name
            std = (2.0 / (n.out_channels * n.kernel_size[0] * n.kernel_size[1])) ** 0.5  # He, fan-out
            assert abs(n.weight.std().item() - std) < 0.25 * std, name
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(n.weight == 1) and torch.all(n.bias == 0), name
    narrow.eval()
    with torch.no_grad():
        for h, w in ((33, 47), (100, 171)):
            assert narrow(torch.zeros(1, 3, h, w)).shape == (1, 64, conv5_size("resnet18", h), conv5_size("resnet18", w))
        x = torch.rand(1, 3, 64, 80)
        torch.testing.assert_close(narrow.forward_tail(narrow.forward_prefix(x, 1), 1), narrow(x))
    with pytest.raises(ValueError, match="width_mult must be 1.0"):
        build_backbone("mobilenet_v3", width_mult=0.5)
    with pytest.raises(ValueError, match="ImageNet weights are for width_mult 1.0"):
        build_backbone("resnet18", width_mult=0.25, weights="imagenet")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lrn_overwrite_input_gives_the_fresh_paths_values(dtype):
    from detector.backbones import WithinChannelLRN

    lrn = WithinChannelLRN(3, 5e-5, 0.75)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in ((2, 8, 37, 41), (1, 8, 20, 25)):  # the second reuses the first's larger buffers
            x = (torch.relu(torch.randn(shape, generator=g)) * 60).to(dtype).contiguous(memory_format=torch.channels_last)
            want = lrn(x.clone())
            inp = x.clone()
            got = lrn(inp, overwrite_input=True)
            assert got.data_ptr() == inp.data_ptr() and got.dtype == dtype and torch.equal(got, want)
            # and the values are the spec's formula (float64 reference)
            ref = x.double() * (1 + 5e-5 * torch.nn.functional.avg_pool2d(x.double() ** 2, 3, 1, 1)) ** -0.75
            assert torch.allclose(got.double(), ref, rtol=1e-5 if dtype == torch.float32 else 2e-2)
        # a map in the default layout, or one that needs gradients, is left alone
        y = x.float().contiguous()
        out = lrn(y, overwrite_input=True)
        assert out.data_ptr() != y.data_ptr() and torch.equal(y, x.float())
    leaf = x.float().clone().requires_grad_()
    out = lrn(leaf, overwrite_input=True)
    assert out.requires_grad and torch.equal(leaf.detach(), x.float())


def test_bfloat16_pow_chain_has_pows_bits_for_every_bfloat16_value(monkeypatch):
    import detector.backbones as B

    # every bit pattern: the chain rsqrt(y) * sqrt(rsqrt(y)) in float32, rounded, against pow_(-0.75)
    y = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # (65536,)
    want = y.clone().pow_(-0.75)
    monkeypatch.setattr(B, "_POW_CHUNK", 1000)  # several chunks and a short last one
    got = B._pow_neg_three_quarters_bf16_(y.clone())
    same = (got.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(got) & torch.isnan(want))
    # all but -0.0 and -inf (NaN from the chain, +inf and 0 from pow), which 1 + alpha * mean (alpha >= 0) never is
    assert sorted(y[~same].tolist()) == [-math.inf, -0.0]
    # in a channels-last map (a strided view of the storage), and in the LRN's inference path
    x = (torch.relu(torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(0))) * 300).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(B._pow_neg_three_quarters_bf16_(x.clone()), x.clone().pow_(-0.75))
    lrn = B.WithinChannelLRN(3, 5e-5, 0.75)
    with torch.no_grad():
        fast = lrn(x.clone(), overwrite_input=True)
        monkeypatch.setattr(B, "_pow_neg_three_quarters_bf16_", lambda t: t.pow_(-0.75))
        assert torch.equal(fast, lrn(x.clone(), overwrite_input=True))
