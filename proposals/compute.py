"""Proposals for a whole list of images: parallel processes, resumable shards, one final ``.npz``.

Shape shorthand (used across the project):
    R: proposals in one image

Key. Everything that changes the boxes (the method and its options, the image ids and files in
order, the shard size, the bad-image policy) is digested into one key
(``detector.artifacts.digest``). The final ``out`` file carries the key and is reused only when its
content check passes (``detector.artifacts.verify``: every zip member's CRC) and its key matches.

Resumability. Work is cut into shards of ``chunk_size`` consecutive images. Each finished shard is
written atomically as ``<out>.parts/chunk_<n>.npz`` next to a ``key`` file. A rerun with the same
key reuses every shard that passes its content check and holds the expected ids, and computes the
rest; temp files of a killed run are deleted. Parts made under another key are discarded
(warning). When every shard exists the final ``out`` is written atomically and the parts folder is
removed.

Bad images. By default an unreadable image raises :class:`ImageError` naming the file (nothing is
lost: finished shards stay on disk). With ``skip_bad_images=True`` the image gets zero boxes and a
warning naming it and the problem.

Imports: no torch (worker processes stay light); ``detector.artifacts`` imports torch lazily.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from detector.artifacts import digest, remove_stale_temps, verify, write_text
from proposals.imageio import ImageError, decode_image
from proposals.selective_search import propose
from proposals.store import NpzProposals, ProposalFileError, merge_proposal_files, read_npz_meta, save_proposals

__all__ = ["PROPOSALS_REVISION", "compute_proposals_for_images", "prepare_parts", "proposals_key",
           "start_proposal_pool", "usable_cores"]

log = logging.getLogger(__name__)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per process; the pool provides the parallelism


def start_proposal_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each limited to one OpenCV thread, for
    :func:`proposals.propose` calls (the caller shuts it down). Spawned, not forked: safe with the
    torch and OpenCV threads of the parent. A worker imports numpy and OpenCV only, never torch.
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)


def _run_chunk(task: tuple, threads: int = 1) -> tuple[int, dict[str, np.ndarray], list[str]]:
    """Worker: proposals for one shard, written to its file, selective search on ``threads``
    threads (the boxes do not depend on it). Returns (shard, boxes, problems)."""
    index, items, shard, options, skip_bad = task
    result: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for image_id, path in items:
        try:
            img, warning = decode_image(path)
            if warning:
                problems.append(f"image {image_id!r}: {warning}")
        except ImageError as e:
            if not skip_bad:
                raise ImageError(f"image {image_id!r}: {e}") from None
            problems.append(f"image {image_id!r}: {e}; skipped with 0 proposals")
            result[image_id] = np.zeros((0, 4), np.float32)
            continue
        result[image_id] = propose(img, threads=threads, **options)
    save_proposals(shard, result)
    return index, result, problems


def _read_checked(path: Path, ids: list[str], what: str) -> NpzProposals | None:
    """The proposals in ``path`` (read on demand) when it passes its content check and holds
    exactly ``ids``."""
    problem = verify(path)
    if problem is None:
        try:
            data = NpzProposals(path)
        except ProposalFileError as e:
            problem = str(e)
    if problem is not None:
        log.warning("%s %s: %s; recomputing it", what, path, problem)
        return None
    if list(data) != ids:
        log.warning("%s %s holds other images than expected; recomputing it", what, path)
        return None
    return data


def usable_cores() -> int:
    """CPU cores this process may run on: its CPU affinity where the OS reports it, else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_shards(todo: list[tuple], workers: int, threads_here: int = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Compute the shards of ``todo`` (in ``workers`` spawned processes with one thread each, or
    here on ``threads_here`` threads when <= 1) and yield ``(shard index, proposals)`` as each
    finishes; problems of skipped images are logged."""
    if workers <= 1 or len(todo) <= 1:
        _init_worker()
        for task in todo:
            n, data, problems = _run_chunk(task, threads_here)
            for msg in problems:
                log.warning(msg)
            yield n, data
        return
    with start_proposal_pool(workers) as pool:
        futures = [pool.submit(_run_chunk, task) for task in todo]
        try:
            for fut in as_completed(futures):
                n, data, problems = fut.result()
                for msg in problems:
                    log.warning(msg)
                yield n, data
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _prepare(parts: Path, key: str) -> None:
    """The parts folder for ``key``: reused when made under it, else emptied; stale temps removed."""
    kfile = parts / "key"
    if parts.is_dir() and (not kfile.is_file() or kfile.read_text().strip() != key):
        log.warning("%s: partial results from other options or images; discarding them", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(parts)
    if not kfile.is_file():
        write_text(kfile, key + "\n")


def prepare_parts(items: Sequence[tuple[str, str | Path]], out: str | Path, options: dict, *,
                  skip_bad_images: bool = False, chunk_size: int = 8) -> Path:
    """Rank 0's step before the ranks compute their shards (see :func:`compute_proposals_for_images`)."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    parts = out.with_name(out.name + ".parts")
    _prepare(parts, proposals_key(items, options, chunk_size, skip_bad_images))
    return parts


# Revision of the boxes that propose() computes for given options. It is part of every proposal
# file's key (and of the training run's proposals stage), so files computed by code that gave other
# boxes are recomputed, with everything downstream of them. 2: selective search's parts segment with
# the float32 sigma of OpenCV's own switch; the parts of the previous code (stop 34) smoothed with the
# double 0.8 and gave other boxes on about 3% of real images.
PROPOSALS_REVISION = 2


def proposals_key(items: Sequence[tuple[str, str | Path]], options: dict, chunk_size: int = 8,
                  skip_bad_images: bool = False) -> str:
    """The key of :func:`compute_proposals_for_images`'s output for these images and options."""
    return digest("proposals", PROPOSALS_REVISION, options, [str(i) for i, _ in items], [str(p) for _, p in items],
                  chunk_size, skip_bad_images)


def compute_proposals_for_images(
    items: Sequence[tuple[str, str | Path]],
    out: str | Path,
    options: dict,
    workers: int = 2,
    progress: bool = True,
    *,
    skip_bad_images: bool = False,
    chunk_size: int = 8,
    shard: tuple[int, int] | None = None,
) -> Mapping[str, np.ndarray]:
    """Proposals for every image, saved to ``out`` (``.npz``), resumable.

    The finished shards stay on disk and the final file is merged from them one at a time, so the
    memory does not grow with the number of images; the result reads ``out`` on demand.

    In a job of several processes, rank 0 first prepares the parts folder (:func:`prepare_parts`),
    then every rank calls this with ``shard=(rank, world)`` and computes only the shards ``n`` with
    ``n % world == rank`` (returning ``{}``), and finally rank 0 calls it without ``shard``: every
    shard is then on disk and it only merges them.

    Args:
        items: ``(image_id, image_path)`` pairs; ids must be unique. The order is kept.
        out: final ``.npz`` file (read back with :func:`proposals.load_proposals`).
        options: keyword arguments of :func:`proposals.propose` (``method`` and its options, e.g.
            ``{"method": "selective_search", "mode": "fast+", "min_size": 20, "max_boxes": 2000}``).
        workers: processes (spawned, each limited to one OpenCV thread); <= 1 runs in this process,
            with selective search split over the process's cores (one thread with ``shard``).
        progress: show a tqdm bar (images).
        skip_bad_images: False: a bad image raises ImageError naming it; True: warn, zero boxes.
        chunk_size: images per shard (the unit of resumption).
        shard: ``(rank, world)``: compute this rank's shards only (see above).
    Returns:
        mapping id -> ndarray float32 [R, 4] xyxy (:class:`~proposals.store.NpzProposals` over
        ``out``), in ``items`` order (``{}`` with ``shard``).
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
    key = proposals_key(items, options, chunk_size, skip_bad_images)
    parts = out.with_name(out.name + ".parts")
    if shard is None:
        # 1. a finished file made under the same key is the cache
        if out.is_file():
            if read_npz_meta(out) == key:
                data = _read_checked(out, ids, "proposal file")
                if data is not None:
                    log.info("%s: up to date, loading it", out)
                    return data
            else:
                log.info("%s exists but was made with other options or images; recomputing", out)
        # 2. parts folder: reuse it when it was made under the same key, else start clean
        _prepare(parts, key)
    elif not (parts / "key").is_file() or (parts / "key").read_text().strip() != key:
        raise RuntimeError(f"{parts}: the parts folder is not prepared for these images and options "
                           f"(rank 0 calls prepare_parts first)")

    chunks = [[(str(a), Path(b)) for a, b in items[i:i + chunk_size]] for i in range(0, len(items), chunk_size)]
    results: dict[int, int] = {}  # shard -> its number of images (the boxes stay in its file)
    todo = []
    for n, chunk in enumerate(chunks):
        if shard is not None and n % shard[1] != shard[0]:
            continue  # another rank's shard
        path = parts / f"chunk_{n:06d}.npz"
        if path.is_file():
            data = _read_checked(path, [i for i, _ in chunk], "shard")
            if data is not None:
                results[n] = len(data)
                continue
        todo.append((n, chunk, path, dict(options), skip_bad_images))
    if results:
        log.info("resuming: %d of %d shards already done", len(results), len(chunks))

    bar = tqdm(total=len(items), initial=sum(results.values()), unit="img", desc="proposals",
               disable=not progress)
    try:
        # here (workers <= 1) selective search takes the process's cores, unless this is one rank of
        # several (shard), whose ranks compute side by side
        for n, data in _run_shards(todo, workers, usable_cores() if shard is None else 1):
            results[n] = len(data)
            bar.update(len(data))
    finally:
        bar.close()
    if shard is not None:
        return {}

    merge_proposal_files(out, [parts / f"chunk_{n:06d}.npz" for n in range(len(chunks))], meta=key)
    shutil.rmtree(parts, ignore_errors=True)
    return NpzProposals(out)
