"""BatchNorm statistics re-estimated on whole images: the average over passes of each pass's
per-channel mean and unbiased variance, against a reference loop with hooks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector.backbones import build_backbone
from detector.bn_stats import batchnorm_layers, recalibrate_batchnorm
from detector.pyramid import preprocess, resized_size

SCALES = (40, 64)


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), rng.integers(0, 256, (48, 36, 3), dtype=np.uint8)]


def _reference(net, images, scales):
    """Per layer: (mean over passes of the input's channel mean, mean of its unbiased channel var)."""
    net = copy.deepcopy(net).train()
    seen: dict[int, list] = {}

    def hook(i):
        def f(_m, inp, _out):
            x = inp[0].double()
            seen.setdefault(i, []).append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)))
        return f

    for i, m in enumerate(batchnorm_layers(net)):
        m.register_forward_hook(hook(i))
    with torch.no_grad():
        for im in images:  # pass by pass, resized here as the cache resizes (shorter side = scale)
            x = preprocess(im, net.input_format).unsqueeze(0)
            for s in scales:
                h, w = resized_size(x.shape[2], x.shape[3], s)
                net(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    return [(torch.stack([a for a, _ in seen[i]]).mean(0), torch.stack([b for _, b in seen[i]]).mean(0))
            for i in sorted(seen)]


def test_running_statistics_are_the_average_over_passes():
    net = build_backbone("zf5_bn", width_mult=0.125).eval()
    params = {k: v.clone() for k, v in net.named_parameters()}
    ref = _reference(net, _images(), SCALES)
    assert recalibrate_batchnorm(net, _images(), SCALES) == 4
    layers = batchnorm_layers(net)
    assert len(layers) == 5 and not net.training
    for m, (mean, var) in zip(layers, ref):
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-4, atol=1e-5)
        assert m.momentum == 0.1 and int(m.num_batches_tracked) == 4
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())  # weights untouched


def test_a_second_recalibration_gives_the_same_statistics():
    """Nothing of the old statistics survives: the result depends only on the images."""
    a = build_backbone("zf5_bn", width_mult=0.125).eval()
    b = copy.deepcopy(a)
    for m in batchnorm_layers(b):
        m.running_mean.fill_(3.0)
        m.running_var.fill_(7.0)
    recalibrate_batchnorm(a, _images(), SCALES)
    recalibrate_batchnorm(b, _images(), SCALES)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_no_batchnorm_or_no_images_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(build_backbone("zf5", width_mult=0.125), _images(), SCALES)
    net = build_backbone("zf5_bn", width_mult=0.125).eval()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(net, iter([]), SCALES)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_bn_archs_are_the_trunks_with_batchnorm():
    """config.BN_ARCHS repeats a fact of the trunks (config.py loads without torch)."""
    import typing

    from detector.config import BN_ARCHS, WIDTH_ARCHS, BackboneConfig

    for arch in typing.get_args(typing.get_type_hints(BackboneConfig)["arch"]):
        net = build_backbone(arch, width_mult=0.125 if arch in WIDTH_ARCHS else 1.0)
        assert bool(batchnorm_layers(net)) == (arch in BN_ARCHS), arch


def test_stage_bnstats_feeds_the_cache_and_is_reused(tiny_run, tmp_path):
    """pretrain.bn_images=3: trunk_bn.pt holds the classifier with its BatchNorm statistics
    re-estimated on the first 3 fine-tuning images at the training scales; the conv5 cache is made
    with it; a second run loads the stage; a trunk without BatchNorm is refused before any work."""
    import subprocess
    import sys

    from conftest import REPO
    from detector.cache import Conv5Cache
    from detector.config import ConfigError, load_config
    from detector.engine.data import training_data
    from detector.pyramid import image_pyramid
    from proposals.imageio import read_image

    root, cfg_path, _, _ = tiny_run
    out = tmp_path / "bn"
    sets = [f"output_dir={out}", "backbone.arch=zf5_bn", "pretrain.bn_images=3"]
    cmd = [sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg_path), "--set", *sets,
           "--stop-after", "cache"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage bnstats: built" in r.stderr
    cfg = load_config(cfg_path, sets)
    recs = training_data(cfg).finetune[:3]
    images = [read_image(rec.path) for rec in recs]
    want = build_backbone("zf5_bn", width_mult=0.125, weights=str(out / "pretrain" / "classifier.pt")).eval()
    recalibrate_batchnorm(want, images, cfg.features.train_scales)
    clf = torch.load(out / "pretrain" / "classifier.pt", weights_only=True)
    got = torch.load(out / "pretrain" / "trunk_bn.pt", weights_only=True)
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got["backbone"][k], v, rtol=1e-4, atol=1e-5)  # 2 threads there, 1 here
    assert not torch.equal(got["backbone"]["bn5.running_var"], clf["backbone"]["bn5.running_var"])
    assert all(torch.equal(got["fc"][k], v) for k, v in clf["fc"].items())  # fc6/fc7 still initialise the head
    net = build_backbone("zf5_bn", width_mult=0.125, weights=str(out / "pretrain" / "trunk_bn.pt")).eval()
    cache = Conv5Cache(out / "conv5_cache", backbone=net, scales=cfg.features.train_scales)
    fmaps, _ = cache.get(recs[0].image_id)
    for f, ref in zip(fmaps, image_pyramid(net, images[0], cfg.features.train_scales)):
        torch.testing.assert_close(f.float(), ref[0].half().float(), rtol=2e-3, atol=2e-3)  # float16 entries
    again = subprocess.run(cmd[:-1] + ["bnstats"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "stage bnstats: loaded" in again.stderr
    with pytest.raises(ConfigError, match="pretrain.bn_images must be 0 for backbone.arch 'zf5'"):
        load_config(cfg_path, sets + ["backbone.arch=zf5"])
    with pytest.raises(ConfigError, match="pretrain.bn_images must be 0 unless pretrain.enabled"):
        load_config(cfg_path, sets + ["pretrain.enabled=false"])


def test_bn_images_does_not_touch_the_pretrained_classifier():
    """The statistics are re-estimated after pre-training: the classifier's key ignores bn_images, so
    turning it on reuses the pre-trained trunk."""
    from detector.config import Config, PretrainConfig
    from detector.engine.pretrain import classifier_key

    ids = {"train": ["a"], "heldout": ["b"]}
    off, on = Config(pretrain=PretrainConfig(enabled=True)), Config(pretrain=PretrainConfig(enabled=True, bn_images=50))
    assert classifier_key(off, ids) == classifier_key(on, ids)
    assert classifier_key(off, ids) != classifier_key(Config(pretrain=PretrainConfig(enabled=True, epochs=3)), ids)
