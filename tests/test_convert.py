"""detector.data.convert and ``sppnet convert``: VOC <-> COCO round trips, and the acceptance check of
issue 21: BCCD and a tiny digits set read through COCO json give the same records and the same mAP
as through VOC."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from detector.commands.convert import main as convert_main
from detector.data.coco import category_ids, load_coco_split
from detector.data.convert import coco_to_voc, voc_to_coco
from detector.data.records import DataError
from detector.data.voc import load_voc_split, read_split_ids

REPO = Path(__file__).resolve().parents[1]


def obj(name: str, box, difficult: int = 0) -> str:
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Unspecified</pose><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def make_voc(root: Path, images: dict[str, list[str]], splits: dict[str, list[str]], size=(40, 30)) -> Path:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    w, h = size
    for image_id, objs in images.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{''.join(objs)}</annotation>")
        Image.new("RGB", (w, h), (100, 50, 0)).save(root / "JPEGImages" / f"{image_id}.jpg")
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _bndboxes(xml: Path) -> list[tuple[str, str, list[str]]]:
    """(name, difficult, [xmin, ymin, xmax, ymax] as written) of every object of a VOC XML."""
    root = ET.parse(xml).getroot()
    return [(o.findtext("name"), o.findtext("difficult"),
             [o.find("bndbox").findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]) for o in root.iter("object")]


def _same_records(a, b, *, paths: bool = False) -> None:
    assert [r.image_id for r in a] == [r.image_id for r in b]
    for x, y in zip(a, b):
        assert (x.height, x.width) == (y.height, y.width), x.image_id
        assert torch.equal(x.boxes, y.boxes), x.image_id
        assert torch.equal(x.labels, y.labels) and torch.equal(x.difficult, y.difficult), x.image_id
        if paths:
            assert x.path == y.path


IMAGES = {
    "a": [obj("dog", (1, 1, 10, 20)), obj("cat", (5, 2, 12, 8), difficult=1), obj("dog", (20, 10, 40, 30))],
    "b": [],
    "c": [obj("cat", (0, -3, 45, 20)), obj("bird", (3, 4, 3, 9))],  # beyond the image; a single click
    "d": [obj("dog", (2.5, 3, 17.25, 9))],  # float corners
}
SPLITS = {"trainval": ["a", "b", "c"], "test": ["d", "a"]}


def test_voc_coco_voc_round_trip_is_exact(tmp_path: Path, caplog):
    voc = make_voc(tmp_path / "voc", IMAGES, SPLITS)
    rep = voc_to_coco(voc, ["trainval", "test"], tmp_path / "coco")
    assert rep.classes == ("bird", "cat", "dog") and rep.images == 4 and rep.one_pixel == 1
    assert any("single click" in m for m in caplog.messages)
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_trainval.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    a = [x for x in data["annotations"] if x["image_id"] == 1]
    assert [x["bbox"] for x in a] == [[0, 0, 10, 20], [4, 1, 8, 7], [19, 9, 21, 21]]  # VOC 1..10 -> x 0, w 10
    assert [x["iscrowd"] for x in a] == [0, 1, 0]  # difficult -> iscrowd
    test = json.loads((tmp_path / "coco" / "annotations" / "instances_test.json").read_text())
    assert {i["file_name"]: i["id"] for i in test["images"]} == {"d.jpg": 4, "a.jpg": 1}  # one id per image
    assert test["annotations"][0]["bbox"] == [1.5, 2, 15.75, 7]  # VOC 2.5..17.25 -> x 1.5, w 15.75
    # the COCO reader gives the VOC reader's records (as annotated, and for training except the click)
    for split in SPLITS:
        _same_records(load_voc_split(voc, split, raw_boxes=True)[0],
                      load_coco_split(tmp_path / "coco", split, raw_boxes=True)[0])
    train_voc = load_voc_split(voc, "trainval")[0]
    train_coco = load_coco_split(tmp_path / "coco", "trainval")[0]
    assert train_coco[2].boxes.shape[0] == train_voc[2].boxes.shape[0] + 1  # the click: 1 px wide in COCO
    # ... and back: the same XML corners, difficult flags and split files
    rep = coco_to_voc(tmp_path / "coco", ["trainval", "test"], tmp_path / "back")
    assert rep.images == 4
    for image_id in IMAGES:
        assert _bndboxes(tmp_path / "back" / "Annotations" / f"{image_id}.xml") == \
            _bndboxes(voc / "Annotations" / f"{image_id}.xml"), image_id
    for split, ids in SPLITS.items():
        assert read_split_ids(tmp_path / "back", split) == ids
        _same_records(load_voc_split(voc, split, raw_boxes=True)[0],
                      load_voc_split(tmp_path / "back", split, raw_boxes=True)[0])
    assert (tmp_path / "back" / "JPEGImages" / "a.jpg").read_bytes() == (voc / "JPEGImages" / "a.jpg").read_bytes()


def test_image_modes_and_coco_extensions(tmp_path: Path):
    voc = make_voc(tmp_path / "voc", IMAGES, SPLITS)
    voc_to_coco(voc, ["test"], tmp_path / "linked", images="symlink")
    assert (tmp_path / "linked" / "images" / "a.jpg").is_symlink()
    voc_to_coco(voc, ["test"], tmp_path / "bare", images="none")
    assert not (tmp_path / "bare" / "images").exists()
    load_coco_split(tmp_path / "bare", "test", require_images=False)
    # COCO images that are not .jpg/.jpeg/.png become PNG; an upper-case extension is lower-cased
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(coco / "images" / "x.bmp")
    Image.new("RGB", (20, 10)).save(coco / "images" / "Y.JPG", format="JPEG")
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "x.bmp", "width": 20, "height": 10},
                   {"id": 9, "file_name": "Y.JPG", "width": 20, "height": 10}],
        "annotations": [{"id": 1, "image_id": 9, "category_id": 5, "bbox": [2, 2, 5, 5], "iscrowd": 1}],
        "categories": [{"id": 5, "name": "thing"}]}))
    coco_to_voc(coco, ["val"], tmp_path / "voc2")
    assert sorted(p.name for p in (tmp_path / "voc2" / "JPEGImages").iterdir()) == ["Y.jpg", "x.png"]
    recs, classes = load_voc_split(tmp_path / "voc2", "val")
    assert classes == ("thing",) and recs[1].difficult.tolist() == [True]  # iscrowd -> difficult
    assert recs[1].boxes.tolist() == [[2, 2, 7, 7]]
    with pytest.raises(DataError, match="is the input folder"):
        voc_to_coco(voc, ["test"], voc)


def test_convert_command(tmp_path: Path, capsys):
    voc = make_voc(tmp_path / "voc", IMAGES, SPLITS)
    assert convert_main([str(voc), str(tmp_path / "coco"), "--to", "coco", "--splits", "trainval", "test"]) == 0
    out = capsys.readouterr().out
    assert "trainval: 3 images, 5 objects (1 difficult/crowd)" in out and "instances_test.json" in out
    assert convert_main([str(tmp_path / "coco"), str(tmp_path / "back"), "--to", "voc", "--splits", "test",
                         "--images", "none"]) == 0
    assert read_split_ids(tmp_path / "back", "test") == ["d", "a"]
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "voc", "--splits", "test"]) == 2
    assert "error: COCO annotation file not found" in capsys.readouterr().err
    r = subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--to" in r.stdout


def test_bccd_through_coco_gives_the_same_records_and_map(bccd_root: Path, tmp_path: Path):
    """Acceptance (issue 21): BCCD's test split converted to COCO reads back as the VOC reader's
    records, and the same detections score the same VOC mAP and COCO AP through both readers;
    pycocotools on the converted json gives the project's COCO figure."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detector.eval import coco_evaluate, evaluate
    from detector.eval.jitter import jitter_detections

    voc_to_coco(bccd_root, ["test"], tmp_path, images="symlink")
    classes = ("RBC", "WBC", "Platelets")
    for raw in (True, False):
        voc, _ = load_voc_split(bccd_root, "test", classes, raw_boxes=raw, log_summary=False)
        coco, _ = load_coco_split(tmp_path, "test", classes, raw_boxes=raw, log_summary=False)
        _same_records(voc, coco)
    assert len(coco) == 72 and sum(len(r.labels) for r in coco) == 945
    assert [r.coco_id for r in coco] == list(range(1, 73))
    dets = jitter_detections(voc, len(classes), noise=0.08, miss=0.1, dup=0.05, fp=1.0,
                             generator=torch.Generator().manual_seed(0))
    figures = {}
    for name, recs, cats in (("voc", voc, None), ("coco", coco, category_ids(tmp_path, "test", classes))):
        figures[name] = {"mAP07": evaluate(recs, classes, dets, metric="07").mAP,
                         "mAParea": evaluate(recs, classes, dets, metric="area").mAP,
                         **coco_evaluate(recs, classes, dets, category_ids=cats, out_dir=tmp_path / f"eval_{name}")}
    print("\nBCCD test, jittered ground truth (seed 0):",
          *(f"{k}: " + ", ".join(f"{m} {v:.6f}" for m, v in f.items()) for k, f in figures.items()), sep="\n  ")
    # VOC figures exactly; COCO's to the last bits: COCOeval averages over categories in id order,
    # and the json's ids (1..3 in sorted-name order) order the classes differently from 1..K here
    assert {k: figures["coco"][k] for k in ("mAP07", "mAParea")} == {k: figures["voc"][k] for k in ("mAP07", "mAParea")}
    for k in ("AP", "AP50", "AP75"):
        assert figures["coco"][k] == pytest.approx(figures["voc"][k], abs=1e-12)
    assert 0.5 < figures["voc"]["mAP07"] < 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "annotations" / "instances_test.json"))
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "eval_coco" / "coco_dets.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(figures["coco"]["AP"], abs=1e-12)


def _map_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_tiny_digits_through_coco_scores_as_through_voc(tiny_run, tmp_path: Path):
    """The tiny digits set converted to COCO: training reads it (--stop-after proposals) and the model
    trained on the VOC version scores the same mAP and COCO figures on the COCO version."""
    import yaml

    root, cfg_path, _, test_voc = tiny_run
    coco = tmp_path / "coco"
    voc_to_coco(root / "digits", ["trainval", "test"], coco, images="symlink")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"].update(root=str(coco), format="coco")
    cfg["output_dir"] = str(tmp_path / "run")
    cfg_coco = tmp_path / "tiny_coco.yaml"
    cfg_coco.write_text(yaml.safe_dump(cfg))
    train = subprocess.run([sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg_coco),
                            "--stop-after", "proposals"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "stopped after proposals" in train.stdout and "COCO" in train.stderr
    test = subprocess.run([sys.executable, str(REPO / "tools/test_net.py"), "--config", str(cfg_coco),
                           "--checkpoint", str(root / "run" / "model.pt"), "--time-proposals", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    print(f"\ntiny digits, model trained on VOC: VOC data {_map_line(test_voc.stdout)}, "
          f"COCO data {_map_line(test.stdout)}")
    assert re.fullmatch(r"mAP: \d\.\d{6}", _map_line(test.stdout))
    assert _map_line(test.stdout) == _map_line(test_voc.stdout)
    voc_eval = json.loads((root / "run" / "test_test" / "eval.json").read_text())
    coco_eval = json.loads((tmp_path / "run" / "test_test" / "eval.json").read_text())
    assert coco_eval["mAP"] == voc_eval["mAP"] and coco_eval["classes"] == voc_eval["classes"]
    assert coco_eval["coco"] == pytest.approx(voc_eval["coco"], abs=1e-12)  # category order (see the BCCD test)
    ids = {i["file_name"][:-4]: i["id"] for i in
           json.loads((coco / "annotations" / "instances_test.json").read_text())["images"]}
    res = json.loads((tmp_path / "run" / "test_test" / "coco_dets.json").read_text())
    assert res and {d["image_id"] for d in res} <= set(ids.values())


def test_split_tools_take_coco_data(tmp_path: Path, capsys):
    """eval, jitter-comp4, recall and proposals read a COCO-json split with --format coco and give
    what they give on the same split in VOC layout."""
    from detector.commands.eval import main as eval_main
    from detector.commands.jitter_comp4 import main as jitter_main
    from detector.commands.proposals import main as proposals_main
    from detector.commands.recall import main as recall_main

    voc = make_voc(tmp_path / "voc", IMAGES, SPLITS, size=(64, 48))
    coco = tmp_path / "coco"
    voc_to_coco(voc, ["test"], coco, images="copy")
    for fmt, root in (("voc", voc), ("coco", coco)):
        assert jitter_main(["--data-root", str(root), "--split", "test", "--out", str(tmp_path / f"res_{fmt}"),
                            "--seed", "1", "--format", fmt]) == 0
    for name in sorted(p.name for p in (tmp_path / "res_voc").iterdir()):  # the same detections
        assert (tmp_path / "res_voc" / name).read_bytes() == (tmp_path / "res_coco" / name).read_bytes()
    capsys.readouterr()
    maps = {}
    for fmt, root in (("voc", voc), ("coco", coco)):
        assert eval_main(["--data-root", str(root), "--split", "test", "--results", str(tmp_path / "res_voc"),
                          "--no-coco", "--format", fmt]) == 0
        maps[fmt] = capsys.readouterr().out.strip().splitlines()[-1]
    assert maps["voc"] == maps["coco"] and maps["voc"].startswith("mAP: ")
    props = {}
    for fmt, root in (("voc", voc), ("coco", coco)):
        out = tmp_path / f"props_{fmt}.npz"
        assert proposals_main(["--data-root", str(root), "--split", "test", "--out", str(out), "--workers", "0",
                               "--no-progress", "--format", fmt]) == 0
        props[fmt] = out
        assert recall_main(["--data-root", str(root), "--split", "test", "--proposals", str(out),
                            "--format", fmt]) == 0
        maps[f"recall_{fmt}"] = capsys.readouterr().out
    import numpy as np

    a, b = np.load(props["voc"]), np.load(props["coco"])
    assert list(a["ids"]) == list(b["ids"]) and np.array_equal(a["boxes"], b["boxes"])
    assert maps["recall_voc"].replace("props_voc", "props_coco") == maps["recall_coco"]
    assert eval_main(["--data-root", str(voc), "--split", "test", "--results", str(tmp_path / "res_voc"),
                      "--format", "coco"]) == 2  # a VOC folder read as COCO: one error line
    assert "error:" in capsys.readouterr().err
