"""A permanent corpus of bad inputs, run through every library call and tool that reads them.

The reliability standard: bad input gets a clear error naming the file or key (exit code 2 from a
tool), or a documented, warned handling; never a traceback from deep inside, never a silently
changed result, never lost work. Each case below is one bad input (or an unusual one the project
converts) fed to one reader; its outcome is classified as

* ``clear``: a user error (``detector.cli.user_errors()``) whose message names the file or key; from a
  tool, exit code 2 with exactly one line ``error: ...`` on stderr that names it, and no traceback;
* ``handled``: success, with a warning that names the input and says what was done (a truncated
  JPEG decoded with its missing part grey, a degenerate box skipped). Inputs of a documented form
  that the library converts (a PIL mode, a 16-bit or palette file) need no warning: nothing about
  them is wrong, and their result is compared with what the input means instead;
* ``traceback``: any other exception, a user error that does not name the input, a tool exit code
  other than 0 and 2, or "Traceback" on a tool's stderr;
* ``silent``: success where the input was bad and no warning named it, or a result that differs
  from what the input means (a CMYK image detected as if it were RGBA), or a file that ran code.

Each case declares the outcome it must have (clear or handled), so a regression either way fails,
and the test prints one summary line (``pytest -s``). Tools run in-process through their ``main``.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import pickle
import shutil
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image

from detector import SPPDetector
from detector.bench.random_model import random_detector
from detector.cli import user_errors
from detector.config import load_config
from detector.data.coco import load_coco_split
from detector.data.convert import voc_to_coco
from detector.data.voc import load_voc_split
from detector.eval.comp4 import read_comp4
from detector.eval.score_files import score_comp4_files
from proposals import load_proposals
from proposals.imageio import read_image

TOOLS = Path(__file__).resolve().parents[1] / "tools"
CLASSES = ("class0", "class1")  # random_detector's class names: the tiny VOC folder uses them
IDS = ("img_001", "img_002", "img_003")
SPLIT = "s"
SIDE = 64  # px, the tiny VOC folder's images


# ------------------------------------------------------------------------------------------------
# cases and their classification


@dataclass
class Tool:
    """What a tool run in-process gave: exit code, stdout, stderr, and the log records' text."""

    rc: int
    out: str
    err: str
    log: str


@dataclass
class Case:
    """One bad input through one reader.

    Attributes:
        kind: what is read ("image", "voc", "coco", "comp4", "proposals", "config", "checkpoint").
        name: the input, and the reader after a colon.
        expect: "clear" or "handled".
        run: the call; a tool's call returns :class:`Tool`.
        names: what the error or the warning must contain (the file's name, the key).
        says: for a warning, what it must also say (what was done).
        warn: False for a documented conversion of a well-formed input (no warning needed; ``check``
            compares the result with what the input means).
        check: a success's result -> None when it means what the input means, else the difference.
        after: -> None, or what went wrong whatever the outcome (a file that ran code).
    """

    kind: str
    name: str
    expect: str
    run: Callable[[], Any]
    names: tuple[str, ...]
    says: tuple[str, ...] = ()
    warn: bool = True
    check: Callable[[Any], str | None] | None = None
    after: Callable[[], str | None] | None = None


@dataclass
class Outcome:
    case: Case
    got: str
    detail: str = ""


def _warned(lines: list[str], case: Case) -> bool:
    return any(all(n in ln for n in case.names + case.says) for ln in lines)


def _classify(case: Case, capsys, caplog) -> Outcome:
    capsys.readouterr()
    caplog.clear()
    try:
        value = case.run()
    except user_errors() as e:
        msg = str(e)
        if all(n in msg for n in case.names):
            got = Outcome(case, "clear", f"{type(e).__name__}: {msg.splitlines()[0]}")
        else:
            got = Outcome(case, "traceback", f"{type(e).__name__} does not name {case.names}: {msg}")
    except Exception as e:  # noqa: BLE001 - what the corpus is looking for
        got = Outcome(case, "traceback", "".join(traceback.format_exception_only(type(e), e)).strip()
                      + "\n" + "".join(traceback.format_tb(e.__traceback__)[-3:]))
    else:
        got = _classify_value(case, value, capsys.readouterr().err.splitlines()
                              + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING])
    problem = case.after() if case.after else None
    if problem:
        got = Outcome(case, "silent", problem)
    return got


def _classify_value(case: Case, value: Any, warnings: list[str]) -> Outcome:
    if isinstance(value, Tool):
        if "Traceback" in value.err:
            return Outcome(case, "traceback", value.err[-2000:])
        if value.rc == 2:
            errors = [ln for ln in value.err.splitlines() if ln.startswith("error:")]
            block = value.err[value.err.find("error:"):]  # the error line and its continuation lines
            if len(errors) == 1 and all(n in block for n in case.names):
                return Outcome(case, "clear", errors[0])
            return Outcome(case, "traceback", f"exit 2 without one error line naming {case.names}: {value.err[-800:]}")
        if value.rc != 0:
            return Outcome(case, "traceback", f"exit code {value.rc}: {value.err[-800:]}")
        warnings = value.err.splitlines() + value.log.splitlines()
    problem = case.check(value) if case.check else None
    if problem:
        return Outcome(case, "silent", f"result differs from what the input means: {problem}")
    if not case.warn:
        return Outcome(case, "handled", "documented conversion, result checked")
    if _warned(warnings, case):
        return Outcome(case, "handled", next(ln for ln in warnings if all(n in ln for n in case.names + case.says)))
    return Outcome(case, "silent", f"no warning naming {case.names + case.says}")


_TOOL_MODULES: dict[str, Any] = {}


def _tool(name: str):
    if name not in _TOOL_MODULES:
        spec = importlib.util.spec_from_file_location(f"_corpus_tool_{name}", TOOLS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _TOOL_MODULES[name] = mod
    return _TOOL_MODULES[name]


def _tool_run(name: str, argv: list[str], capsys, caplog) -> Tool:
    """``tools/<name>.py`` main(argv) in-process; the logging it sets up is undone afterwards."""
    capsys.readouterr()
    caplog.clear()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        rc = _tool(name).main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    cap = capsys.readouterr()
    return Tool(rc, cap.out, cap.err, caplog.text)


# ------------------------------------------------------------------------------------------------
# inputs


def _rgb() -> np.ndarray:
    """64x80 RGB: two flat colours (they survive palette quantisation) and a band of noise."""
    g = np.random.default_rng(0)
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (200, 40, 10)
    img[:, 40:] = (10, 160, 220)
    img[20:30] = g.integers(0, 255, (10, 80, 3), dtype=np.uint8)
    return img


PROPOSALS = np.array([[4, 4, 40, 40], [20, 10, 70, 60], [0, 0, 80, 64]], np.float32)


def _pil_modes(rgb: np.ndarray) -> dict[str, Image.Image]:
    """An image of every PIL mode, made from ``rgb`` (grey modes from its red channel)."""
    base = Image.fromarray(rgb)
    red = rgb[..., 0]
    out = {m: base.convert(m) for m in ("1", "L", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")}
    out["P"] = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)  # not dithered: near the image
    out["PA"] = out["P"].convert("PA")
    for m in ("PA", "LA", "RGBA"):  # some transparent pixels: the alpha is dropped, not composited
        a = np.full(red.shape, 255, np.uint8)
        a[:8] = 0
        out[m].putalpha(Image.fromarray(a))
    out["I;16"] = Image.fromarray(red.astype(np.uint16) * 257)  # full 16-bit range
    out["I"] = Image.fromarray(red.astype(np.int32) * 257, mode="I")
    out["F"] = Image.fromarray(red.astype(np.float32))
    assert {m: im.mode for m, im in out.items()} == {m: m for m in out}
    return out


def _meaning(im: Image.Image) -> np.ndarray:
    """What a PIL image means as 8-bit RGB: PIL's own conversion; 16-bit grey keeps its top 8 bits."""
    if im.mode in ("I;16", "I"):
        return np.repeat((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _close(got: np.ndarray, want: np.ndarray, tol: float) -> str | None:
    if got.shape != want.shape or got.dtype != np.uint8:
        return f"got {got.dtype} {got.shape}, want uint8 {want.shape}"
    d = float(np.abs(got.astype(int) - want.astype(int)).mean())
    return None if d <= tol else f"mean |difference| {d:.2f} > {tol} from the reference conversion"


def _same_detections(a: dict, b: dict) -> str | None:
    ok = all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    return None if ok else "detections differ from those of the reference RGB image"


def _obj(name: str, box, bndbox: bool = True) -> str:
    x1, y1, x2, y2 = box
    bb = f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>" if bndbox else ""
    return f"<object><name>{name}</name><difficult>0</difficult>{bb}</object>"


def _xml(objs: list[str], size: bool = True) -> str:
    sz = f"<size><width>{SIDE}</width><height>{SIDE}</height><depth>3</depth></size>" if size else ""
    return f"<annotation>{sz}{''.join(objs)}</annotation>"


def _voc(root: Path) -> Path:
    """A tiny VOC folder: three 64x64 JPEGs with one object each, split ``s``."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(IDS):
        img = np.full((SIDE, SIDE, 3), 110, np.uint8)
        cv2.rectangle(img, (10 + 5 * i, 12), (45, 50), (30, 200, 60), -1)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), img)
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml([_obj(CLASSES[i % 2], (11 + 5 * i, 13, 46, 51))]))
    (root / "ImageSets" / "Main" / f"{SPLIT}.txt").write_text("\n".join(IDS) + "\n")
    return root


CONFIG = """\
name: corpus
output_dir: {out}
num_threads: 1
data: {{root: {root}, train_split: {split}, test_split: {split}, classes: [class0, class1], val_fraction: 0.0}}
proposals: {{workers: 1, max_boxes: 30, ss_side: 64}}
backbone: {{arch: zf5, width_mult: 0.125}}
features: {{train_scales: [96], test_scales: [96], target_side: 64}}
head: {{fc_dim: 16}}
"""


class _RunsCode:
    """A pickled object that, when unpickled, would create ``path`` (it must never exist)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _Foreign:
    """A class of this test module: unpickling one would import this module and call __setstate__,
    which creates ``path`` (it must never exist)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __setstate__(self, state: dict) -> None:
        Path(state["path"]).touch()


def _no_file(path: Path) -> Callable[[], str | None]:
    return lambda: f"loading ran code: {path.name} was created" if path.exists() else None


# ------------------------------------------------------------------------------------------------
# the corpus


def _image_cases(tmp: Path, det: SPPDetector) -> list[Case]:
    rgb = _rgb()
    cases: list[Case] = []
    dets_of = lambda img: det.detect(img, proposals=PROPOSALS)  # noqa: E731
    # every PIL mode, in memory, through detect
    for mode, im in _pil_modes(rgb).items():
        if mode == "F":
            cases.append(Case("image", "PIL mode F: detect", "clear", lambda im=im: dets_of(im), ("mode 'F'",)))
            continue
        want = _meaning(im)

        def check(out, want=want, mode=mode):
            if mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):  # colour modes: the reference is the image
                bad = _close(want, rgb, 4.0)
                if bad:
                    return f"reference conversion: {bad}"
            return _same_detections(out, dets_of(want))

        cases.append(Case("image", f"PIL mode {mode}: detect", "handled", lambda im=im: dets_of(im),
                          (f"mode {mode}",), warn=False, check=check))
    # every PIL mode that a file format holds (PNG, else TIFF), as a file, through read_image
    for mode, im in _pil_modes(rgb).items():
        ext = ".png" if mode in ("1", "L", "P", "LA", "RGBA", "I;16") else ".tif"
        path = tmp / f"mode_{mode.replace(';', '_')}{ext}"
        try:
            im.save(path)
        except OSError:  # HSV: no file format holds it
            continue
        if mode == "F":
            cases.append(Case("image", f"{path.name}: read_image", "clear", lambda p=path: read_image(p), (path.name,)))
            continue
        with Image.open(path) as back:
            want = _meaning(back)
        cases.append(Case("image", f"{path.name} (PIL mode {mode}): read_image", "handled",
                          lambda p=path: read_image(p), (path.name,), warn=False,
                          check=lambda got, want=want: _close(got, want, 1.0)))
    # integer TIFFs outside 16 bits: refused by name (their top 8 bits would not be the image)
    wide = (rgb[..., 0].astype(np.int32) * 257) * 100
    Image.fromarray(wide, mode="I").save(tmp / "int32_wide.tif")
    cv2.imwrite(str(tmp / "int16_negative.tif"), rgb[..., 0].astype(np.int16) - 200)
    for fname in ("int32_wide.tif", "int16_negative.tif"):
        cases.append(Case("image", f"{fname}: read_image", "clear", lambda p=tmp / fname: read_image(p),
                          (fname, "0..65535")))
    # 16-bit PNG, CMYK JPEG, palette PNG
    v16 = (np.random.default_rng(1).random((64, 80)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp / "grey16.png"), v16)
    Image.fromarray(rgb).convert("CMYK").save(tmp / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(tmp / "palette.png")
    refs = {"grey16.png": np.repeat((v16 >> 8).astype(np.uint8)[..., None], 3, axis=2),
            "cmyk.jpg": rgb, "palette.png": np.asarray(Image.open(tmp / "palette.png").convert("RGB"))}
    tols = {"grey16.png": 0.0, "cmyk.jpg": 3.0, "palette.png": 0.0}  # cmyk.jpg: JPEG loss
    for fname, want in refs.items():
        p = tmp / fname
        cases.append(Case("image", f"{fname}: read_image", "handled", lambda p=p: read_image(p), (fname,), warn=False,
                          check=lambda got, want=want, t=tols[fname]: _close(got, want, t)))
        cases.append(Case("image", f"{fname}: detect(path)", "handled", lambda p=p: dets_of(str(p)), (fname,),
                          warn=False, check=lambda out, p=p: _same_detections(out, dets_of(read_image(p)))))
    # broken, empty, mislabelled, huge and tiny files
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    (tmp / "cut.jpg").write_bytes(jpg.tobytes()[:-20])
    (tmp / "empty.jpg").write_bytes(b"")
    (tmp / "notes.jpg").write_text("this is a text file, not a picture\n")
    cv2.imwrite(str(tmp / "huge.png"), np.full((40, 10001, 3), 90, np.uint8))
    cv2.imwrite(str(tmp / "tiny.png"), np.full((10, 10, 3), 90, np.uint8))
    for fname, expect, names, says in (("cut.jpg", "handled", ("cut.jpg",), ("truncated", "grey")),
                                       ("empty.jpg", "clear", ("empty.jpg", "empty"), ()),
                                       ("notes.jpg", "clear", ("notes.jpg",), ()),
                                       ("huge.png", "clear", ("huge.png", "10001x40"), ()),
                                       ("tiny.png", "clear", ("tiny.png", "10x10"), ())):
        p = tmp / fname
        whole = lambda got: None if got.shape == (64, 80, 3) else f"shape {got.shape}"  # noqa: E731
        check = whole if expect == "handled" else None
        cases.append(Case("image", f"{fname}: read_image", expect, lambda p=p: read_image(p), names, says, check=check))
        cases.append(Case("image", f"{fname}: detect(path)", expect, lambda p=p: dets_of(str(p)), names, says))
    # arrays
    arrays = {"float 0..255": (rgb.astype(np.float32), ("<array>", "float")),
              "2 channels": (rgb[..., :2].copy(), ("<array>", "(64, 80, 2)")),
              "tiny 10x10": (rgb[:10, :10].copy(), ("<array>", "10x10")),
              "huge 10001x40": (np.zeros((40, 10001, 3), np.uint8), ("<array>", "10001x40"))}
    for what, (arr, names) in arrays.items():
        cases.append(Case("image", f"array {what}: detect", "clear", lambda a=arr: dets_of(a), names))
    # given proposals
    no_dets = lambda out: None if len(out["boxes"]) == 0 else f"{len(out['boxes'])} detections"  # noqa: E731
    props = {"inverted": (np.array([[50, 50, 10, 10]], np.float32), "handled"),
             "zero-area": (np.array([[10, 10, 10, 40], [5, 20, 60, 20]], np.float32), "handled"),
             "outside": (np.array([[100, 100, 150, 150], [-60, -60, -1, -1]], np.float32), "handled"),
             "none (0 boxes)": (np.zeros((0, 4), np.float32), "handled"),
             "NaN": (np.array([[1, 2, np.nan, 40]], np.float32), "clear"),
             "wrong shape [R, 3]": (np.array([[1, 2, 30]], np.float32), "clear")}
    for what, (boxes, expect) in props.items():
        names, says = (("<array>", "proposals"), ("no detections" if "none" in what else "cannot yield detections",))
        cases.append(Case("image", f"proposals {what}: detect", expect,
                          lambda b=boxes: det.detect(rgb, proposals=b), names, says if expect == "handled" else (),
                          check=no_dets if expect == "handled" else None))
    return cases


def _records_ok(records: list) -> str | None:
    """The two untouched images of the reader corpus keep their one object each."""
    by_id = {r.image_id: r for r in records}
    if [r.image_id for r in records] != list(IDS):
        return f"records {[r.image_id for r in records]}"
    bad = [i for i in ("img_001", "img_003") if len(by_id[i].boxes) != 1]
    return f"objects lost from {bad}" if bad else None


def _reader_cases(kind: str, what: str, lib: Callable[[], list], cfg: Path, good_ckpt: Path, tool, expect: str,
                  names: tuple, says: tuple, says_raw: tuple) -> list[Case]:
    """One damaged data set through its reader, ``train_detector --stop-after proposals`` and ``test_net``."""
    return [
        Case(kind, f"{what}: load_{kind}_split", expect, lib, names, says,
             check=_records_ok if expect == "handled" else None),
        Case(kind, f"{what}: train_detector --stop-after proposals", expect,
             lambda: tool("train_detector", ["--config", str(cfg), "--stop-after", "proposals"]), names, says),
        Case(kind, f"{what}: test_net", expect,
             lambda: tool("test_net", ["--config", str(cfg), "--checkpoint", str(good_ckpt), "--time-proposals", "0"]),
             names, says_raw),
    ]


def _voc_cases(tmp: Path, good_ckpt: Path, tool) -> list[Case]:
    """Annotation and split problems through load_voc_split, train_detector --stop-after proposals
    and test_net (the split's annotations are read as the evaluation reads them, raw_boxes)."""
    x2 = "img_002.xml"
    split_file = f"{SPLIT}.txt"
    # name -> (mutation of the folder, expected, names, says (training read), says (raw read))
    mutations: dict[str, tuple[Callable[[Path], None], str, tuple, tuple, tuple]] = {
        "broken XML": (lambda r: (r / "Annotations" / x2).write_text("<annotation><size><width>64</wid"),
                       "clear", (x2,), (), ()),
        "missing JPEG": (lambda r: (r / "JPEGImages" / "img_003.jpg").unlink(), "clear", ("img_003", "JPEGImages"),
                         (), ()),
        "missing XML": (lambda r: (r / "Annotations" / "img_003.xml").unlink(), "clear", ("img_003", "Annotations"),
                        (), ()),
        "duplicate ids in the split": (lambda r: (r / "ImageSets/Main" / split_file).write_text(
            "img_001\nimg_002\nimg_001\n"), "clear", (split_file, "img_001"), (), ()),
        "empty split file": (lambda r: (r / "ImageSets/Main" / split_file).write_text("\n \n"), "clear",
                             (split_file, "no images"), (), ()),
        "missing split file": (lambda r: (r / "ImageSets/Main" / split_file).unlink(), "clear", (split_file,), (), ()),
        "object without bndbox": (lambda r: (r / "Annotations" / x2).write_text(
            _xml([_obj("class0", (11, 13, 46, 51)), _obj("class1", (0, 0, 0, 0), bndbox=False)])),
            "handled", (x2,), ("<bndbox> missing", "skipped"), ("<bndbox> missing", "skipped")),
        "degenerate box": (lambda r: (r / "Annotations" / x2).write_text(
            _xml([_obj("class0", (11, 13, 46, 51)), _obj("class1", (30, 30, 20, 40))])),
            "handled", (x2,), ("degenerate", "skipped"), ("degenerate", "kept as annotated")),
        "box outside the image": (lambda r: (r / "Annotations" / x2).write_text(
            _xml([_obj("class0", (11, 13, 46, 51)), _obj("class1", (40, 40, 90, 70))])),
            "handled", (x2,), ("beyond", "clipped"), ("beyond", "kept as annotated")),
        "unknown class": (lambda r: (r / "Annotations" / x2).write_text(
            _xml([_obj("class0", (11, 13, 46, 51)), _obj("zebra", (20, 20, 40, 40))])),
            "handled", (x2, "zebra"), ("skipped",), ("skipped",)),
        "missing <size>": (lambda r: (r / "Annotations" / x2).write_text(
            _xml([_obj("class0", (11, 13, 46, 51))], size=False)),
            "handled", (x2, "<size> missing"), ("64x64",), ("64x64",)),
    }
    base = _voc(tmp / "voc_base")
    cases: list[Case] = []
    for n, (what, (mutate, expect, names, says, says_raw)) in enumerate(mutations.items()):
        root = tmp / f"voc_{n}"
        shutil.copytree(base, root)
        mutate(root)
        cfg = tmp / f"voc_{n}.yaml"
        cfg.write_text(CONFIG.format(out=tmp / f"voc_{n}_run", root=root, split=SPLIT))

        cases += _reader_cases("voc", what, lambda root=root: load_voc_split(root, SPLIT, CLASSES)[0], cfg,
                               good_ckpt, tool, expect, names, says, says_raw)
    return cases


def _coco_cases(tmp: Path, good_ckpt: Path, tool) -> list[Case]:
    """The same problems in a COCO json data set (data.format: coco) through load_coco_split,
    train_detector --stop-after proposals, test_net and convert --to voc."""
    import json

    base = tmp / "coco_base"
    voc_to_coco(_voc(tmp / "voc_src"), [SPLIT], base, classes=CLASSES)
    js = f"instances_{SPLIT}.json"

    def edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
        def mutate(root: Path) -> None:
            p = root / "annotations" / js
            d = json.loads(p.read_text())
            change(d)
            p.write_text(json.dumps(d))
        return mutate

    def ann2(d: dict) -> dict:  # img_002's annotation
        return next(a for a in d["annotations"] if a["image_id"] == 2)

    def dup_id(d: dict) -> None:
        d["images"][2]["id"] = 1

    def no_bbox(d: dict) -> None:
        d["annotations"].append({**ann2(d), "id": 99, "bbox": [1, 2]})

    def extra(d: dict, **kw) -> None:
        d["annotations"].append({**ann2(d), "id": 99, **kw})

    def no_size(d: dict) -> None:
        del d["images"][1]["width"]

    def no_crowd(d: dict) -> None:
        del ann2(d)["iscrowd"]

    mutations: dict[str, tuple[Callable[[Path], None], str, tuple, tuple, tuple]] = {
        "broken json": (lambda r: (r / "annotations" / js).write_text('{"images": [{"id": 1, '), "clear", (js,), (), ()),
        "missing image": (lambda r: (r / "images" / "img_003.jpg").unlink(), "clear", (js, "img_003.jpg"), (), ()),
        "missing json": (lambda r: (r / "annotations" / js).unlink(), "clear", (js,), (), ()),
        "duplicate image id": (edit(dup_id), "clear", (js, "listed more than once"), (), ()),
        "no images": (edit(lambda d: d.update(images=[])), "clear", (js, "no images"), (), ()),
        "bbox not four numbers": (edit(no_bbox), "handled", (js,), ("bbox", "skipped"), ("bbox", "skipped")),
        "degenerate box": (edit(lambda d: extra(d, bbox=[30, 30, -10, 10])), "handled", (js,),
                           ("degenerate", "skipped"), ("degenerate", "kept as annotated")),
        "box outside the image": (edit(lambda d: extra(d, bbox=[40, 40, 50, 30])), "handled", (js,),
                                  ("beyond", "clipped"), ("beyond", "kept as annotated")),
        "undefined category": (edit(lambda d: extra(d, category_id=77)), "handled", (js, "category_id 77"),
                               ("skipped",), ("skipped",)),
        "missing width": (edit(no_size), "handled", (js, "width/height missing"), ("64x64",), ("64x64",)),
        "missing iscrowd": (edit(no_crowd), "handled", (js, "iscrowd missing"), ("set to 0",), ("set to 0",)),
    }
    cases: list[Case] = []
    for n, (what, (mutate, expect, names, says, says_raw)) in enumerate(mutations.items()):
        root = tmp / f"coco_{n}"
        shutil.copytree(base, root)
        mutate(root)
        cfg = tmp / f"coco_{n}.yaml"
        cfg.write_text(CONFIG.format(out=tmp / f"coco_{n}_run", root=root, split=SPLIT)
                       .replace("data: {", "data: {format: coco, "))

        cases += _reader_cases("coco", what, lambda root=root: load_coco_split(root, SPLIT, CLASSES)[0], cfg,
                               good_ckpt, tool, expect, names, says, says_raw)
        cases.append(Case("coco", f"{what}: convert --to voc", expect,
                          lambda root=root, n=n: tool("convert", [str(root), str(tmp / f"coco_{n}_voc"), "--to", "voc",
                                                                  "--splits", SPLIT, "--classes", *CLASSES]),
                          names, says_raw))
    return cases


def _comp4_cases(tmp: Path, tool) -> list[Case]:
    root = _voc(tmp / "voc_comp4")
    f0 = f"comp4_det_{SPLIT}_class0.txt"
    contents: dict[str, tuple[bytes | None, tuple[str, ...]]] = {
        "non-UTF-8 bytes": (b"img_001 0.9 10 10 40 40\nimg_002 \xff\xfe 10 10 40 40\n", (f0, "UTF-8")),
        "wrong field count": (b"img_001 0.9 10 10 40\n", (f0 + ":1", "got 5 fields")),
        "NaN score": (b"img_001 nan 10 10 40 40\n", (f0 + ":1", "non-finite")),
        "unknown image id": (b"img_999 0.9 10 10 40 40\n", (f0 + ":1", "img_999")),
        "missing results folder": (None, ("no_results",)),
        "a class without its file": (b"img_001 0.9 11 13 46 51\n", (f"comp4_det_{SPLIT}_class1.txt",)),
    }
    cases: list[Case] = []
    for n, (what, (data, names)) in enumerate(contents.items()):
        res = tmp / (f"results_{n}" if data is not None else "no_results")
        expect, says = ("handled", ("no detections",)) if what == "a class without its file" else ("clear", ())
        if data is not None:
            res.mkdir()
            (res / f0).write_bytes(data)
            if expect == "clear":
                (res / f"comp4_det_{SPLIT}_class1.txt").write_bytes(b"img_002 0.5 10 10 40 40\n")
        cases.append(Case("comp4", f"{what}: score_comp4_files", expect,
                          lambda res=res: score_comp4_files(root, SPLIT, res, classes=CLASSES, coco=False),
                          names, says))
        if data is not None:
            cases.append(Case("comp4", f"{what}: read_comp4", expect,
                              lambda res=res: read_comp4(res, SPLIT, CLASSES, image_ids=list(IDS)), names, says))
        cases.append(Case("comp4", f"{what}: eval_detections", expect,
                          lambda res=res: tool("eval_detections", ["--data-root", str(root), "--split", SPLIT,
                                                                   "--results", str(res), "--no-coco"]),
                          names, says))
    return cases


def _proposal_cases(tmp: Path, tool) -> list[Case]:
    root = _voc(tmp / "voc_props")
    good = {i: np.array([[0, 0, 30, 30], [10, 10, 60, 60]], np.float32) for i in IDS}
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    (tmp / "garbage.mat").write_bytes(b"MATLAB 5.0 MAT-file, but nothing after the header" + bytes(100))
    sentinel = tmp / "pkl_ran_code"
    with open(tmp / "foreign.pkl", "wb") as f:
        pickle.dump({"ids": list(IDS), "boxes": [_Foreign(sentinel)] * 3}, f)
    with open(tmp / "runs_code.pkl", "wb") as f:
        pickle.dump({"ids": list(IDS), "boxes": [_RunsCode(sentinel)] * 3}, f)
    (tmp / "hdf5.mat").write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + bytes(200))
    (tmp / "boxes.txt").write_text("img_001 0 0 30 30\n")
    from proposals.store import save_proposals

    save_proposals(tmp / "other_ids.npz", {"img_001": good["img_001"], "img_777": good["img_002"],
                                           "img_003": good["img_003"]})
    counts = np.array([2, 2, 2], np.int64)
    boxes = np.concatenate(list(good.values()))
    boxes[3, 2] = np.nan
    with open(tmp / "nan_boxes.npz", "wb") as f:  # written by hand: save_proposals refuses NaN
        np.savez(f, ids=np.array(IDS), counts=counts, boxes=boxes, format=np.array("sppnet-proposals-v1"))
    files = {"garbage .npz": ("garbage.npz", ("garbage.npz",)),
             "garbage .mat": ("garbage.mat", ("garbage.mat",)),
             ".pkl with a foreign class": ("foreign.pkl", ("foreign.pkl", "refusing", "_Foreign")),
             ".pkl whose __reduce__ would run code": ("runs_code.pkl", ("runs_code.pkl", "refusing")),
             "MATLAB v7.3 .mat": ("hdf5.mat", ("hdf5.mat", "v7.3")),
             "unknown extension": ("boxes.txt", ("boxes.txt", "unknown proposal file type")),
             "missing file": ("none.npz", ("none.npz", "not found")),
             "ids not matching the split": ("other_ids.npz", ("other_ids.npz", "img_002")),
             "NaN boxes": ("nan_boxes.npz", ("nan_boxes.npz", "NaN"))}
    cfg = tmp / "props.yaml"
    cfg.write_text(CONFIG.format(out=tmp / "props_run", root=root, split=SPLIT))
    cases: list[Case] = []
    for what, (fname, names) in files.items():
        p = tmp / fname
        after = _no_file(sentinel)
        cases.append(Case("proposals", f"{what}: load_proposals", "clear", lambda p=p: load_proposals(p, IDS), names,
                          after=after))
        cases.append(Case("proposals", f"{what}: proposal_recall", "clear",
                          lambda p=p: tool("proposal_recall", ["--data-root", str(root), "--split", SPLIT,
                                                               "--proposals", str(p)]), names, after=after))
        cases.append(Case("proposals", f"{what}: train_detector (proposals.method file)", "clear",
                          lambda p=p: tool("train_detector", ["--config", str(cfg), "--stop-after", "proposals",
                                                              "--set", "proposals.method=file",
                                                              f"proposals.train_file={p}"]),
                          names, after=after))
    return cases


def _config_cases(tmp: Path, tool) -> list[Case]:
    root = _voc(tmp / "voc_cfg")
    good = CONFIG.format(out=tmp / "cfg_run", root=root, split=SPLIT)
    texts: dict[str, tuple[bytes | None, tuple[str, ...]]] = {
        "duplicate key": ((good + "seed: 1\nseed: 2\n").encode(), ("duplicate key 'seed'",)),
        "binary file": (bytes(range(256)) * 4, ()),
        "empty file": (b"# only a comment\n", ("empty",)),
        "unknown key": ((good + "finetune: {itres: 10}\n").encode(), ("finetune.itres",)),
        "wrong type": ((good + "svm: {C: lots}\n").encode(), ("svm.C", "lots")),
        "out-of-range values": ((good + "test: {nms: 1.5, max_per_class: -3}\nfinetune: {lr: -0.1}\n").encode(),
                                ("test.nms", "test.max_per_class", "finetune.lr")),
        "missing file": (None, ()),
    }
    cases: list[Case] = []
    for n, (what, (data, keys)) in enumerate(texts.items()):
        p = tmp / f"config_{n}.yaml"
        if data is not None:
            p.write_bytes(data)
        names = (p.name,) + keys
        cases.append(Case("config", f"{what}: load_config", "clear", lambda p=p: load_config(p), names))
        cases.append(Case("config", f"{what}: train_detector", "clear",
                          lambda p=p: tool("train_detector", ["--config", str(p), "--stop-after", "proposals"]), names))
        cases.append(Case("config", f"{what}: test_net", "clear",
                          lambda p=p: tool("test_net", ["--config", str(p)]), names))
    ok = tmp / "good.yaml"
    ok.write_text(good)
    for what, item, names in (("--set of an unknown key", "finetune.itres=5", ("finetune.itres",)),
                              ("--set of a wrong type", "svm.C=[1, 2]", ("svm.C",)),
                              ("--set without '='", "svm.C", ("svm.C", "key.sub=value"))):
        cases.append(Case("config", f"{what}: load_config", "clear", lambda item=item: load_config(ok, [item]), names))
        cases.append(Case("config", f"{what}: train_detector", "clear",
                          lambda item=item: tool("train_detector", ["--config", str(ok), "--set", item,
                                                                    "--stop-after", "proposals"]), names))
    return cases


def _checkpoint_cases(tmp: Path, good: Path, tool) -> list[Case]:
    root = _voc(tmp / "voc_ckpt")
    cfg = tmp / "ckpt.yaml"
    cfg.write_text(CONFIG.format(out=tmp / "ckpt_run", root=root, split=SPLIT))
    st = torch.load(good, map_location="cpu", weights_only=True)
    sentinel = tmp / "ckpt_ran_code"
    bad: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def edited(fname: str, edit: Callable[[dict], None]) -> Path:
        s = copy.deepcopy(st)
        edit(s)
        torch.save(s, tmp / fname)
        return tmp / fname

    torch.save({**st, "meta": _RunsCode(sentinel)}, tmp / "runs_code.pt")
    bad["a pickle that would run code"] = (tmp / "runs_code.pt", ())
    data = good.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    bad["truncated"] = (tmp / "truncated.pt", ())
    damaged = bytearray(data)
    with zipfile.ZipFile(good) as z:  # the largest tensor's stored bytes (torch.save stores them uncompressed)
        big = max(z.infolist(), key=lambda i: i.file_size)
    start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra) + big.file_size // 2
    damaged[start:start + 64] = bytes(b ^ 0xFF for b in damaged[start:start + 64])  # same size, 64 bytes changed
    (tmp / "damaged.pt").write_bytes(bytes(damaged))
    bad["damaged in place"] = (tmp / "damaged.pt", ("CRC",))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp / "not_a_detector.pt")
    bad["a non-detector torch file"] = (tmp / "not_a_detector.pt", ("not an SPPDetector checkpoint",))
    bad["class_names longer than the SVMs"] = (edited("three_names.pt", lambda s: s.update(
        class_names=["class0", "class1", "class2"])), ("class names",))
    bad["class_names a string"] = (edited("names_string.pt", lambda s: s.update(class_names="ab")), ("class_names",))
    bad["class_names repeated"] = (edited("names_repeated.pt", lambda s: s.update(class_names=["a", "a"])),
                                   ("class_names",))
    bad["a missing key"] = (edited("no_svms.pt", lambda s: s.pop("svms")), ("svms",))
    other = random_detector(width_mult=0.25, fc_dim=16, num_classes=2, scales=(96,))
    wide = other.backbone.state_dict()
    bad["another width (fc6 in_dim)"] = (edited("other_width.pt", lambda s: s.update(
        width_mult=0.25, backbone={k: v.clone() for k, v in wide.items()})), ("fc6",))
    bad["a missing file"] = (tmp / "none.pt", ("not found",))
    cases: list[Case] = []
    for what, (p, extra) in bad.items():
        names = (p.name,) + extra
        after = _no_file(sentinel)
        cases.append(Case("checkpoint", f"{what}: SPPDetector.load", "clear", lambda p=p: SPPDetector.load(p), names,
                          after=after))
        cases.append(Case("checkpoint", f"{what}: test_net --checkpoint", "clear",
                          lambda p=p: tool("test_net", ["--config", str(cfg), "--checkpoint", str(p)]), names,
                          after=after))
    return cases


# ------------------------------------------------------------------------------------------------


def test_bad_input_corpus(tmp_path, capsys, caplog, request):
    caplog.set_level(logging.WARNING)
    det = random_detector(width_mult=0.125, fc_dim=16, num_classes=2, scales=(96,))
    assert det.class_names == CLASSES
    good = det.save(tmp_path / "model.pt")
    tool = lambda name, argv: _tool_run(name, argv, capsys, caplog)  # noqa: E731
    folders = {k: tmp_path / k for k in ("images", "voc", "coco", "comp4", "proposals", "config", "checkpoint")}
    for d in folders.values():
        d.mkdir()
    cases = (_image_cases(folders["images"], det) + _voc_cases(folders["voc"], good, tool)
             + _coco_cases(folders["coco"], good, tool)
             + _comp4_cases(folders["comp4"], tool) + _proposal_cases(folders["proposals"], tool)
             + _config_cases(folders["config"], tool) + _checkpoint_cases(folders["checkpoint"], good, tool))
    outcomes = [_classify(c, capsys, caplog) for c in cases]

    n = {k: sum(o.got == k for o in outcomes) for k in ("clear", "handled", "traceback", "silent")}
    lines = [f"{'  ' if o.got == o.case.expect else 'XX'} {o.case.kind:<10} {o.got:<9} {o.case.name}: "
             f"{o.detail.splitlines()[0] if o.detail else ''}"[:200] for o in outcomes]
    lines.append(f"bad-input corpus: {len(outcomes)} cases, {n['clear']} clear errors, {n['handled']} handled, "
                 f"{n['traceback']} tracebacks, {n['silent']} silent")
    if request.config.getoption("capture") == "no":  # pytest -s: the table and the summary line
        with capsys.disabled():
            print("\n" + "\n".join(lines))
    wrong = [f"{o.case.kind} / {o.case.name}: expected {o.case.expect}, got {o.got}: {o.detail}"
             for o in outcomes if o.got != o.case.expect]
    assert not wrong, "\n\n".join(wrong)
    assert n["traceback"] == 0 and n["silent"] == 0 and n["clear"] + n["handled"] == len(outcomes)
