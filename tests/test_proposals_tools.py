"""tools/compute_proposals.py and tools/proposal_recall.py end to end on a two-image VOC folder, and
their user errors (one ``error:`` line, exit code 2)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _voc(root: Path) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    objs = {"a": [((10, 10, 49, 49), 0), ((60, 20, 89, 69), 1)], "b": [((5, 5, 40, 30), 0)]}
    for i, (image_id, boxes) in enumerate(objs.items()):
        img = np.full((80, 100, 3), 120, np.uint8)
        for (x1, y1, x2, y2), _ in boxes:
            cv2.rectangle(img, (x1 - 1, y1 - 1), (x2 - 1, y2 - 1), (20 + 80 * i, 200, 40), -1)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.png"), img)
        xml = "".join(
            f"<object><name>cell</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for (x1, y1, x2, y2), d in boxes)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>100</width><height>80</height><depth>3</depth></size>"
            f"{xml}</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\nb\n")


def test_compute_then_recall(tmp_path, capsys):
    root = tmp_path / "voc"
    _voc(root)
    out = tmp_path / "props.npz"
    assert _tool("compute_proposals").main(
        ["--data-root", str(root), "--split", "test", "--out", str(out), "--workers", "1",
         "--mode", "fast+", "--no-progress"]) == 0
    assert out.is_file() and not (tmp_path / "props.npz.parts").exists()
    assert _tool("proposal_recall").main(
        ["--data-root", str(root), "--split", "test", "--proposals", str(out),
         "--out", str(tmp_path / "rec")]) == 0
    text = capsys.readouterr().out
    assert "2 objects (1 difficult excluded)" in text
    res = json.loads((tmp_path / "rec" / "recall.json").read_text())
    assert res["num_gt"] == 2 and res["rows"][-1]["k"] == "all"
    assert res["rows"][-1]["recall@0.5"] == 1.0  # solid rectangles on a flat background
    # one class: its row (every proposal) is the overall "all" row
    assert [(c["class"], c["objects"]) for c in res["per_class"]] == [("cell", 2)]
    assert all(res["per_class"][0][k] == res["rows"][-1][k] for k in ("recall@0.5", "recall@0.7", "AR"))
    assert (tmp_path / "rec" / "recall.png").stat().st_size > 1000


def test_compute_missing_split_is_a_clean_exit(tmp_path, capsys):
    rc = _tool("compute_proposals").main(["--data-root", str(tmp_path), "--split", "test",
                                          "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: split file not found") and "Traceback" not in err


def test_recall_user_errors_are_one_line(tmp_path, capsys):
    root = tmp_path / "voc"
    _voc(root)
    recall = _tool("proposal_recall").main
    args = ["--data-root", str(root), "--split", "test", "--proposals"]
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    for path, words in ((tmp_path / "none.npz", "none.npz"), (tmp_path / "bad.npz", "bad.npz")):
        assert recall(args + [str(path)]) == 2
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith("error: ") and words in errors[0], err
        assert "Traceback" not in err
    assert recall(["--data-root", str(root), "--split", "nosplit", "--proposals", str(tmp_path / "none.npz")]) == 2
    assert capsys.readouterr().err.startswith("error: split file not found")
