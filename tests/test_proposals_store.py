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

from proposals.store import (NpzProposals, ProposalFileError, load_proposals, read_npz, read_proposal_file,
                             save_proposals)

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


def test_npz_proposals_reads_each_image_on_demand(tmp_path):
    rng = np.random.default_rng(3)
    props = {f"im{i}": (rng.random((int(rng.integers(0, 40)), 4)) * 300).astype(np.float32) for i in range(25)}
    props["empty"] = np.zeros((0, 4), np.float32)
    path = save_proposals(tmp_path / "p.npz", props, meta="key")
    lazy, whole = NpzProposals(path), read_npz(path)
    assert list(lazy) == list(whole) == list(props) and len(lazy) == len(props)
    assert "im3" in lazy and "nope" not in lazy
    for k, v in props.items():  # the same arrays as reading the whole file
        got = lazy[k]
        assert got.dtype == np.float32 and got.shape == v.shape
        np.testing.assert_array_equal(got, whole[k])
        np.testing.assert_array_equal(got, v)
    assert not any(isinstance(v, np.ndarray) and v.ndim == 2 for v in vars(lazy).values())  # holds no boxes
    with pytest.raises(KeyError):
        lazy["nope"]
    lazy["im1"][0, 0] = -5.0  # each read is the caller's own array
    np.testing.assert_array_equal(lazy["im1"], props["im1"])
    again = pickle.loads(pickle.dumps(lazy))  # workers get the path, not an open descriptor
    np.testing.assert_array_equal(again["im7"], props["im7"])
    copy = pickle.loads(pickle.dumps(lazy))
    props2 = {k: v + 1 for k, v in props.items()}
    save_proposals(path, props2)  # another run replaces the file: the open mapping keeps its file
    np.testing.assert_array_equal(lazy["im7"], props["im7"])
    with pytest.raises(ProposalFileError, match="changed after it was read"):
        copy["im7"]  # a copy that opens the path now would read the new file with the old offsets
    np.testing.assert_array_equal(NpzProposals(path)["im7"], props2["im7"])


def test_npz_proposals_bad_files(tmp_path):
    props = {"a": np.array([[0, 0, 5, 5], [1, 1, 2, 2]], np.float32), "b": np.array([[3, 3, 9, 9]], np.float32)}
    packed = tmp_path / "packed.npz"  # a compressed file cannot be read per image: a clear error
    np.savez_compressed(packed, ids=np.array(["a", "b"]), counts=np.array([2, 1]),
                        boxes=np.concatenate(list(props.values())), format=np.array("sppnet-proposals-v1"))
    with pytest.raises(ProposalFileError, match="compressed"):
        NpzProposals(packed)
    np.testing.assert_array_equal(read_npz(packed)["a"], props["a"])  # read whole, it still loads
    nan = tmp_path / "nan.npz"  # a NaN box is named with its image when that image is read
    bad = {"a": props["a"], "b": np.array([[np.nan, 0, 1, 1]], np.float32)}
    np.savez(nan, ids=np.array(["a", "b"]), counts=np.array([2, 1]), boxes=np.concatenate(list(bad.values())),
             format=np.array("sppnet-proposals-v1"))
    lazy = NpzProposals(nan)
    np.testing.assert_array_equal(lazy["a"], props["a"])
    with pytest.raises(ProposalFileError, match="'b'.*NaN"):
        lazy["b"]
    odd = tmp_path / "odd.npz"  # counts that do not add up to the boxes
    np.savez(odd, ids=np.array(["a", "b"]), counts=np.array([2, 2]), boxes=np.concatenate(list(props.values())),
             format=np.array("sppnet-proposals-v1"))
    with pytest.raises(ProposalFileError, match="do not agree"):
        NpzProposals(odd)
    path = save_proposals(tmp_path / "cut.npz", props)
    lazy = NpzProposals(path)
    np.testing.assert_array_equal(lazy["b"], props["b"])
    os.truncate(path, path.read_bytes().index(props["b"].tobytes()))  # the file now ends where b's boxes began
    with pytest.raises(ProposalFileError, match="read 0 of 16 bytes of image 'b'"):
        lazy["b"]


def test_merge_proposal_files_equals_saving_the_merged_mapping(tmp_path):
    from proposals.store import merge_proposal_files, read_npz_meta

    rng = np.random.default_rng(5)
    parts, merged = [], {}
    for k in range(4):  # the last part is empty of boxes: one image with none
        part = {f"p{k}_{i}": (rng.random((int(rng.integers(0 if k == 3 else 1, 30)), 4)) * 50).astype(np.float32)
                for i in range(3 if k < 3 else 1)}
        merged.update(part)
        parts.append(save_proposals(tmp_path / f"part{k}.npz", part))
    out = merge_proposal_files(tmp_path / "all.npz", parts, meta="the key")
    ref = save_proposals(tmp_path / "ref.npz", merged, meta="the key")
    got, want = read_npz(out), read_npz(ref)
    assert list(got) == list(want) == list(merged)
    for k in merged:
        np.testing.assert_array_equal(got[k], want[k])
    assert read_npz_meta(out) == "the key"
    lazy = NpzProposals(out)
    np.testing.assert_array_equal(lazy["p2_1"], merged["p2_1"])
    with pytest.raises(ProposalFileError, match="repeat"):
        merge_proposal_files(tmp_path / "twice.npz", [parts[0], parts[0]])
    assert not (tmp_path / "twice.npz").exists()
