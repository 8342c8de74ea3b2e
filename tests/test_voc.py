"""detector.data.voc: every annotation quirk on tiny hand-written VOC folders, and the real BCCD set."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from detector.data.voc import VOC_CLASSES, VOCDataError, discover_classes, load_voc_split, read_split_ids


def obj(name: str, box, difficult: str | None = "0") -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Unspecified</pose>{diff}"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def make_voc(root: Path, images: dict[str, list[str]], *, size=(40, 30), write_size=True,
             split="test", split_text: str | None = None, image_ids=None, xml_ids=None) -> Path:
    """Write a VOC folder: `images` maps id -> list of <object> strings; size = (width, height)."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    w, h = size
    for image_id, objs in images.items():
        if xml_ids is None or image_id in xml_ids:
            sz = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>" if write_size else ""
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename>{sz}{''.join(objs)}</annotation>")
        if image_ids is None or image_id in image_ids:
            Image.new("RGB", (w, h), (100, 50, 0)).save(root / "JPEGImages" / f"{image_id}.jpg")
    text = split_text if split_text is not None else "\n".join(images) + "\n"
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
    return root


def test_basic_record_and_box_edge(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 20)), obj("cat", (5.5, 2, 12.25, 8), "1")],
                               "b": []})
    recs, classes = load_voc_split(root, "test")
    assert classes == ("cat", "dog")  # sorted from the data
    assert [r.image_id for r in recs] == ["a", "b"]
    a = recs[0]
    assert (a.height, a.width, a.path) == (30, 40, root / "JPEGImages" / "a.jpg")
    # VOC (1-based inclusive) -> xyxy: xmin-1, ymin-1; float coordinates kept
    assert a.boxes.dtype == torch.float32 and a.boxes.tolist() == [[0, 0, 10, 20], [4.5, 1, 12.25, 8]]
    assert a.labels.tolist() == [1, 0] and a.labels.dtype == torch.int64
    assert a.difficult.tolist() == [False, True]
    assert recs[1].boxes.shape == (0, 4) and recs[1].labels.shape == (0,)  # zero-object image kept


def test_class_list_given_uses_its_order(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 20)), obj("person", (2, 2, 9, 9))]})
    recs, classes = load_voc_split(root, "test", VOC_CLASSES)
    assert classes == VOC_CLASSES and recs[0].labels.tolist() == [11, 14]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _summary(caplog) -> str:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1]


def test_degenerate_box_skipped_and_counted(tmp_path: Path, caplog):
    root = make_voc(tmp_path, {"a": [obj("dog", (5, 5, 5, 9)), obj("dog", (8, 9, 12, 3)),
                                     obj("dog", (1, 1, 10, 10))]})
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    recs, _ = load_voc_split(root, "test")
    assert recs[0].boxes.tolist() == [[0, 0, 10, 10]]
    w = _warnings(caplog)
    assert len(w) == 2 and all("a.xml" in m and "degenerate" in m and "skipped" in m for m in w)
    assert "degenerate box skipped: 2" in _summary(caplog)
    # raw_boxes: kept as annotated (what the devkit scores), still warned
    raw, _ = load_voc_split(root, "test", raw_boxes=True)
    assert raw[0].boxes.shape == (3, 4)


def test_box_beyond_image_clipped(tmp_path: Path, caplog):
    # image 40x30: xyxy range [0, 40] x [0, 30]
    root = make_voc(tmp_path, {"a": [obj("dog", (0, -3, 45, 20)), obj("dog", (50, 1, 60, 10)),
                                     obj("dog", (1, 1, 40, 30))]})
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    recs, _ = load_voc_split(root, "test")
    assert recs[0].boxes.tolist() == [[0, 0, 40, 20], [0, 0, 40, 30]]  # last one touches the border: ok
    w = _warnings(caplog)
    assert any("a.xml" in m and "clipped" in m for m in w)
    assert any("a.xml" in m and "outside" in m and "skipped" in m for m in w)
    s = _summary(caplog)
    assert "box clipped to image: 1" in s and "degenerate box skipped: 1" in s
    raw, _ = load_voc_split(root, "test", raw_boxes=True)
    assert raw[0].boxes[0].tolist() == [-1, -4, 45, 20]


def test_unknown_class_skipped(tmp_path: Path, caplog):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 10)), obj("unicorn", (2, 2, 8, 8)),
                                     obj(" cat\n", (3, 3, 9, 9))]})
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    recs, classes = load_voc_split(root, "test", ["cat", "dog"])
    assert recs[0].labels.tolist() == [1, 0]  # " cat\n" matched after strip()
    assert any("a.xml" in m and "'unicorn'" in m and "skipped" in m for m in _warnings(caplog))
    assert "unknown class skipped: 1" in _summary(caplog)
    assert discover_classes(root, "test") == ("cat", "dog", "unicorn")


def test_missing_difficult_is_zero(tmp_path: Path, caplog):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 10), difficult=None),
                                     obj("dog", (2, 2, 10, 10), difficult="1")]})
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    recs, _ = load_voc_split(root, "test")
    assert recs[0].difficult.tolist() == [False, True]
    assert any("a.xml" in m and "<difficult>" in m for m in _warnings(caplog))
    assert "missing <difficult> set to 0: 1" in _summary(caplog)


def test_missing_size_read_from_image(tmp_path: Path, caplog):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 10))]}, size=(33, 21), write_size=False)
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    recs, _ = load_voc_split(root, "test")
    assert (recs[0].height, recs[0].width) == (21, 33)
    assert any("a.xml" in m and "<size>" in m for m in _warnings(caplog))
    assert "size read from image: 1" in _summary(caplog)


def test_missing_files_are_errors_naming_the_ids(tmp_path: Path):
    root = make_voc(tmp_path / "x", {"a": [], "b": [], "c": []}, xml_ids={"a", "c"})
    with pytest.raises(VOCDataError, match=r"without .*Annotations.*: b"):
        load_voc_split(root, "test", ["dog"])
    root = make_voc(tmp_path / "y", {"a": [], "b": [], "c": []}, image_ids={"a"})
    with pytest.raises(VOCDataError, match=r"2 id\(s\) without an image .*: b, c"):
        load_voc_split(root, "test", ["dog"])


def test_unreadable_xml_names_the_file(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 10))], "b": []})
    (root / "Annotations" / "b.xml").write_text("<annotation><object><name>dog</name></annot")
    with pytest.raises(VOCDataError, match=r"unreadable annotation XML .*b\.xml"):
        load_voc_split(root, "test", ["dog"])
    with pytest.raises(VOCDataError, match=r"b\.xml"):
        discover_classes(root, "test")


def test_split_file_parsing(tmp_path: Path):
    root = make_voc(tmp_path, {"a": [], "b": []}, split_text="a  1\n\n   \nb -1\n")
    assert read_split_ids(root, "test") == ["a", "b"]  # first token; blank lines ignored
    (root / "ImageSets/Main/dup.txt").write_text("a\nb\na\n")
    with pytest.raises(VOCDataError, match=r"dup\.txt.*listed more than once: a"):
        read_split_ids(root, "dup")
    with pytest.raises(VOCDataError, match=r"nosuch\.txt"):
        load_voc_split(root, "nosuch")
    (root / "ImageSets/Main/empty.txt").write_text("\n  \n")
    with pytest.raises(VOCDataError, match=r"empty\.txt: the split file lists no images"):
        load_voc_split(root, "empty")


def test_bad_bndbox_skipped(tmp_path: Path, caplog):
    root = make_voc(tmp_path, {"a": [obj("dog", (1, 1, 10, 10)), obj("dog", ("x", 1, 10, 10)),
                                     "<object><name>dog</name></object>"]})
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    recs, _ = load_voc_split(root, "test")
    assert recs[0].boxes.shape == (1, 4)
    assert "bad <bndbox> skipped: 2" in _summary(caplog)


def test_bccd(bccd_root: Path, caplog):
    caplog.set_level(logging.INFO, logger="detector.data.voc")
    trainval, classes = load_voc_split(bccd_root, "trainval")
    assert classes == ("Platelets", "RBC", "WBC") and len(trainval) == 292
    w = _warnings(caplog)
    assert len(w) == 2 and all("degenerate" in m and "skipped" in m for m in w)
    assert {m.split(":")[0].rsplit("/", 1)[-1] for m in w} == {"BloodImage_00338.xml", "BloodImage_00343.xml"}
    assert "degenerate box skipped: 2" in _summary(caplog)
    caplog.clear()
    test, _ = load_voc_split(bccd_root, "test", classes)
    assert [r.image_id for r in test] == read_split_ids(bccd_root, "test") and len(test) == 72
    assert not _warnings(caplog)
    assert sum(len(r.labels) for r in test) == 945
    assert all(r.boxes.shape[0] == r.labels.shape[0] and (r.height, r.width) == (480, 640) for r in test)
    raw, _ = load_voc_split(bccd_root, "trainval", classes, raw_boxes=True, log_summary=False)
    assert sum(len(r.labels) for r in raw) == sum(len(r.labels) for r in trainval) + 2


def test_scoring_without_images(tmp_path: Path):
    # the devkit scores from the XML alone; require_images=False allows that (size from <size>)
    root = make_voc(tmp_path / "x", {"a": [obj("dog", (1, 1, 10, 10))], "b": []}, image_ids=set())
    recs, _ = load_voc_split(root, "test", ["dog"], require_images=False)
    assert [r.image_id for r in recs] == ["a", "b"] and recs[0].path == root / "JPEGImages" / "a.jpg"
    root = make_voc(tmp_path / "y", {"a": []}, image_ids=set(), write_size=False)
    with pytest.raises(VOCDataError, match=r"a\.xml: <size> missing .*a\.jpg cannot be read"):
        load_voc_split(root, "test", ["dog"], require_images=False)
