"""detector.data.digits_build: VOC layout, determinism, disjoint digits, stamp logic, difficult flags in the XML.

Every data set here has about 20 images (a fraction of a second each).
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.data import digits_build as dg
from detector.data.digits_build import STAMP_NAME, DatasetExistsError, make_digits_dataset, split_digit_pools
from detector.data.digits_draw import DIGIT_CLASSES, DigitsParams, compose_image, load_digit_images

SMALL = dict(seed=0, n_trainval=12, n_test=8)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_split(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "a"
    s = make_digits_dataset(root, **SMALL)
    assert not s["skipped"]
    return root


def test_same_seed_identical_bytes_any_worker_count(built, tmp_path):
    other = tmp_path / "b"
    make_digits_dataset(other, **SMALL, workers=2)  # other process count, same bytes
    a, b = _files(built), _files(other)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".jpg")]) == 20
    for k in a:
        assert a[k] == b[k], k


def test_different_seed_differs(built, tmp_path):
    other = tmp_path / "c"
    make_digits_dataset(other, **{**SMALL, "seed": 1})
    a, c = _files(built), _files(other)
    assert sorted(k for k in a if k != STAMP_NAME) == sorted(k for k in c if k != STAMP_NAME)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != c[k] for k in jpgs) == len(jpgs)


def test_voc_layout(built):
    main = built / "ImageSets" / "Main"
    train, val, test = (_read_split(built, s) for s in ("train", "val", "test"))
    trainval = _read_split(built, "trainval")
    assert (len(train), len(val), len(test)) == (6, 6, 8)
    assert trainval == sorted(train + val) and not set(trainval) & set(test)
    for image_id in trainval + test:
        assert len(image_id) == 6 and image_id.isdigit()
        root = ET.parse(built / "Annotations" / f"{image_id}.xml").getroot()
        assert root.tag == "annotation" and root.findtext("filename") == f"{image_id}.jpg"
        w, h, d = (int(root.find("size").findtext(k)) for k in ("width", "height", "depth"))
        img = cv2.imread(str(built / "JPEGImages" / f"{image_id}.jpg"))
        assert img.shape == (h, w, 3) and d == 3
        assert 320 <= h <= 500 and 320 <= w <= 500
        objs = root.findall("object")
        assert 2 <= len(objs) <= 8
        for o in objs:
            assert o.findtext("name") in DIGIT_CLASSES
            assert o.findtext("pose") == "Unspecified" and o.findtext("truncated") == "0"
            assert o.findtext("difficult") in ("0", "1")
            bb = o.find("bndbox")
            xmin, ymin, xmax, ymax = (int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h  # 1-based inclusive, inside
    # per-class files: "<id> <flag>" with 1 (a non-difficult instance), 0 (only difficult), -1 (none)
    for split, ids in (("trainval", trainval), ("test", test)):
        for name in DIGIT_CLASSES:
            lines = (main / f"{name}_{split}.txt").read_text().splitlines()
            assert [ln.split()[0] for ln in lines] == ids
            for ln in lines:
                image_id, flag = ln.split()
                objs = [o for o in ET.parse(built / "Annotations" / f"{image_id}.xml").getroot().findall("object")
                        if o.findtext("name") == name]
                want = 1 if any(o.findtext("difficult") == "0" for o in objs) else (0 if objs else -1)
                assert int(flag) == want and ln == f"{image_id} {want:2d}"


def test_xml_box_is_one_based_inclusive():
    obj = {"label": 3, "box": np.array([0.0, 0.0, 10.0, 20.0]), "difficult": False}
    root = ET.fromstring(dg._xml("000007", 40, 30, "camera", [obj]))
    bb = root.find("object").find("bndbox")
    # pixels 0..9 (0-based) = 1..10 (VOC); continuous x2 = 10 is the inclusive xmax 10
    assert [int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] == [1, 1, 10, 20]
    assert root.find("object").findtext("name") == "three"


def test_digit_pools_disjoint_and_stratified():
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    pools = split_digit_pools(labels, [500, 500, 300], seed=0)
    allidx = np.concatenate(pools)
    assert len(allidx) == 1797 and len(np.unique(allidx)) == 1797  # disjoint, covering
    for p, share in zip(pools, (5 / 13, 5 / 13, 3 / 13)):
        assert set(np.unique(labels[p])) == set(range(10))
        assert abs(len(p) / 1797 - share) < 0.01
    assert all(np.array_equal(a, b) for a, b in zip(pools, split_digit_pools(labels, [500, 500, 300], 0)))
    # every digit an image uses comes from its pool
    rng = np.random.default_rng(0)
    bg = np.full((400, 400, 3), 128, np.uint8)
    _, objs = compose_image(rng, bg, images, labels, pools[2], DigitsParams())
    assert objs and all(o["digit"] in set(pools[2].tolist()) for o in objs)
    assert all(o["label"] == labels[o["digit"]] for o in objs)


def test_summary_reports_no_shared_digits(built):
    stamp = json.loads((built / STAMP_NAME).read_text())
    s = stamp["summary"]
    assert s["distinct_digits"]["shared"] == 0
    assert s["images"] == {"trainval": 12, "train": 6, "val": 6, "test": 8}
    assert list(s["per_class"]) == list(DIGIT_CLASSES)
    n_xml = sum(len(ET.parse(p).getroot().findall("object")) for p in (built / "Annotations").glob("*.xml"))
    assert s["objects"]["trainval"] + s["objects"]["test"] == n_xml == sum(s["per_class"].values())


def test_tiny_objects_are_difficult_in_xml(tmp_path):
    p = DigitsParams(object_side=(5.0, 8.0))
    make_digits_dataset(tmp_path / "t", seed=0, n_trainval=2, n_test=1, params=p)
    objs = [o for x in (tmp_path / "t" / "Annotations").glob("*.xml") for o in ET.parse(x).getroot().iter("object")]
    assert objs and all(o.findtext("difficult") == "1" for o in objs)
    flags = {ln.split()[1] for ln in (tmp_path / "t/ImageSets/Main/zero_trainval.txt").read_text().splitlines()}
    assert flags <= {"0", "-1"}  # only difficult instances -> 0 in the per-class file


def test_second_run_skips(built):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}
    s = make_digits_dataset(built, **SMALL)
    assert s["skipped"] and s["images"]["test"] == 8
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()} == before


def test_stamp_logic(tmp_path):
    out = tmp_path / "d"
    make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)
    with pytest.raises(DatasetExistsError, match="seed: 0 -> 1"):
        make_digits_dataset(out, seed=1, n_trainval=2, n_test=1)
    s = make_digits_dataset(out, seed=1, n_trainval=2, n_test=1, force=True)
    assert not s["skipped"]
    assert json.loads((out / STAMP_NAME).read_text())["params"]["seed"] == 1
    assert not list(tmp_path.glob(".d.*"))  # no temp or old folders left
    # a stamp from another generator version is not "already built"
    stamp = json.loads((out / STAMP_NAME).read_text())
    (out / STAMP_NAME).write_text(json.dumps({**stamp, "version": -1, "key": "made-by-version--1"}))
    with pytest.raises(DatasetExistsError, match="version"):
        make_digits_dataset(out, seed=1, n_trainval=2, n_test=1)


def test_a_changed_file_makes_the_set_be_rebuilt(tmp_path, caplog):
    """The stamp records every file's SHA-1: an image damaged in place or a deleted annotation is
    seen on the next run, named, and the set rebuilt to the same bytes."""
    out = tmp_path / "d"
    make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)
    jpg = sorted((out / "JPEGImages").glob("*.jpg"))[0]
    good = jpg.read_bytes()
    jpg.write_bytes(good[:100] + b"\x00" * 50 + good[150:])
    (out / "Annotations" / "000002.xml").unlink()
    with caplog.at_level("WARNING"):
        s = make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)
    assert not s["skipped"] and jpg.name in caplog.text and "000002.xml" in caplog.text
    assert jpg.read_bytes() == good and (out / "Annotations" / "000002.xml").is_file()
    assert make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)["skipped"]


def test_refuses_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(DatasetExistsError):
            make_digits_dataset(out, seed=0, n_trainval=2, n_test=1, force=force)
    assert (out / "notes.txt").read_text() == "keep me"
    # a VOC-looking folder without a stamp (not finished): needs --force, then it is replaced
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    with pytest.raises(DatasetExistsError, match="not a finished"):
        make_digits_dataset(voc, seed=0, n_trainval=2, n_test=1)
    make_digits_dataset(voc, seed=0, n_trainval=2, n_test=1, force=True)
    assert (voc / STAMP_NAME).is_file()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "x"
    real = dg._render_task
    calls = []

    def flaky(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(dg, "_render_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_digits_dataset(out, seed=0, n_trainval=4, n_test=2)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # a partial folder left by a killed run (dead pid) is removed by the next run
    monkeypatch.setattr(dg, "_render_task", real)
    stale = tmp_path / ".x.999999999.tmp"
    (stale / "JPEGImages").mkdir(parents=True)
    make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)
    assert not stale.exists() and (out / STAMP_NAME).is_file()


def test_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="n_trainval"):
        make_digits_dataset(tmp_path / "z", n_trainval=1, n_test=1)


def test_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset", Path(__file__).parents[1] / "tools/make_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cli"
    assert mod.main(["--out", str(out), "--trainval", "2", "--test", "1", "--workers", "1"]) == 0
    capsys.readouterr()
    assert mod.main(["--out", str(out), "--trainval", "2", "--test", "1", "--seed", "3"]) == 2  # clear error
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out} already holds") and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # a bad count is argparse's error
        mod.main(["--out", str(out), "--trainval", "1", "--test", "1"])
    assert e.value.code == 2 and "need --trainval >= 2" in capsys.readouterr().err
    assert mod.main(["--out", str(out), "--trainval", "2", "--test", "1", "--seed", "3", "--force"]) == 0
    assert os.path.isfile(out / STAMP_NAME)
    assert json.loads((out / STAMP_NAME).read_text())["params"]["seed"] == 3


def test_workers_import_no_torch_and_package_exports_resolve():
    # spawned workers import digits_build; detector.data resolves its exports lazily so that import
    # stays free of torch and PIL (voc / crops)
    import subprocess
    import sys

    code = ("import sys, detector.data.digits_build; "
            "assert 'torch' not in sys.modules and 'PIL.Image' not in sys.modules, 'heavy import'; "
            "import detector.data as d; assert all(getattr(d, n) is not None for n in d.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_stamp_without_file_hashes_is_rebuilt_to_the_same_set(tmp_path):
    """A set made before stamps carried a key and file hashes is rebuilt (same bytes), not refused."""
    out = tmp_path / "d"
    make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)
    jpgs = {p.name: p.read_bytes() for p in (out / "JPEGImages").glob("*.jpg")}
    stamp = json.loads((out / STAMP_NAME).read_text())
    (out / STAMP_NAME).write_text(json.dumps({k: v for k, v in stamp.items() if k not in ("key", "files")}))
    assert not make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)["skipped"]
    assert {p.name: p.read_bytes() for p in (out / "JPEGImages").glob("*.jpg")} == jpgs
    assert make_digits_dataset(out, seed=0, n_trainval=2, n_test=1)["skipped"]
