"""Building the embedded ``digits`` data set in Pascal VOC 2007 layout: files, workers, stamp.

Shape shorthand (used across the project):
    G: ground-truth boxes in one image      K: foreground classes (here 10 digits)

What one image looks like is :mod:`detector.data.digits_draw`; this module decides which images
exist, draws them (in parallel when asked) and writes the folder.

Layout written under ``out`` (exactly as Pascal VOC 2007)::

    Annotations/<id>.xml         size, objects (name, pose, truncated, difficult, bndbox 1-based inclusive)
    JPEGImages/<id>.jpg          fixed JPEG quality
    ImageSets/Main/{trainval,train,val,test}.txt
    ImageSets/Main/<class>_<split>.txt   "<id> <flag>", flag 1 / -1 / 0 (only difficult instances)
    .complete.json               stamp: key (version + parameters), summary, a SHA-1 of every file; written last

Boxes are project xyxy until the XML is written; :func:`detector.boxes.xyxy_to_voc` converts them
there.

Determinism: every image draws from its own ``numpy.random.Generator`` seeded with
``(seed, split, index)``, so the output is byte-identical for a seed whatever the number of worker
processes (workers are spawned, never forked, and write only their own JPEG; the parent writes every
XML and list). The bytes also depend on the OpenCV / libjpeg build and the bundled photographs, whose
versions the stamp records under ``environment``. The 1797 digits are split first (stratified by class)
into disjoint train / val / test pools; trainval images use only train+val digits and test images only
test digits.

Reuse (``detector.artifacts``): a folder whose stamp carries the same key is the finished data set
only when every file it lists still has the recorded SHA-1 (a damaged or edited file makes it be
rebuilt, with a warning naming the files); it is built in a temp folder ``.<name>.<pid>.tmp`` next
to ``out`` and moved into place only when complete, so a killed build leaves no ``out`` that could
be taken for a finished one, and its temp folder is removed by the next build.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from detector.artifacts import digest, remove_stale_temps, temp_path, write_text
from detector.data.digits_draw import (
    DIGIT_CLASSES,
    DigitsParams,
    draw_image,
    load_backgrounds,
    load_digit_images,
)

__all__ = [
    "DATASET_VERSION",
    "STAMP_NAME",
    "DatasetExistsError",
    "make_digits_dataset",
    "split_digit_pools",
]

log = logging.getLogger(__name__)

# bump when what digits_draw draws (or what is written) changes: a stamp with another version is not
# "already built"
DATASET_VERSION = 1
STAMP_NAME = ".complete.json"
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_LAYOUT = {"Annotations", "JPEGImages", "ImageSets", STAMP_NAME}


class DatasetExistsError(RuntimeError):
    """``out`` holds something other than this exact data set and ``force`` was not given."""


def split_digit_pools(labels: np.ndarray, weights: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split digit indices into disjoint pools, stratified by class, sizes proportional to ``weights``.

    Every pool with a positive weight gets at least one digit of each class.

    Args:
        labels (ndarray[M] int64): class of each digit.
        weights: one non-negative weight per pool (e.g. its number of images).
        seed: the data set seed.
    Returns:
        list of sorted int64 index arrays, one per pool, disjoint, together covering ``labels``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"pool weights must be non-negative with a positive sum, got {list(weights)}")
    rng = np.random.default_rng([seed, 0xD1617])
    pools: list[list[np.ndarray]] = [[] for _ in w]
    used = np.flatnonzero(w > 0)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(used):
            raise ValueError(f"class {c} has {len(idx)} digits, fewer than {len(used)} pools")
        # largest remainder on what is left after one digit per used pool
        counts = np.zeros(len(w), dtype=np.int64)
        counts[used] = 1
        rest = len(idx) - len(used)
        share = w / w.sum() * rest
        counts += np.floor(share).astype(np.int64)
        left = len(idx) - counts.sum()
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        counts[order[:left]] += 1
        starts = np.concatenate([[0], np.cumsum(counts)])
        for p in range(len(w)):
            pools[p].append(idx[starts[p]:starts[p + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pools]



# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _xml(image_id: str, height: int, width: int, background: str, objects: list[dict]) -> str:
    """VOC 2007 annotation text; boxes go through the one xyxy -> VOC edge."""
    lines = [
        "<annotation>",
        "\t<folder>digits</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>digits (sklearn UCI handwritten digits on scikit-image/scikit-learn photos)</database>",
        # the generator's name as the annotations have always recorded it (not the module path: a
        # rename must not change the data set's bytes)
        "\t\t<annotation>detector.digits</annotation>",
        f"\t\t<image>{background}</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    if objects:
        from detector.boxes import xyxy_to_voc  # lazy: torch is not needed to check a stamp

        voc = xyxy_to_voc(np.stack([o["box"] for o in objects])).numpy()  # (G, 4) 1-based inclusive
    for o, b in zip(objects, voc if objects else []):
        xmin, ymin, xmax, ymax = (int(round(v)) for v in b)
        lines += [
            "\t<object>",
            f"\t\t<name>{DIGIT_CLASSES[o['label']]}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{int(o['difficult'])}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


_WORKER: dict[str, Any] = {}  # sources handed to spawned workers by _init_worker


def _init_worker(images: np.ndarray, labels: np.ndarray, photos: tuple) -> None:
    """Spawned worker: receive the digits and photographs (no sklearn/skimage/torch import there)."""
    cv2.setNumThreads(1)
    _WORKER.update(images=images, labels=labels, photos=photos)


def _render_task(task: tuple) -> dict:
    """Render one image and write its JPEG (runs in a worker); returns its size and objects (xyxy)."""
    root, image_id, split, index, pool, params = task
    p: DigitsParams = params
    rng = np.random.default_rng([p.seed, _SPLIT_CODES[split], index])
    if _WORKER:
        photos, images, labels = _WORKER["photos"], _WORKER["images"], _WORKER["labels"]
    else:
        photos = load_backgrounds()
        images, labels = load_digit_images()
    bg_name, img, objects = draw_image(rng, photos, images, labels, pool, p)
    h, w = img.shape[:2]
    ok, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {image_id}.jpg")
    (Path(root) / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg.tobytes())
    return {
        "id": image_id,
        "split": split,
        "height": h,
        "width": w,
        "background": bg_name,
        "objects": [
            {"label": o["label"], "digit": o["digit"], "difficult": o["difficult"],
             "box": [float(v) for v in o["box"]]}
            for o in objects
        ],
    }


def _params_key(p: DigitsParams) -> dict:
    d = dataclasses.asdict(p)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _looks_like_dataset(path: Path) -> bool:
    return path.is_dir() and all(c.name in _LAYOUT for c in path.iterdir())


def _manifest(root: Path) -> dict[str, str]:
    """SHA-1 of every file of a built data set except the stamp: ``{relative path: hex}``."""
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != STAMP_NAME:
            out[f.relative_to(root).as_posix()] = hashlib.sha1(f.read_bytes()).hexdigest()
    return out


def _changed_files(root: Path, manifest: dict[str, str]) -> list[str]:
    """Files of the manifest that are missing or whose content changed, and files not in it."""
    now = _manifest(root)
    changed = [f for f, h in manifest.items() if now.get(f) != h]
    return changed + sorted(set(now) - set(manifest))


def _reuse(out: Path, p: DigitsParams, key: str, force: bool) -> dict | None:
    """The stamp's summary when ``out`` holds this exact data set, intact; None when it must be
    (re)built. Raises DatasetExistsError when ``out`` holds something else and ``force`` is not set."""
    stamp_path = out / STAMP_NAME
    rebuild_changed = False
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, json.JSONDecodeError):
            stamp = {}
        if stamp.get("key") == key:
            changed = _changed_files(out, stamp.get("files", {}))
            if not changed:
                log.info("%s: already built (seed %d, %d trainval, %d test); nothing to do",
                         out, p.seed, p.n_trainval, p.n_test)
                return dict(stamp.get("summary", {}))
            log.warning("%s: %d file(s) differ from the data set that was built (%s%s); rebuilding it", out,
                        len(changed), ", ".join(changed[:5]), " ..." if len(changed) > 5 else "")
            rebuild_changed = True
        elif "key" not in stamp and stamp.get("version") == DATASET_VERSION and stamp.get("params") == _params_key(p):
            log.info("%s: stamp of an earlier format (no file hashes); rebuilding the same set to record them", out)
            rebuild_changed = True
        elif not force:
            have_params = stamp.get("params") if isinstance(stamp.get("params"), dict) else {}
            diff = {k: (have_params.get(k), v) for k, v in _params_key(p).items() if have_params.get(k) != v}
            if stamp.get("version") != DATASET_VERSION:
                diff["version"] = (stamp.get("version"), DATASET_VERSION)
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise DatasetExistsError(
                f"{out} already holds a digits data set built with other parameters ({changes}); "
                f"pass --force (force=True) to rebuild it or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DatasetExistsError(
            f"{out} exists and is not a finished digits data set (no {STAMP_NAME}); "
            "pass --force (force=True) to replace it or choose another --out"
        )
    if out.exists() and not _looks_like_dataset(out) and not rebuild_changed:
        raise DatasetExistsError(
            f"{out} holds files other than a VOC layout (Annotations/, JPEGImages/, ImageSets/); "
            "refusing to replace it: remove it yourself or choose another --out"
        )
    return None


def make_digits_dataset(
    out: str | Path,
    seed: int = 0,
    n_trainval: int = 1000,
    n_test: int = 300,
    *,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
    params: DigitsParams | None = None,
) -> dict:
    """Build the ``digits`` data set in VOC 2007 layout under ``out`` (idempotent, atomic).

    The data set is rendered into a sibling temp folder and moved into place with ``os.replace`` only
    when complete, together with the stamp ``out/.complete.json``; an interrupted run leaves no ``out``
    that could be mistaken for a finished one. A finished set is reused only when every file still
    has the content the stamp records (else it is rebuilt, with a warning naming the files).

    Args:
        out: destination folder.
        seed, n_trainval, n_test: data set seed and image counts (override ``params``' fields).
        workers: processes used for rendering (the output does not depend on it).
        force: rebuild even if ``out`` holds a data set made with other parameters (only a folder that
            holds nothing but the VOC layout is ever deleted).
        progress: show a tqdm bar.
        params: every other knob (defaults: :class:`DigitsParams`).
    Returns:
        summary dict: ``out``, ``skipped`` (True when already built), ``seconds``, ``params``,
        ``images`` / ``objects`` / ``difficult`` per split, ``per_class`` object counts,
        ``object_side_px`` (min/max of the visible boxes' longer side), ``image_side_px``.
    Raises:
        DatasetExistsError: ``out`` holds something else (other parameters without ``force``, or
            files that are not a VOC layout).
        ValueError: bad counts.
    """
    t0 = time.perf_counter()
    p = dataclasses.replace(params or DigitsParams(), seed=int(seed), n_trainval=int(n_trainval), n_test=int(n_test))
    if p.n_trainval < 2 or p.n_test < 1:
        raise ValueError(f"need n_trainval >= 2 and n_test >= 1, got {p.n_trainval} and {p.n_test}")
    if not (1 <= p.objects_per_image[0] <= p.objects_per_image[1]):
        raise ValueError(f"objects_per_image must be 1 <= lo <= hi, got {p.objects_per_image}")
    out = Path(out)
    key = digest("digits", DATASET_VERSION, _params_key(p))
    summary = _reuse(out, p, key, force)
    if summary is not None:
        summary.update(skipped=True, seconds=round(time.perf_counter() - t0, 3), out=str(out))
        return summary

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    try:
        summary = _build(tmp, p, workers, progress)
        summary["params"] = _params_key(p)
        stamp = {"key": key, "version": DATASET_VERSION, "params": _params_key(p), "summary": summary,
                 "environment": _environment(), "files": _manifest(tmp)}
        write_text(tmp / STAMP_NAME, json.dumps(stamp, indent=1) + "\n")
        old = None
        if out.exists():
            old = temp_path(out.with_name(out.name + ".old"))
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = dict(summary)
    summary.update(skipped=False, seconds=round(time.perf_counter() - t0, 3), out=str(out))
    return summary


def _environment() -> dict:
    import sklearn
    import skimage

    return {"numpy": np.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__,
            "scikit-image": skimage.__version__}


def _build(root: Path, p: DigitsParams, workers: int, progress: bool) -> dict:
    images, labels = load_digit_images()
    photos = load_backgrounds()
    n_train = p.n_trainval // 2
    n_val = p.n_trainval - n_train
    counts = {"train": n_train, "val": n_val, "test": p.n_test}
    pools = dict(zip(counts, split_digit_pools(labels, list(counts.values()), p.seed)))
    tasks = []
    next_id = 1
    for split, n in counts.items():
        for i in range(n):
            tasks.append((str(root), f"{next_id:06d}", split, i, pools[split], p))
            next_id += 1

    results: list[dict]
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process whose OpenCV / OpenMP threads hold locks can deadlock
        # the children (seen here under pytest). Workers get the sources as arrays.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(images, labels, photos)) as ex:
            it = ex.map(_render_task, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
            results = list(_maybe_tqdm(it, len(tasks), progress))
    else:
        results = [_render_task(t) for t in _maybe_tqdm(tasks, len(tasks), progress)]

    for r in results:  # XML in the parent: the xyxy -> VOC edge (detector.boxes, torch) runs here only
        objs = [{**o, "box": np.asarray(o["box"], np.float64)} for o in r["objects"]]
        xml = _xml(r["id"], r["height"], r["width"], r["background"], objs)
        (root / "Annotations" / f"{r['id']}.xml").write_text(xml)
    split_ids = {s: [r["id"] for r in results if r["split"] == s] for s in counts}
    split_ids["trainval"] = sorted(split_ids["train"] + split_ids["val"])
    main = root / "ImageSets" / "Main"
    for split in ("trainval", "train", "val", "test"):
        ids = split_ids[split]
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        by_id = {r["id"]: r for r in results}
        for k, name in enumerate(DIGIT_CLASSES):
            lines = []
            for i in ids:
                objs = [o for o in by_id[i]["objects"] if o["label"] == k]
                flag = 1 if any(not o["difficult"] for o in objs) else (0 if objs else -1)
                lines.append(f"{i} {flag:2d}\n")  # VOC devkit writes '%s %2d'
            (main / f"{name}_{split}.txt").write_text("".join(lines))
    return _summarize(results, split_ids)


def _maybe_tqdm(it, total: int, progress: bool):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="digits", unit="img")


def _summarize(results: list[dict], split_ids: dict[str, list[str]]) -> dict:
    by_id = {r["id"]: r for r in results}
    s: dict[str, Any] = {"images": {}, "objects": {}, "difficult": {}}
    for split in ("trainval", "train", "val", "test"):
        objs = [o for i in split_ids[split] for o in by_id[i]["objects"]]
        s["images"][split] = len(split_ids[split])
        s["objects"][split] = len(objs)
        s["difficult"][split] = sum(o["difficult"] for o in objs)
    all_objs = [o for r in results for o in r["objects"]]
    s["per_class"] = {name: sum(o["label"] == k for o in all_objs) for k, name in enumerate(DIGIT_CLASSES)}
    longer = [max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) for o in all_objs]
    s["object_side_px"] = {"min": min(longer), "max": max(longer)}
    per_image = [len(r["objects"]) for r in results]
    s["objects_per_image"] = {"min": min(per_image), "max": max(per_image)}
    sides = [v for r in results for v in (r["height"], r["width"])]
    s["image_side_px"] = {"min": min(sides), "max": max(sides)}
    tv = {o["digit"] for i in split_ids["trainval"] for o in by_id[i]["objects"]}
    te = {o["digit"] for i in split_ids["test"] for o in by_id[i]["objects"]}
    s["distinct_digits"] = {"trainval": len(tv), "test": len(te), "shared": len(tv & te)}
    h = hashlib.sha256()
    for r in sorted(results, key=lambda r: r["id"]):
        h.update(json.dumps(r, sort_keys=True).encode())
    s["annotation_sha256"] = h.hexdigest()
    return s
