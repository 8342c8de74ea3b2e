"""End to end: a tiny train + test run through the real tools, checkpoint safety, library call."""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detector.checkpoint import CheckpointError
from detector.detector import SPPDetector

REPO = Path(__file__).resolve().parents[1]

def test_train_and_test_end_to_end(tiny_run):
    root, cfg, train, test = tiny_run
    run = root / "run"
    assert (run / "model.pt").is_file() and (run / "resolved_config.yaml").is_file()
    last = test.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"mAP: (\d\.\d{6}|nan)", last)
    assert m, test.stdout[-2000:]
    out = run / "test_test"
    assert (out / "pr_curves.png").stat().st_size > 0
    assert len(list((out / "results").glob("comp4_det_test_*.txt"))) == 10
    for stage in ("conv", "pool", "fc", "svm", "bbox", "nms", "proposals"):
        assert re.search(rf"^{stage}\s+\d", test.stdout, re.M), stage


def test_held_out_validation_scoring(tiny_run):
    """test_net.py --held-out scores exactly the trainval images held out from fine-tuning (2 of 12
    at val_fraction 0.2), with the training run's cached proposals (nothing recomputed), and its
    mAP equals evaluate() of the library detector on those images and proposals."""
    from detector.config import load_config
    from detector.data.voc import load_voc_split
    from detector.engine import build_detector
    from detector.engine.data import split_train_val
    from detector.eval import evaluate
    from proposals import load_proposals

    root, cfg_path, _, _ = tiny_run
    run = root / "run"
    before = sorted((run / "proposals").iterdir())
    r = subprocess.run([sys.executable, str(REPO / "tools/test_net.py"), "--config", str(cfg_path),
                        "--held-out", "--time-proposals", "0"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "computing" not in r.stderr and sorted((run / "proposals").iterdir()) == before
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    recs, names = load_voc_split(root / "digits", "trainval", digits, raw_boxes=True)
    _, held = split_train_val(recs, 0.2, 0)
    assert len(held) == 2
    report = json.loads((run / "test_heldout" / "eval.json").read_text())
    assert report["images"] == 2
    assert sum(c["n_gt"] + c["n_difficult"] for c in report["classes"]) == sum(len(h.labels) for h in held)

    cfg = load_config(cfg_path)
    det = build_detector(cfg, run / "model.pt")
    cache = [f for f in before if f.name.startswith("trainval-")]
    assert len(cache) == 1
    props = load_proposals(cache[0], [h.image_id for h in held], allow_extra=True)
    dets = {h.image_id: det.detect(str(h.path), proposals=props[h.image_id]) for h in held}
    ref = evaluate(held, names, dets).mAP
    got = float(r.stdout.strip().splitlines()[-1].split()[1])
    assert (np.isnan(ref) and np.isnan(got)) or abs(got - ref) < 1e-6, (got, ref)

    # elsewhere (no training proposal cache there): only the 2 held-out images get proposals
    other = root / "elsewhere"
    r2 = subprocess.run([sys.executable, str(REPO / "tools/test_net.py"), "--config", str(cfg_path),
                         "--held-out", "--time-proposals", "0", "--checkpoint", str(run / "model.pt"),
                         "--set", f"output_dir={other}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "computing selective_search proposals for 2 trainval-heldout images" in r2.stderr
    assert [f.name.split("-")[:2] for f in (other / "proposals").glob("*.npz")] == [["trainval", "heldout"]]
    assert abs(float(r2.stdout.strip().splitlines()[-1].split()[1]) - got) < 1e-6 or np.isnan(got)

    bad = subprocess.run([sys.executable, str(REPO / "tools/test_net.py"), "--config", str(cfg_path),
                          "--held-out", "--split", "test"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "--held-out" in bad.stderr and "Traceback" not in bad.stderr


def test_second_run_reuses_every_stage(tiny_run):
    root, cfg, _, _ = tiny_run
    again = subprocess.run([sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "computing" not in again.stderr and "fine-tune fc6/fc7" not in again.stderr


def test_library_call_and_checkpoint_round_trip(tiny_run, tmp_path):
    root, _, _, _ = tiny_run
    det = SPPDetector.load(root / "run" / "model.pt")
    img = sorted((root / "digits" / "JPEGImages").glob("*.jpg"))[0]
    out = det.detect(str(img))
    assert set(out) == {"boxes", "scores", "labels"}
    assert out["boxes"].dtype == torch.float32 and out["boxes"].shape[1] == 4
    assert out["labels"].dtype == torch.int64 and out["scores"].dtype == torch.float32
    assert len(out["boxes"]) == len(out["scores"]) == len(out["labels"])
    # the same detections after a save/load round trip (a model that runs int8 fc layers, the CPU
    # default, refuses to save them: the float32 load saves)
    assert det.fc_precision == "int8"
    with pytest.raises(ValueError, match="save the float32 model"):
        det.save(tmp_path / "copy.pt")
    SPPDetector.load(root / "run" / "model.pt", fc_precision="float32").save(tmp_path / "copy.pt")
    assert torch.load(tmp_path / "copy.pt", weights_only=True)["params"]["fc_precision"] == "float32"
    again = SPPDetector.load(tmp_path / "copy.pt", fc_precision="auto").detect(str(img))
    torch.testing.assert_close(again["scores"], out["scores"])
    # RGBA and grayscale arrays are accepted
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(img).convert("RGB"))
    gray = arr.mean(axis=2).astype(np.uint8)
    assert det.detect(gray)["boxes"].shape[1] == 4
    rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=2)
    torch.testing.assert_close(det.detect(rgba)["scores"], out["scores"])
    # explicit proposals, none at all
    props = torch.tensor([[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 100.0, 80.0]])
    assert det.detect(arr, proposals=props)["boxes"].shape[0] <= 2 * det.num_classes
    assert det.detect(arr, proposals=torch.zeros((0, 4)))["boxes"].shape == (0, 4)


def test_readme_library_example_runs_as_written(tiny_run, tmp_path):
    """The README's python block, unchanged, against the tiny model placed where the README expects
    the demo model and image (run from a directory laid out like the repository after make demo)."""
    import ast
    import os
    import shutil

    root, _, _, _ = tiny_run
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^```python\n(.*?)^```", readme, re.M | re.S)
    assert block, "README.md has no ```python block"
    code = block.group(1)
    paths = re.findall(r'"((?:runs|data)/[^"]+)"', code)
    assert any(p.endswith("model.pt") for p in paths), paths
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        src = (root / "run" / "model.pt" if rel.endswith(".pt")
               else sorted((root / "digits" / "JPEGImages").glob("*.jpg"))[0])
        shutil.copy(src, tmp_path / rel)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.strip().splitlines()
    timings = ast.literal_eval(lines[-1])
    assert set(timings) == {"proposals", "conv", "pool", "fc", "svm", "bbox", "nms"}
    classes = SPPDetector.load(root / "run" / "model.pt").class_names
    thr = float(re.search(r"score_threshold=(-?[\d.]+)", code).group(1))
    for line in lines[:-1]:
        name, score, box = line.split(" ", 2)
        assert name in classes and float(score) >= thr, line
        x1, y1, x2, y2 = ast.literal_eval(box)
        assert x1 <= x2 and y1 <= y2, line


def test_checkpoint_carries_its_svd_rank(tmp_path):
    """A model saved with svd_rank loads compressed by default (as test_net runs it), dense on request;
    a compressed model refuses to be saved (its checkpoint would not load back)."""
    from detector.head import LowRankLinear
    from detector.bench.random_model import random_boxes, random_detector

    det = random_detector(width_mult=0.125, fc_dim=32, num_classes=3, scales=(96,))
    det.params = dataclasses.replace(det.params, svd_rank=8)
    det.save(tmp_path / "m.pt")
    low = SPPDetector.load(tmp_path / "m.pt")
    assert isinstance(low.head.fc6, LowRankLinear) and low.head.fc6.down.out_features == 8
    assert low.svd_rank == 8
    dense = SPPDetector.load(tmp_path / "m.pt", svd_rank=0)
    assert isinstance(dense.head.fc6, torch.nn.Linear) and dense.svd_rank == 0
    img = np.full((80, 100, 3), 120, np.uint8)
    props = random_boxes(80, 100, 30, torch.Generator().manual_seed(0))
    assert low.detect(img, proposals=props)["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="SVD-compressed"):
        low.save(tmp_path / "again.pt")


def test_svm_plus_softmax_scores_and_checkpoint(tmp_path):
    """score 'svm+softmax' adds the fine-tuned classifier's log-probability to the SVM margin
    (checked against the two terms computed by hand from the weights), survives the checkpoint, and
    is refused for a head without cls_score."""
    from detector.bench.random_model import random_detector
    from detector.head import FCHead

    det = random_detector(width_mult=0.125, fc_dim=32, num_classes=3, scales=(96,))
    det.svms.feature_scale = 2.5
    head = FCHead(det.head.in_dim, fc_dim=32, num_classes=3, dropout=0.5).eval()
    head.load_state_dict(det.head.state_dict(), strict=False)  # fc6/fc7 as before, a random cls_score
    det.head = head
    pooled = torch.rand(7, det.head.in_dim)  # (R, D)
    with torch.inference_mode():
        f = det.fc_features(pooled)  # (R, F)
        svm = det.svm_scores(f)
        ref_svm = (det.head.fc7(torch.relu(det.head.fc6(pooled))).relu() * 2.5) @ det.svms.weight + det.svms.bias
        torch.testing.assert_close(svm, ref_svm)
        det.params = dataclasses.replace(det.params, score="svm+softmax")
        both = det.svm_scores(f)
        logits = f @ head.cls_score.weight.T + head.cls_score.bias  # (R, K + 1), background last
        ref_logp = logits - torch.logsumexp(logits, 1, keepdim=True)
        torch.testing.assert_close(both, ref_svm + ref_logp[:, :3])
    det.save(tmp_path / "m.pt")
    back = SPPDetector.load(tmp_path / "m.pt")
    assert back.params.score == "svm+softmax" and back.head.cls_score is not None
    with torch.inference_mode():
        torch.testing.assert_close(back.svm_scores(back.fc_features(pooled)), both)
    plain = random_detector(width_mult=0.125, fc_dim=32, num_classes=3, scales=(96,))
    with pytest.raises(ValueError, match="cls_score"):
        plain.params = dataclasses.replace(plain.params, score="svm+softmax")  # its head has no cls_score
    assert plain.params.score == "svm"
    with pytest.raises(ValueError, match="score must be one of"):
        dataclasses.replace(plain.params, score="softmax")


def test_test_time_target_side(tmp_path):
    """target_side (the per-window scale choice's aim) can be set at test time: the detector then
    pools each window at the scale select_scales picks for that aim (hand-computed: a 40x40 box in a
    100x100 image, scales 96/192: aim 40 -> s* = 100 -> 96; aim 200 -> s* = 500 -> 192), it equals
    a detector built with that value, survives the checkpoint, is applied by build_detector from
    test.target_side (0 keeps the checkpoint's) and is refused when not positive."""
    from detector.bench.random_model import random_detector
    from detector.config import Config, TestConfig
    from detector.engine import build_detector
    from detector.projection import select_scales

    box = torch.tensor([[30.0, 30.0, 70.0, 70.0]])  # 40 x 40
    assert select_scales(box, (100, 100), [96, 192], target_side=40).tolist() == [0]
    assert select_scales(box, (100, 100), [96, 192], target_side=200).tolist() == [1]

    img = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    det = random_detector(width_mult=0.125, fc_dim=32, num_classes=3, scales=(96, 192))
    det.params = dataclasses.replace(det.params, score_thresh=-1e9, nms=1.0)  # keep the one window's scores
    det.bbox = None
    outs = {}
    for t in (40.0, 200.0):
        det.params = dataclasses.replace(det.params, target_side=t)
        assert det.params.target_side == t and det.proj.target_side == t
        outs[t] = det.detect(img, proposals=box)
        ref = SPPDetector(backbone=det.backbone, head=det.head, svms=det.svms, bbox=None,
                          class_names=det.class_names, levels=det.levels, arch="zf5",
                          params=dataclasses.replace(det.params, target_side=t))
        r = ref.detect(img, proposals=box)
        torch.testing.assert_close(outs[t]["scores"], r["scores"])
    assert not torch.allclose(outs[40.0]["scores"], outs[200.0]["scores"])  # another scale's conv5

    det.params = dataclasses.replace(det.params, target_side=40.0)
    det.save(tmp_path / "m.pt")
    assert SPPDetector.load(tmp_path / "m.pt").params.target_side == 40.0
    cfg = Config()
    cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, test_scales=(96, 192)))
    assert build_detector(cfg, tmp_path / "m.pt").params.target_side == 40.0  # 0: the checkpoint's value
    cfg = dataclasses.replace(cfg, test=TestConfig(target_side=200.0))
    assert build_detector(cfg, tmp_path / "m.pt").params.target_side == 200.0
    with pytest.raises(CheckpointError, match=r"m\.pt: test settings: target_side"):
        build_detector(dataclasses.replace(cfg, test=TestConfig(target_side=-5.0)), tmp_path / "m.pt")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="target_side must be a positive"):
            det.params = dataclasses.replace(det.params, target_side=bad)
    assert det.params.target_side == 40.0


class _Evil:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "sppnet-detector-v1", "payload": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.pt"):
        SPPDetector.load(bad)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError, match="plain.pkl"):
        SPPDetector.load(tmp_path / "plain.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        SPPDetector.load(tmp_path / "missing.pt")


def test_bad_images_are_named(tiny_run, tmp_path):
    from proposals.imageio import ImageError

    root, _, _, _ = tiny_run
    det = SPPDetector.load(root / "run" / "model.pt")
    with pytest.raises(ImageError, match="20x20"):
        det.detect(np.zeros((20, 20, 3), np.uint8))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        det.detect(str(bad))
    img16 = (np.random.default_rng(0).random((64, 80)) * 65535).astype(np.uint16)
    assert det.detect(img16)["boxes"].shape[1] == 4  # 16-bit grayscale is converted


def test_repeated_set_flags_all_apply(tiny_run, tmp_path):
    root, cfg, _, _ = tiny_run
    out = tmp_path / "run2"
    r = subprocess.run([sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg),
                        "--set", f"output_dir={out}", "--set", "finetune.iters=7", "svm.C=0.5",
                        "--stop-after", "proposals"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["finetune"]["iters"] == 7 and resolved["svm"]["C"] == 0.5


def test_bad_test_settings_stop_training_before_it_starts(tiny_run, tmp_path):
    """test.score and test.target_side are checked before any stage runs (not after training)."""
    _, cfg, _, _ = tiny_run
    for i, (flag, msg) in enumerate([("test.score=softmax", "test.score must be one of"),
                                     ("test.target_side=-3", "test.target_side must be >= 0")]):
        out = tmp_path / f"bad{i}"
        r = subprocess.run([sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg),
                            "--set", f"output_dir={out}", flag], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
        assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not out.exists()


def test_conv_fine_tuning_stage_runs_and_lands_in_the_checkpoint(tiny_run, tmp_path):
    """finetune.conv_layers=2: the cache holds conv3 maps, conv4/conv5 are tuned with the fc layers
    and model.pt carries them (conv1-conv3 stay the pre-trained ones); a rerun reuses every stage."""
    import shutil

    root, cfg, _, _ = tiny_run
    out = tmp_path / "conv_ft"
    shutil.copytree(root / "run", out, ignore=shutil.ignore_patterns("conv5_cache", "finetune", "svm", "bbox",
                                                                        "model.pt"))
    cmd = [sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg), "--set",
           f"output_dir={out}", "finetune.conv_layers=2", "finetune.images_per_batch=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fine-tuning the last 2 conv unit(s)" in r.stderr
    det = SPPDetector.load(out / "model.pt")
    pre = torch.load(out / "pretrain" / "classifier.pt", weights_only=True)["backbone"]
    got = det.backbone.state_dict()
    for name in ("conv1.weight", "conv2.weight", "conv3.weight"):
        torch.testing.assert_close(got[name], pre[name], rtol=0, atol=0)
    for name in ("conv4.weight", "conv5.weight"):
        assert not torch.equal(got[name], pre[name]), name
    cached = next((out / "conv5_cache").glob("*.pt"))
    assert torch.load(cached, weights_only=True)["fmaps"][0].shape[0] == det.backbone.conv3.out_channels
    img = sorted((root / "digits" / "JPEGImages").glob("*.jpg"))[0]
    assert det.detect(str(img))["boxes"].shape[1] == 4
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "fine-tune conv tail" not in again.stderr and " 0 built" in again.stderr
    bad = subprocess.run(cmd[:-2] + ["finetune.conv_layers=4"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode != 0 and "finetune.conv_layers must be in 0..3" in bad.stderr
