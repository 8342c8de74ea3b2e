"""detector.export: the program after proposals (image + boxes -> detections) written as TorchScript,
loaded back and run, gives the eager model's detections exactly; the formats that cannot hold it
are refused with the reason."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from detector import SPPDetector
from detector.bench.random_model import random_boxes, random_detector
from detector.export import DetectionProgram, ExportError, export_detector, load_exported
from proposals import propose, read_image


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255  # (3, H, W)


def _same(ref: dict, out: tuple) -> bool:
    return all(torch.equal(ref[k], v) for k, v in zip(("boxes", "scores", "labels"), out))


def test_torchscript_program_of_the_digits_model_detects_as_the_eager_model(tiny_run, tmp_path):
    """The tiny digits model (tests/conftest.py) exported, loaded with torch.jit.load alone, on its
    test images with selective-search proposals: the same boxes, scores and labels."""
    root, _, _, _ = tiny_run
    det = SPPDetector.load(root / "run" / "model.pt", fc_precision="float32")  # the program's arithmetic
    path = export_detector(det, tmp_path / "digits.pt", "torchscript")
    prog = torch.jit.load(str(path))
    assert list(prog.class_names) == list(det.class_names)
    images = sorted((root / "digits" / "JPEGImages").glob("*.jpg"))[:3]
    found = 0
    for f in images:
        im = read_image(f)
        boxes = torch.from_numpy(propose(im, **det.params.proposal_options))  # the part that stays outside
        ref = det.detect(im, proposals=boxes)
        out = prog(_chw(im), boxes)
        assert _same(ref, out), f.name
        found += len(ref["scores"])
    assert found > 0
    # a score threshold fixed at export
    prog0 = load_exported(export_detector(det, tmp_path / "digits0.pt", "torchscript", score_threshold=0.0))
    im = read_image(images[0])
    boxes = torch.from_numpy(propose(im, **det.params.proposal_options))
    assert _same(det.detect(im, proposals=boxes, score_threshold=0.0), prog0(_chw(im), boxes))


@pytest.mark.parametrize("variant", ["two_scales", "svm_softmax", "no_bbox", "max_size"])
def test_torchscript_program_variants(variant, tmp_path):
    """Several scales (per-window scale choice), the svm+softmax score, a model without box
    regressors and a max-size cap: the loaded program equals the eager detector."""
    from detector.head import FCHead

    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=3, scales=(96, 160))
    if variant == "svm_softmax":
        head = FCHead(det.head.in_dim, fc_dim=16, num_classes=3, dropout=0.5).eval()
        head.load_state_dict(det.head.state_dict(), strict=False)
        det.head = head
        det.params = dataclasses.replace(det.params, score="svm+softmax")
    elif variant == "no_bbox":
        det.bbox = None
    elif variant == "max_size":
        det.params = dataclasses.replace(det.params, scales=(200,), max_size=180)
    from detector.bench.inputs import voc_sized_photos

    prog = load_exported(export_detector(det, tmp_path / "p.pt", "torchscript"))
    for i, (_, im) in enumerate(voc_sized_photos(2, size=(120, 170))):
        im = im if i == 0 else np.ascontiguousarray(im.transpose(1, 0, 2))  # a portrait image too
        boxes = random_boxes(im.shape[0], im.shape[1], 200, torch.Generator().manual_seed(i))
        ref = det.detect(im, proposals=boxes)
        assert len(ref["scores"]) > 0
        assert _same(ref, prog(_chw(im), boxes))
        with torch.no_grad():
            assert _same(ref, DetectionProgram(det)(_chw(im), boxes))  # the eager module too
    # no proposals: no detections
    out = prog(_chw(im), torch.zeros((0, 4)))
    assert out[0].shape == (0, 4) and out[2].dtype == torch.int64


@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_export_and_onnx_are_refused_with_the_reason(fmt, tmp_path):
    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))
    with pytest.raises(ExportError, match="data-dependent"):
        export_detector(det, tmp_path / "p.bin", fmt)
    assert not (tmp_path / "p.bin").exists()


def test_bad_format_and_inexact_levels_are_refused(tmp_path):
    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_detector(det, tmp_path / "p.pt", "tflite")
    odd = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,), levels=(1, 7))
    with pytest.raises(ExportError, match=r"levels \[1, 7\].*roi_pool"):
        export_detector(odd, tmp_path / "p.pt", "torchscript")
