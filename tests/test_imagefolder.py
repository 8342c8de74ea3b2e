"""ImageNet-layout classifier training (root/train/<class>, root/val/<class>) and the paper's three
evaluation views, on a small image folder of digit pictures that the test writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.backbones import build_backbone
from detector.classifier import SPPClassifier
from detector.data.records import DataError
from detector.data.imagefolder import (CentreCrops, FolderSplit, RandomCrops, evaluate_views, is_imagenet_layout,
                                       read_rgb, resize_side)
from detector.pretrain import preprocess_crops

REPO = Path(__file__).resolve().parents[1]


def digit_folder(root: Path, classes=(0, 1, 2), n_train: int = 8, n_val: int = 3) -> Path:
    """root/train/<digit>/*.png and root/val/<digit>/*.png: sklearn's 8x8 digits enlarged to
    random sizes and aspects (40..64 px), grey on noise."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for c in classes:
        pics = d.images[d.target == c]
        for split, lo, n in (("train", 0, n_train), ("val", n_train, n_val)):
            (root / split / f"d{c}").mkdir(parents=True, exist_ok=True)
            for j in range(n):
                h, w = int(rng.integers(40, 65)), int(rng.integers(40, 65))
                g = cv2.resize((pics[lo + j] * 15).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
                img = np.clip(g[:, :, None] + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / split / f"d{c}" / f"{j:03d}.png"), img)
    return root


def test_folder_split_and_crops(tmp_path):
    root = digit_folder(tmp_path / "imgs")
    assert is_imagenet_layout(root) and not is_imagenet_layout(root / "train")
    train = FolderSplit(root / "train")
    assert train.classes == ("d0", "d1", "d2") and len(train) == 24 and train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    crops = RandomCrops(train, 32, seed=5, workers=2)
    a = crops[torch.tensor([3, 10])]
    assert a.shape == (2, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, crops[[3, 10]])  # the same epoch draws the same crops
    crops.set_epoch(1)
    assert not torch.equal(a, crops[[3, 10]])  # another epoch, other crops
    img = read_rgb(train.paths[3])
    L = resize_side(32)
    assert L == 37
    centre = CentreCrops(train, 32)[3].numpy()
    r = cv2.resize(img, None, fx=L / min(img.shape[:2]), fy=L / min(img.shape[:2]))  # shorter side ~ L
    assert centre.shape == (32, 32, 3) and r.shape[0] >= 32
    with pytest.raises(DataError, match="not the classes asked for"):
        FolderSplit(root / "val", ("d0", "d1"))


def test_views_equal_a_per_image_reference(tmp_path):
    root = digit_folder(tmp_path / "imgs", n_train=1, n_val=2)
    val = FolderSplit(root / "val")
    torch.manual_seed(0)
    model = SPPClassifier(build_backbone("zf5", 0.125), 3, fc_dim=16, levels=(1, 2), dropout=0.0).eval()
    got = evaluate_views(model, val, 32, batch_size=4, workers=2)
    fmt, L = model.input_format, resize_side(32)
    p1, p10, pf = [], [], []
    for path in val.paths:  # the reference: one image, one view at a time
        img = read_rgb(path)
        s = L / min(img.shape[:2])
        img = cv2.resize(img, (max(L, round(img.shape[1] * s)), max(L, round(img.shape[0] * s))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        h, w = img.shape[:2]
        tops = [(0, 0), (0, w - 32), (h - 32, 0), (h - 32, w - 32), ((h - 32) // 2, (w - 32) // 2)]
        views = [img[y:y + 32, x:x + 32] for y, x in tops]
        prob = [model(preprocess_crops([v], fmt))[:, :3].softmax(1) for v in views]
        prob += [model(preprocess_crops([v], fmt).flip(-1))[:, :3].softmax(1) for v in views]
        p1.append(prob[4])
        p10.append(torch.cat(prob).mean(0, keepdim=True))
        pf.append(model(preprocess_crops([img], fmt))[:, :3].softmax(1))
    for name, p in (("1 view", p1), ("10 views", p10), ("full image", pf)):
        pred = torch.cat(p).argmax(1)
        assert got[name]["top1"] == pytest.approx(float((pred != val.labels).float().mean())), name
        assert got[name]["top5"] == 0.0  # 3 classes: the top 5 hold every class
    assert got["n"] == 6


def test_classifier_command_on_an_image_folder(tmp_path):
    """`sppnet classifier` on an ImageNet-layout folder prints the three views' top-1/top-5 and saves a
    weights file that backbone.weights takes, fc layers and input format included."""
    from detector.engine.train import weights_fc_layers

    root = digit_folder(tmp_path / "imgs")
    out = tmp_path / "cls"
    r = subprocess.run([sys.executable, str(REPO / "tools/train_classifier.py"), "--config", "digits_zf5", "--set",
                        f"data.root={root}", "data.classes=[]", "backbone.width_mult=0.125", "pretrain.sizes=[40,48]",
                        "pretrain.epochs=2", "pretrain.batch_size=8", "pretrain.fc_dim=32", "pretrain.workers=2",
                        "pretrain.levels=[1,2]", f"output_dir={tmp_path / 'run'}", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| training | 1 view | 10 views | full image |" in r.stdout and "| multi |" in r.stdout
    st = torch.load(out / "classifier.pt", weights_only=True)
    assert st["class_names"] == ["d0", "d1", "d2"] and st["input_format"] == "bgr255_mean128"
    assert set(st["meta"]["metrics"]["views"]) == {"1 view", "10 views", "full image", "n"}
    net = build_backbone("zf5", 0.125, weights=str(out / "classifier.pt"))
    assert torch.equal(net.state_dict()["conv1.weight"], st["backbone"]["conv1.weight"])
    assert sorted(k.split(".")[0] for k in weights_fc_layers(str(out / "classifier.pt"))) == \
        ["cls_score", "cls_score", "fc6", "fc6", "fc7", "fc7"]


def test_classifier_on_an_image_folder_under_torchrun(tmp_path):
    """Two processes (gloo on 127.0.0.1): DistributedDataParallel over the folder's crops; rank 0
    writes the classifier and prints the table, rank 1 logs to its own file."""
    import os
    import socket

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo on the loopback address is tested on Linux")
    root = digit_folder(tmp_path / "imgs", n_train=4, n_val=2)
    out = tmp_path / "cls"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                        "--master-addr=127.0.0.1", f"--master-port={port}", str(REPO / "tools/train_classifier.py"),
                        "--config", "digits_zf5", "--set", f"data.root={root}", "data.classes=[]",
                        "backbone.width_mult=0.125", "pretrain.sizes=[40,48]", "pretrain.epochs=1",
                        "pretrain.batch_size=4", "pretrain.fc_dim=32", "pretrain.workers=1", "pretrain.levels=[1,2]",
                        "num_threads=1", f"output_dir={tmp_path / 'run'}", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("| training | 1 view | 10 views | full image |") == 1  # printed by rank 0 only
    assert (out / "classifier.pt").is_file() and (out / "logs" / "rank1.txt").is_file()
    assert "INFO rank 1 detector.pretrain" in (out / "logs" / "rank1.txt").read_text()
