"""Proposals for a whole list of images: parallel processes, resumable shards, one final ``.npz``.

Shape shorthand (used across the project):
    R: proposals in one image

Resumability. Work is cut into chunks of ``chunk_size`` consecutive images. Each finished chunk is
written atomically (temp file + ``os.replace``) as ``<out>.parts/chunk_<n>.npz`` in the project's
proposal format, next to a ``params.json`` recording the mode, sizes and the list of ids. A rerun
with the same parameters reuses every readable chunk and computes the rest; leftover temp files of a
killed run are deleted, and a chunk that cannot be read or holds other ids is recomputed (warning).
When every chunk exists the final ``out`` is written atomically (with the parameters embedded) and
the parts folder is removed; a later call with the same parameters and ids just loads ``out``.
Parameters that differ from ``params.json`` make the old parts stale: they are discarded (warning).

Bad images. By default an unreadable/unsuitable image raises :class:`ImageError` naming the file
(nothing is lost: finished chunks stay on disk). With ``skip_bad_images=True`` the image gets zero
boxes and a warning naming it and the problem.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np

from proposals.imageio import ImageError, read_image
from proposals.selective_search import selective_search
from proposals.store import ProposalFileError, read_npz, save_proposals

__all__ = ["compute_proposals_for_images"]

log = logging.getLogger(__name__)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per process; the pool provides the parallelism


def _run_chunk(task: tuple) -> tuple[int, dict[str, np.ndarray], list[str]]:
    """Worker: proposals for one chunk, written to its shard file. Returns (chunk, boxes, problems)."""
    index, items, shard, kwargs, skip_bad = task
    result: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for image_id, path in items:
        try:
            img = read_image(path)
        except ImageError as e:
            if not skip_bad:
                raise ImageError(f"image {image_id!r}: {e}") from None
            problems.append(f"image {image_id!r}: {e}; skipped with 0 proposals")
            result[image_id] = np.zeros((0, 4), np.float32)
            continue
        result[image_id] = selective_search(img, **kwargs)
    save_proposals(shard, result)
    return index, result, problems


def _read_shard(path: Path, ids: list[str]) -> dict[str, np.ndarray] | None:
    try:
        data = read_npz(path)
    except ProposalFileError as e:
        log.warning("%s: unreadable shard (%s); recomputing it", path, e)
        return None
    if list(data) != ids:
        log.warning("%s: shard holds other images than expected; recomputing it", path)
        return None
    return data


def compute_proposals_for_images(
    items: Sequence[tuple[str, str | Path]],
    out: str | Path,
    workers: int = 2,
    mode: str = "fast+",
    min_size: float = 20,
    max_boxes: int | None = 2000,
    progress: bool = True,
    *,
    skip_bad_images: bool = False,
    chunk_size: int = 8,
    ss_options: dict | None = None,
) -> dict[str, np.ndarray]:
    """Selective-search proposals for every image, saved to ``out`` (``.npz``), resumable.

    Args:
        items: ``(image_id, image_path)`` pairs; ids must be unique. The order is kept.
        out: final ``.npz`` file (read back with :func:`proposals.load_proposals`).
        workers: processes (spawned, each limited to one OpenCV thread); <= 1 runs in this process.
        mode, min_size, max_boxes: passed to :func:`proposals.selective_search`
            (``max_boxes`` None or 0 = all).
        progress: show a tqdm bar (images).
        skip_bad_images: False: a bad image raises ImageError naming it; True: warn, zero boxes.
        chunk_size: images per shard (the unit of resumption).
        ss_options: further keyword arguments of :func:`proposals.selective_search` (e.g. the
            "fast+" ``ss_side``, ``grid_min``, ``grid_stride``, ``grid_aspect_ratios``).
    Returns:
        dict id -> ndarray float32 [R, 4] xyxy, in ``items`` order.
    Raises:
        ValueError: duplicate ids or bad arguments. ImageError: a bad image (default).
    """
    from tqdm import tqdm

    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    ids = [str(i) for i, _ in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"compute_proposals_for_images: duplicate image ids {dup[:10]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    kwargs = {"mode": mode, "min_size": min_size, "max_boxes": max_boxes or None, **(ss_options or {})}
    params = {"kwargs": kwargs, "ids": ids, "chunk_size": chunk_size,
              "skip_bad_images": skip_bad_images}
    params = json.loads(json.dumps(params))  # tuples -> lists, as params.json reads back
    meta = json.dumps({k: params[k] for k in ("kwargs", "skip_bad_images")}, sort_keys=True)

    # 1. a finished file with the same parameters and ids is the cache
    if out.is_file():
        try:
            with np.load(out, allow_pickle=False) as z:
                same = "meta" in z.files and str(z["meta"]) == meta and list(z["ids"]) == ids
        except Exception:
            same = False
        if same:
            log.info("%s: up to date, loading it", out)
            return read_npz(out)
        log.info("%s exists but was made with other parameters or images; recomputing", out)

    # 2. parts folder: reuse it when its parameters match, else start clean
    parts = out.with_name(out.name + ".parts")
    pfile = parts / "params.json"
    if parts.is_dir():
        try:
            old = json.loads(pfile.read_text())
        except (OSError, ValueError):
            old = None
        if old != params:
            log.warning("%s: partial results from other parameters or images; discarding them", parts)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    for tmp in parts.glob(".*.tmp"):  # temp files of a killed run
        log.info("removing unfinished temp file %s", tmp)
        tmp.unlink()
    if not pfile.is_file():
        tmp = parts / f".params.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(params))
        os.replace(tmp, pfile)

    chunks = [list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size)]
    chunks = [[(str(a), Path(b)) for a, b in c] for c in chunks]
    results: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    for n, chunk in enumerate(chunks):
        shard = parts / f"chunk_{n:06d}.npz"
        if shard.is_file():
            data = _read_shard(shard, [i for i, _ in chunk])
            if data is not None:
                results[n] = data
                continue
        todo.append((n, chunk, shard, kwargs, skip_bad_images))
    if results:
        log.info("resuming: %d of %d chunks already done", len(results), len(chunks))

    bar = tqdm(total=len(items), initial=sum(len(c) for c in results.values()), unit="img",
               desc="proposals", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker()
            for task in todo:
                n, data, problems = _run_chunk(task)
                for msg in problems:
                    log.warning(msg)
                results[n] = data
                bar.update(len(data))
        else:
            ctx = mp.get_context("spawn")  # safe with torch/OpenCV threads in the parent
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_init_worker) as pool:
                futures = [pool.submit(_run_chunk, task) for task in todo]
                try:
                    for fut in as_completed(futures):
                        n, data, problems = fut.result()
                        for msg in problems:
                            log.warning(msg)
                        results[n] = data
                        bar.update(len(data))
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()

    final: dict[str, np.ndarray] = {}
    for n in range(len(chunks)):
        final.update(results[n])
    save_proposals(out, final, meta=meta)
    shutil.rmtree(parts, ignore_errors=True)
    return final
