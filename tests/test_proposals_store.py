"""proposals.store: R-CNN .mat, detectron2 .pkl and .npz files against hand-computed values."""
from __future__ import annotations

import enum
import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.io

from proposals.store import (ProposalFileError, load_proposals, read_proposal_file, save_proposals)

# R-CNN rows are (y1, x1, y2, x2), 1-based inclusive. By hand:
#   (1, 1, 20, 10): rows 1..20, cols 1..10 -> x 0..10, y 0..20 -> xyxy (0, 0, 10, 20)
#   (5, 7, 14, 30): rows 5..14, cols 7..30 -> xyxy (6, 4, 30, 14), a 24 x 10 box
MAT_A = np.array([[1, 1, 20, 10], [5, 7, 14, 30]], dtype=np.float64)
XYXY_A = np.array([[0, 0, 10, 20], [6, 4, 30, 14]], dtype=np.float32)
MAT_B = np.array([[2, 3, 4, 5]], dtype=np.float64)  # -> (2, 1, 5, 4)
XYXY_B = np.array([[2, 1, 5, 4]], dtype=np.float32)


def _cell(items, shape):
    c = np.empty(shape, dtype=object)
    for i, x in enumerate(items):
        c.flat[i] = x
    return c


@pytest.mark.parametrize("shape", [(1, 2), (2, 1)])
def test_rcnn_mat_swap_and_shift(tmp_path, shape):
    path = tmp_path / "ss.mat"
    scipy.io.savemat(path, {"boxes": _cell([MAT_A, MAT_B], shape),
                            "images": _cell(["000005", "000007"], shape)})
    got = read_proposal_file(path)
    assert list(got) == ["000005", "000007"]
    np.testing.assert_array_equal(got["000005"], XYXY_A)
    np.testing.assert_array_equal(got["000007"], XYXY_B)
    assert got["000005"].dtype == np.float32


def test_rcnn_mat_empty_cell_and_char_matrix_ids(tmp_path):
    path = tmp_path / "ss.mat"
    # a char matrix of ids (MATLAB char(...)) and an image without boxes
    scipy.io.savemat(path, {"boxes": _cell([MAT_B, np.zeros((0, 4))], (1, 2)),
                            "images": np.array(["a1", "b2"])})
    got = read_proposal_file(path)
    np.testing.assert_array_equal(got["a1"], XYXY_B)
    assert got["b2"].shape == (0, 4)


def test_mat_v73_and_missing_variable(tmp_path):
    v73 = tmp_path / "v73.mat"
    v73.write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + b"\0" * 200)
    with pytest.raises(ProposalFileError, match="v7.3.*-v7"):
        read_proposal_file(v73)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"all_boxes": np.zeros((1, 4))})
    with pytest.raises(ProposalFileError, match="no variable 'boxes'"):
        read_proposal_file(other)


def _fake_detectron2_boxmode(monkeypatch):
    """A BoxMode enum that pickles as detectron2.structures.boxes.BoxMode (no detectron2 needed)."""
    mod = types.ModuleType("detectron2.structures.boxes")

    class BoxMode(enum.IntEnum):
        XYXY_ABS = 0
        XYWH_ABS = 1

    BoxMode.__module__ = mod.__name__
    BoxMode.__qualname__ = "BoxMode"
    mod.BoxMode = BoxMode
    for name in ("detectron2", "detectron2.structures", "detectron2.structures.boxes"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name) if name != mod.__name__ else mod)
    return BoxMode


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_pkl_round_trip(tmp_path, monkeypatch, protocol):
    BoxMode = _fake_detectron2_boxmode(monkeypatch)
    boxes = [np.array([[1.5, 2, 30, 40], [0, 0, 5, 5]], np.float32), np.zeros((0, 4), np.float32)]
    data = {"ids": [5, "img_b"], "boxes": boxes,
            "objectness_logits": [np.array([3.0, 1.0], np.float32), np.zeros(0, np.float32)],
            "bbox_mode": BoxMode.XYXY_ABS}
    path = tmp_path / "props.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    got = read_proposal_file(path)
    assert list(got) == ["5", "img_b"]  # ids become strings
    np.testing.assert_array_equal(got["5"], boxes[0])  # already xyxy continuous: unchanged
    assert got["img_b"].shape == (0, 4)
    # an XYWH file is refused
    data["bbox_mode"] = BoxMode.XYWH_ABS
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(ProposalFileError, match="bbox_mode 1"):
        read_proposal_file(path)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ids": ["a"], "boxes": [_Evil(marker)]}))
    with pytest.raises(ProposalFileError, match="refusing to load"):
        read_proposal_file(path)
    assert not marker.exists()


def test_npz_round_trip_and_atomic(tmp_path):
    props = {"b": np.array([[0, 1, 2, 3.5]], np.float64), "a": np.zeros((0, 4)),
             "c": np.arange(8, dtype=np.float32).reshape(2, 4)}
    out = save_proposals(tmp_path / "p", props)
    assert out.name == "p.npz" and not list(tmp_path.glob(".*.tmp"))
    got = read_proposal_file(out)
    assert list(got) == ["b", "a", "c"]  # order kept
    for k in props:
        np.testing.assert_array_equal(got[k], props[k].astype(np.float32))
        assert got[k].dtype == np.float32


def test_load_proposals_missing_and_extra_ids(tmp_path):
    out = save_proposals(tmp_path / "p.npz", {"a": np.zeros((1, 4)), "b": np.ones((1, 4)),
                                                "c": np.ones((2, 4))})
    got = load_proposals(out, ["c", "a", "b"])
    assert list(got) == ["c", "a", "b"]  # caller's order
    with pytest.raises(ProposalFileError, match=r"no proposals for 1 image id\(s\): 'zz'"):
        load_proposals(out, ["a", "zz"], allow_extra=True)
    with pytest.raises(ProposalFileError, match=r"2 id\(s\) in the file.*'b', 'c'.*allow_extra"):
        load_proposals(out, ["a"])
    assert list(load_proposals(out, ["a"], allow_extra=True)) == ["a"]


def test_bad_files(tmp_path):
    with pytest.raises(ProposalFileError, match="not found"):
        read_proposal_file(tmp_path / "nope.npz")
    bad = tmp_path / "x.txt"
    bad.write_text("1 2 3 4")
    with pytest.raises(ProposalFileError, match="unknown proposal file type"):
        read_proposal_file(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ProposalFileError, match="not a readable .npz"):
        read_proposal_file(junk)
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"ids": ["a"], "boxes": [np.zeros((3, 5))]}))
    with pytest.raises(ProposalFileError, match=r"shape \[R, 4\]"):
        read_proposal_file(wrong)
