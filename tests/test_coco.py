"""detector.data.coco: the COCO-json reader on tiny hand-written sets (every quirk handled as the VOC
reader handles it), the reader chosen by data.format, and COCO results that keep the user's ids."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from detector.config import load_config
from detector.data.coco import CocoDataError, category_ids, discover_coco_classes, load_coco_split
from detector.data.records import DataError
from detector.data.splits import load_split
from detector.engine import data as engine_data
from detector.eval.coco import coco_evaluate

CATS = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "bird"}]


def ann(image_id: int, cat: int, bbox, iscrowd=0, **extra) -> dict:
    a = {"image_id": image_id, "category_id": cat, "bbox": bbox, **extra}
    if iscrowd is not None:
        a["iscrowd"] = iscrowd
    return a


def make_coco(root: Path, images: dict[str, int], anns: list[dict], *, cats=CATS, split="test",
              folder: str | None = None, size=(40, 30), write_size=True, files: set[str] | None = None,
              extra: dict | None = None) -> Path:
    """Write ROOT/annotations/instances_<split>.json; `images` maps file name -> COCO id; the image
    files go to ROOT/<folder or split>/ (size = (width, height))."""
    w, h = size
    imgs = []
    for name, i in images.items():
        im = {"id": i, "file_name": name}
        if write_size:
            im.update(width=w, height=h)
        imgs.append(im)
        if files is None or name in files:
            p = root / (folder if folder is not None else split) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (100, 50, 0)).save(p)
    anns = [{"id": j + 1, **a} for j, a in enumerate(anns)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": cats, **(extra or {})}))
    return root


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _summary(caplog) -> str:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1]


def test_basic_record_and_box_edge(tmp_path: Path):
    root = make_coco(tmp_path, {"a.jpg": 42, "b.png": 5},
                     [ann(42, 7, [0, 0, 10, 20]), ann(42, 3, [4.5, 1, 7.75, 7], iscrowd=1)])
    recs, classes = load_coco_split(root, "test")
    assert classes == ("cat", "dog")  # sorted names of the categories in use ("bird" has no annotation)
    assert [r.image_id for r in recs] == ["a", "b"] and [r.coco_id for r in recs] == [42, 5]
    a = recs[0]
    assert (a.height, a.width, a.path) == (30, 40, root / "test" / "a.jpg")
    # COCO [x, y, w, h] is continuous already: x2 = x + w
    assert a.boxes.dtype == torch.float32 and a.boxes.tolist() == [[0, 0, 10, 20], [4.5, 1, 12.25, 8]]
    assert a.labels.tolist() == [1, 0] and a.labels.dtype == torch.int64
    assert a.difficult.tolist() == [False, True]  # iscrowd -> difficult
    assert recs[1].boxes.shape == (0, 4) and recs[1].labels.shape == (0,)  # image without annotations: G = 0


def test_class_order_given_and_category_ids_by_name(tmp_path: Path):
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [0, 0, 5, 5]), ann(1, 11, [1, 1, 5, 5])])
    recs, classes = load_coco_split(root, "test", ["dog", "bird", "cat"])
    assert classes == ("dog", "bird", "cat") and recs[0].labels.tolist() == [0, 1]
    assert category_ids(root, "test", ["dog", "bird", "cat"]) == (7, 11, 3)
    assert category_ids(root, "test", ["cat", "zebra"]) == (3, 12)  # a class without category: a new id


@pytest.mark.parametrize("folder", ["test", "images/test", "images", ""])
def test_image_folders(tmp_path: Path, folder: str):
    root = make_coco(tmp_path, {"a.jpg": 1}, [], folder=folder)
    recs, _ = load_coco_split(root, "test", ["dog"])
    assert recs[0].path == (root / folder / "a.jpg")


def test_file_name_with_folder_and_whitespace(tmp_path: Path, caplog):
    # Label Studio writes "images/x.jpg" relative to the root; the id is the stem, whitespace -> _
    root = make_coco(tmp_path, {"images/x 1.jpg": 1}, [], folder="")
    recs, _ = load_coco_split(root, "test", ["dog"])
    assert recs[0].image_id == "x_1" and recs[0].path == root / "images" / "x 1.jpg"
    assert any("whitespace" in m for m in _warnings(caplog))


def test_degenerate_box_skipped_and_counted(tmp_path: Path, caplog):
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [5, 5, 0, 4]), ann(1, 7, [8, 9, 4, -6]),
                                              ann(1, 7, [0, 0, 10, 10])])
    caplog.set_level(logging.INFO, logger="detector.data.coco")
    recs, _ = load_coco_split(root, "test")
    assert recs[0].boxes.tolist() == [[0, 0, 10, 10]]
    w = _warnings(caplog)
    assert len(w) == 2 and all("instances_test.json" in m and "degenerate" in m and "skipped" in m for m in w)
    assert "degenerate box skipped: 2" in _summary(caplog)
    raw, _ = load_coco_split(root, "test", raw_boxes=True)  # kept as annotated for the evaluation
    assert raw[0].boxes.shape == (3, 4)


def test_box_beyond_image_clipped(tmp_path: Path, caplog):
    # image 40x30: xyxy range [0, 40] x [0, 30]
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [-1, -4, 46, 24]), ann(1, 7, [49, 0, 11, 10]),
                                              ann(1, 7, [0, 0, 40, 30])])
    caplog.set_level(logging.INFO, logger="detector.data.coco")
    recs, _ = load_coco_split(root, "test")
    assert recs[0].boxes.tolist() == [[0, 0, 40, 20], [0, 0, 40, 30]]
    w = _warnings(caplog)
    assert any("clipped" in m for m in w) and any("outside" in m and "skipped" in m for m in w)
    s = _summary(caplog)
    assert "box clipped to image: 1" in s and "degenerate box skipped: 1" in s
    raw, _ = load_coco_split(root, "test", raw_boxes=True)
    assert raw[0].boxes[0].tolist() == [-1, -4, 45, 20]


def test_unknown_category_skipped(tmp_path: Path, caplog):
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [0, 0, 9, 9]), ann(1, 11, [1, 1, 6, 6]),
                                              ann(1, 99, [2, 2, 6, 6])],
                     cats=[{"id": 7, "name": "dog"}, {"id": 3, "name": " cat\n"}, {"id": 11, "name": "bird"}])
    caplog.set_level(logging.INFO, logger="detector.data.coco")
    recs, _ = load_coco_split(root, "test", ["cat", "dog"])
    assert recs[0].labels.tolist() == [1]
    w = _warnings(caplog)
    assert any("'bird'" in m and "skipped" in m for m in w) and any("category_id 99" in m for m in w)
    assert "unknown class skipped: 2" in _summary(caplog)
    assert discover_coco_classes(root, "test") == ("bird", "dog")  # " cat\n" is unused; names stripped


def test_missing_iscrowd_is_zero(tmp_path: Path, caplog):
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [0, 0, 9, 9], iscrowd=None),
                                              ann(1, 7, [1, 1, 9, 9], iscrowd="yes"), ann(1, 7, [2, 2, 7, 7], iscrowd=1)])
    caplog.set_level(logging.INFO, logger="detector.data.coco")
    recs, _ = load_coco_split(root, "test")
    assert recs[0].difficult.tolist() == [False, False, True]
    assert "missing iscrowd set to 0: 2" in _summary(caplog)


def test_missing_size_read_from_image(tmp_path: Path, caplog):
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [0, 0, 9, 9])], size=(33, 21), write_size=False)
    caplog.set_level(logging.INFO, logger="detector.data.coco")
    recs, _ = load_coco_split(root, "test")
    assert (recs[0].height, recs[0].width) == (21, 33)
    assert "size read from image: 1" in _summary(caplog)
    with pytest.raises(CocoDataError, match="width/height missing.*cannot be read"):
        load_coco_split(make_coco(tmp_path / "y", {"a.jpg": 1}, [], write_size=False, files=set()), "test",
                        ["dog"], require_images=False)


def test_bad_bbox_and_unlisted_image_skipped(tmp_path: Path, caplog):
    root = make_coco(tmp_path, {"a.jpg": 1}, [ann(1, 7, [0, 0, 9, 9]), ann(1, 7, [0, "x", 9, 9]),
                                              ann(1, 7, [0, 0, 9]), ann(1, 7, None), ann(2, 7, [0, 0, 9, 9])])
    caplog.set_level(logging.INFO, logger="detector.data.coco")
    recs, _ = load_coco_split(root, "test")
    assert recs[0].boxes.shape == (1, 4)
    s = _summary(caplog)
    assert "bad bbox skipped: 3" in s and "annotation of an unlisted image skipped: 1" in s


def test_broken_files_are_errors_naming_them(tmp_path: Path):
    with pytest.raises(CocoDataError, match=r"not found: .*instances_val\.json"):
        load_coco_split(tmp_path, "val")
    root = make_coco(tmp_path / "x", {"a.jpg": 1, "b.jpg": 2, "c.jpg": 3}, [], files={"a.jpg"})
    with pytest.raises(CocoDataError, match=r"2 image\(s\) not found .*: b\.jpg, c\.jpg"):
        load_coco_split(root, "test", ["dog"])
    recs, _ = load_coco_split(root, "test", ["dog"], require_images=False)  # scoring needs no pictures
    assert [r.path for r in recs] == [root / "test" / n for n in ("a.jpg", "b.jpg", "c.jpg")]
    p = root / "annotations" / "instances_test.json"
    for text, match in [("{", "unreadable COCO json"), ("[1]", "no top-level 'images' list"),
                        ('{"images": []}', "lists no images"),
                        ('{"images": [{"id": "1", "file_name": "a.jpg"}]}', r"images\[0\] needs an integer 'id'"),
                        ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}',
                         "image id.* listed more than once: 1"),
                        ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "x/a.png"}]}',
                         r"shared by several file names \(.*\): a.jpg, x/a.png"),
                        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}, '
                         '{"id": 2, "name": "a"}]}', "category name.* more than one category: a")]:
        p.write_text(text)
        with pytest.raises(CocoDataError, match=match):
            load_coco_split(root, "test", ["dog"], require_images=False)
    assert issubclass(CocoDataError, DataError)


def test_format_picks_the_reader_everywhere(tmp_path: Path):
    """data.format: coco routes the training and test splits of the engine through the COCO reader."""
    root = tmp_path / "coco"
    make_coco(root, {"a.jpg": 10, "b.jpg": 11, "c.jpg": 12}, [ann(10, 7, [0, 0, 9, 9]), ann(12, 3, [1, 1, 5, 5])],
              split="trainval")
    make_coco(root, {"d.jpg": 20}, [ann(20, 7, [0, 0, 9, 9], iscrowd=1)], split="test")
    cfg = load_config(None, [f"data.root={root}", "data.format=coco", "data.val_fraction=0.4"])
    data = engine_data.training_data(cfg)
    assert data.class_names == ("cat", "dog") and len(data.train) == 3 and len(data.held_out) == 1
    assert {r.coco_id for r in data.train} == {10, 11, 12}
    recs, n = engine_data.test_records(cfg, "test", data.class_names)
    assert n == 1 and recs[0].difficult.tolist() == [True] and recs[0].coco_id == 20
    assert load_split(root, "test", format="coco")[0][0].image_id == "d"
    with pytest.raises(DataError, match="ImageSets"):
        engine_data.training_data(load_config(None, [f"data.root={root}"]))  # the VOC reader on a COCO folder


def test_results_keep_the_users_ids_and_score_against_their_file(tmp_path: Path):
    """coco_dets.json of COCO data holds the json's own image and category ids: pycocotools scores it
    against the user's annotation file and gets the project's COCO figure."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detector.eval.jitter import jitter_detections

    images = {f"im{i}.jpg": 100 + 7 * i for i in range(6)}
    g = torch.Generator().manual_seed(0)
    anns = []
    for i, cid in enumerate(images.values()):
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            x, y = (torch.rand(2, generator=g) * 40).tolist()
            w, h = (10 + torch.rand(2, generator=g) * 30).tolist()
            anns.append(ann(cid, [7, 3, 11][int(torch.randint(0, 3, (1,), generator=g))], [x, y, w, h],
                            iscrowd=int(torch.rand(1, generator=g) < 0.15), area=w * h))
    root = make_coco(tmp_path, images, anns, size=(90, 80))
    classes = ("dog", "cat", "bird")
    recs, _ = load_coco_split(root, "test", classes, raw_boxes=True)
    dets = jitter_detections(recs, len(classes), noise=0.1, miss=0.1, dup=0.1, fp=1.0, generator=g)
    out = tmp_path / "eval"
    ours = coco_evaluate(recs, classes, dets, out_dir=out, category_ids=category_ids(root, "test", classes))
    res = json.loads((out / "coco_dets.json").read_text())
    assert {d["image_id"] for d in res} <= set(images.values()) and {d["category_id"] for d in res} <= {7, 3, 11}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_test.json"))  # the user's own file
        ev = COCOeval(gt, gt.loadRes(str(out / "coco_dets.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0.2 < ours["AP"] < 1
    assert ev.stats[0] == pytest.approx(ours["AP"], abs=1e-12)
    assert ev.stats[1] == pytest.approx(ours["AP50"], abs=1e-12)
    # VOC data keeps today's numbering: image ids 1..N, category ids 1..K
    voc_like = [r.__class__(**{**r.__dict__, "coco_id": None}) for r in recs]
    coco_evaluate(voc_like, classes, dets, out_dir=tmp_path / "voc")
    res = json.loads((tmp_path / "voc" / "coco_dets.json").read_text())
    assert {d["image_id"] for d in res} <= set(range(1, 7)) and {d["category_id"] for d in res} <= {1, 2, 3}
