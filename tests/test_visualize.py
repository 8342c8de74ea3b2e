"""detector.visualize: boxes drawn where they are, in their colours, without touching matplotlib's
state; tiles and captions."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageColor

from detector.visualize import CLASS_COLOURS, GT_COLOUR, caption, draw_detections, tile

REPO = Path(__file__).resolve().parents[1]


def _rgb(hex_colour: str) -> list[int]:
    return list(ImageColor.getrgb(hex_colour))


@pytest.fixture
def scene():
    image = np.full((120, 160, 3), 40, np.uint8)
    dets = {"boxes": torch.tensor([[10.0, 60.0, 50.0, 110.0], [100.0, 50.0, 150.0, 100.0]]),
            "scores": torch.tensor([1.5, -0.5]), "labels": torch.tensor([1, 2])}
    gt = {"boxes": torch.tensor([[90.0, 5.0, 140.0, 40.0]]), "labels": torch.tensor([0])}
    return image, dets, gt


def test_boxes_in_class_and_ground_truth_colours(scene):
    image, dets, gt = scene
    before = image.copy()
    out = draw_detections(image, dets, ["a", "b", "c"], ground_truth=gt, width=2)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(image, before)  # the input is not drawn on
    assert out[100, 10].tolist() == _rgb(CLASS_COLOURS[1])  # left edge of the label-1 box, below its label
    assert out[90, 149].tolist() == _rgb(CLASS_COLOURS[2])  # right edge of the label-2 box
    assert out[35, 139].tolist() == _rgb(GT_COLOUR)  # right edge of the ground truth
    assert out[85, 80].tolist() == [40, 40, 40]  # nothing drawn between the boxes


def test_threshold_and_inputs(scene):
    image, dets, gt = scene
    out = draw_detections(image, dets, ["a", "b", "c"], score_threshold=0.0)
    assert out[90, 149].tolist() == [40, 40, 40]  # the -0.5 box is not drawn
    assert out[100, 10].tolist() == _rgb(CLASS_COLOURS[1])
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert np.array_equal(draw_detections(chw, dets, ["a", "b", "c"]), draw_detections(image, dets, ["a", "b", "c"]))
    assert np.array_equal(draw_detections(image, None, ["a"]), image)  # nothing to draw


def test_tile_and_caption():
    a, b = np.zeros((10, 20, 3), np.uint8), np.zeros((30, 5, 3), np.uint8)
    g = tile([a, b, a], columns=2, gap=2)
    assert g.shape == (2 * (30 + 2) + 2, 2 * (20 + 2) + 2, 3)
    c = caption(a, ["one", "two"], font_size=10)
    assert c.shape[1] == 20 and c.shape[0] > 10 and np.array_equal(c[:10], a)
    with pytest.raises(ValueError, match="no pictures"):
        tile([], 2)


def test_drawing_leaves_matplotlib_alone():
    """A notebook's backend survives: no pyplot import, no matplotlib.use anywhere in the library."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); import numpy as np, torch; "
            "from detector.visualize import draw_detections; "
            "draw_detections(np.zeros((40, 40, 3), np.uint8), {'boxes': torch.tensor([[1., 1., 30., 30.]]), "
            "'scores': torch.tensor([1.]), 'labels': torch.tensor([0])}, ['x']); "
            "assert matplotlib.get_backend() == 'svg'; assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    offenders = [str(p) for pkg in ("detector", "proposals") for p in (REPO / pkg).rglob("*.py")
                 if "matplotlib.use(" in p.read_text() or "import matplotlib.pyplot" in p.read_text()]
    assert not offenders, offenders
