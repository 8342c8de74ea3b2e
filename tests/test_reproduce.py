"""The VOC 2007 runbook end to end on a tiny VOC2007-shaped fixture: VOCdevkit/VOC2007 with the 20
classes, difficult flags and a few drawn images, from random trunk weights in either key style."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.backbones import build_backbone
from detector.engine.reproduce import PAPER_TABLE6, reproduce_voc07

REPO = Path(__file__).resolve().parents[1]
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
# every setting that makes the paper's config small enough for seconds on a CPU
TINY = ["num_threads=2", "proposals.max_boxes=150", "proposals.workers=1", "backbone.width_mult=0.125",
        "features.train_scales=[160]", "features.target_side=64", "head.fc_dim=32", "finetune.iters=12",
        "finetune.lr_steps=[8]", "finetune.val_every=6", "finetune.val_batches=1", "finetune.batch_size=16",
        "finetune.chunk_iters=6", "finetune.chunk_images=4", "svm.stats_images=5", "svm.stats_rois=20",
        "svm.retrain_every=200", "data.use_flipped=false"]


def voc2007_fixture(root: Path, n_trainval: int = 6, n_test: int = 3, seed: int = 0) -> Path:
    """VOCdevkit/VOC2007: 160x120 noise images with 4 coloured boxes each, the classes in turn,
    every fifth object difficult; ImageSets/Main trainval.txt and test.txt."""
    voc = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = 0
    splits: dict[str, list[str]] = {"trainval": [], "test": []}
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        for _ in range(n):
            iid = f"{len(splits['trainval']) + len(splits['test']):06d}"
            img = rng.integers(0, 60, (120, 160, 3), dtype=np.uint8)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = f"{iid}.jpg"
            size = ET.SubElement(ann, "size")
            for tag, v in (("width", 160), ("height", 120), ("depth", 3)):
                ET.SubElement(size, tag).text = str(v)
            for j in range(4):
                c = k % 20
                x1, y1 = 5 + 75 * (j % 2) + int(rng.integers(0, 10)), 5 + 55 * (j // 2) + int(rng.integers(0, 8))
                x2, y2 = x1 + 50 + int(rng.integers(0, 15)), y1 + 40 + int(rng.integers(0, 10))
                colour = tuple(int(v) for v in (40 + 10 * c, 255 - 10 * c, 120 + (c % 5) * 25))
                cv2.rectangle(img, (x1, y1), (min(x2, 159), min(y2, 119)), colour, thickness=-1)
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = VOC_CLASSES[c]
                ET.SubElement(obj, "difficult").text = "1" if k % 5 == 4 else "0"
                box = ET.SubElement(obj, "bndbox")
                for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", min(x2, 159) + 1), ("ymax", min(y2, 119) + 1)):
                    ET.SubElement(box, tag).text = str(v)
                k += 1
            cv2.imwrite(str(voc / "JPEGImages" / f"{iid}.jpg"), img[:, :, ::-1])
            ET.ElementTree(ann).write(voc / "Annotations" / f"{iid}.xml")
            splits[split].append(iid)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root / "VOCdevkit"


def _weights(path: Path, style: str) -> Path:
    sd = build_backbone("zf5", 0.125).state_dict()  # spec §1 random init
    if style == "features":  # torchvision-style names, in layer order
        sd = {f"features.{3 * (i // 2)}.{'weight' if i % 2 == 0 else 'bias'}": v for i, v in enumerate(sd.values())}
    torch.save(sd, path)
    return path


def test_runbook_end_to_end_on_a_voc2007_shaped_fixture(tmp_path):
    """From random weights in torchvision's key style (features.N; tests/test_backbones.py loads both
    key styles into the same trunk)."""
    devkit = voc2007_fixture(tmp_path)
    out = tmp_path / "run"
    table = reproduce_voc07(devkit, str(_weights(tmp_path / "features.pt", "features")),
                            overrides=[*TINY, f"output_dir={out}"], scales_1=[160], scales_5=[96, 128, 160],
                            compare_images=2)
    m = table.measured
    assert set(m) == set(PAPER_TABLE6) and table.images == 2
    for col in ("SPP 1-sc", "SPP 5-sc"):
        assert 0.0 <= m[col]["mAP"] <= 100.0
        assert m[col]["total"] == pytest.approx(m[col]["conv"] + m[col]["fc"], rel=1e-9)
        assert m[col]["speedup"] == pytest.approx(m["R-CNN"]["total"] / m[col]["total"], rel=1e-9)
    one = json.loads((out / "test_test" / "eval.json").read_text())
    five = json.loads((out / "5scale" / "test_test" / "eval.json").read_text())
    assert one["scales"] == [160] and five["scales"] == [96, 128, 160]
    assert m["SPP 1-sc"]["mAP"] == pytest.approx(100 * one["mAP"]) and m["SPP 5-sc"]["mAP"] == pytest.approx(100 * five["mAP"])
    text = (out / "table6.md").read_text()
    assert "| mAP (ftfc7 bb) |" in text and "| 58.0 |" in text and "| 59.2 |" in text  # the paper beside
    # the command prints the table; a rerun loads every stage instead of training again
    r = subprocess.run([sys.executable, str(REPO / "tools/reproduce_voc07.py"), "--devkit", str(devkit),
                        "--weights", str(tmp_path / "features.pt"), "--scales-1", "160",
                        "--scales-5", "96", "128", "160", "--compare-images", "2", "--set", *TINY, f"output_dir={out}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| mAP (ftfc7 bb) |" in r.stdout and "stage finetune: loaded" in r.stderr


def test_runbook_refuses_a_missing_devkit_and_weights(tmp_path):
    from detector.data.voc import VOCDataError

    with pytest.raises(VOCDataError, match="ImageSets/Main/trainval.txt"):
        reproduce_voc07(tmp_path, "w.pt")
    devkit = voc2007_fixture(tmp_path, n_trainval=1, n_test=1)
    with pytest.raises(FileNotFoundError, match="weights file not found: nope.pt"):
        reproduce_voc07(devkit, "nope.pt")
    with pytest.raises(FileNotFoundError, match="voc_2007_trainval.mat"):
        reproduce_voc07(devkit, str(_weights(tmp_path / "w.pt", "project")), rcnn_proposals=tmp_path)
