"""detector.predict and its command: images, folders and globs -> annotated PNGs and one table; the
demo picture; and the tools that call them, exit codes included."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.bench.inputs import voc_sized_photos
from detector.bench.random_model import random_detector
from detector.predict import demo_picture, find_images, match_detections, predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random model and a folder of three photos (two sizes), plus a text file that is not an image."""
    root = tmp_path_factory.mktemp("predict")
    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))
    det.save(root / "model.pt")
    imgs = root / "imgs"
    imgs.mkdir()
    for i, (_, im) in enumerate(voc_sized_photos(3, size=(96, 128))):
        Image.fromarray(im if i else np.ascontiguousarray(im[:80, :112])).save(imgs / f"p{i}.png")
    (imgs / "notes.txt").write_text("not an image")
    return root


def test_find_images(folder):
    imgs = folder / "imgs"
    assert [p.name for p in find_images(imgs)] == ["p0.png", "p1.png", "p2.png"]
    assert [p.name for p in find_images(str(imgs / "p[12].png"))] == ["p1.png", "p2.png"]
    assert [p.name for p in find_images([imgs / "p2.png", imgs])] == ["p2.png", "p0.png", "p1.png"]  # each once
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        find_images(imgs / "nope.jpg")
    with pytest.raises(FileNotFoundError, match=r"\*.gif: no image"):
        find_images(str(imgs / "*.gif"))


def test_predict_writes_pictures_and_a_json_table_equal_to_detect(folder, tmp_path):
    res = predict(folder / "model.pt", folder / "imgs", tmp_path / "out", score_threshold=-1.0, progress=False)
    assert [p.name for p in res.pictures] == ["p0.png", "p1.png", "p2.png"]
    assert all(np.asarray(Image.open(p)).shape == np.asarray(Image.open(folder / "imgs" / p.name)).shape
               for p in res.pictures)
    table = json.loads(res.table.read_text())
    assert table["score_threshold"] == -1.0 and table["classes"] == ["class0", "class1"]
    from detector import SPPDetector

    det = SPPDetector.load(folder / "model.pt")
    n = 0
    for rec in table["images"]:
        ref = det.detect(rec["file"], score_threshold=-1.0)
        assert [d["score"] for d in rec["detections"]] == [round(float(s), 6) for s in ref["scores"]]
        assert [d["class"] for d in rec["detections"]] == [det.class_names[int(k)] for k in ref["labels"]]
        n += len(rec["detections"])
    assert n == res.detections > 0
    assert "3 images" in res.text() and str(res.table) in res.text()


def test_predict_command_csv_and_errors(folder, tmp_path):
    out = tmp_path / "csv"
    r = subprocess.run([sys.executable, str(REPO / "tools/predict.py"), "--checkpoint", str(folder / "model.pt"),
                        str(folder / "imgs" / "p1.png"), str(folder / "imgs" / "p2.png"), "--out", str(out),
                        "--threshold", "-1", "--format", "csv"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.reader((out / "detections.csv").open()))
    assert rows[0] == ["file", "class", "score", "x1", "y1", "x2", "y2"] and len(rows) > 1
    assert sorted(p.name for p in out.glob("*.png")) == ["p1.png", "p2.png"]
    bad = subprocess.run([sys.executable, str(REPO / "tools/predict.py"), "--checkpoint", str(folder / "model.pt"),
                          str(folder / "missing")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: {folder / 'missing'}: no such image "
                                                                      "file or folder"]


def test_match_detections():
    gt_b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt_l = torch.tensor([0, 1])
    dets = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
            "scores": torch.tensor([0.5, 0.9, 0.3]), "labels": torch.tensor([0, 0, 0])}
    found, correct = match_detections(dets, gt_b, gt_l)
    assert found.tolist() == [True, False]  # the second box is class 1: a class-0 detection does not find it
    assert correct.tolist() == [False, True, False]  # the best-scored duplicate takes the match


def test_demo_picture_on_the_tiny_digits_model(tiny_run, tmp_path):
    """The make-demo call (checkpoint, first test image, --out) draws a grid of the test split with
    ground truth, and prints one line per image and the totals."""
    root, _, _, _ = tiny_run
    first = (root / "digits" / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    image = root / "digits" / "JPEGImages" / f"{first}.jpg"
    out, text = demo_picture(root / "run" / "model.pt", image, tmp_path / "demo.png", count=3)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"{first}.jpg: found ") and lines[-1].startswith("all 3 images")
    assert np.asarray(Image.open(out)).ndim == 3
    r = subprocess.run([sys.executable, str(REPO / "tools/demo.py"), "--checkpoint", str(root / "run" / "model.pt"),
                        str(image), "--out", str(tmp_path / "d2.png"), "--count", "2"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == f"wrote {tmp_path / 'd2.png'}" and (tmp_path / "d2.png").is_file()
