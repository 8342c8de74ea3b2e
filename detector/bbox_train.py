"""Training the box regressors on any number of images in bounded memory (spec §8).

Shape shorthand:
    R: windows of one image      N: samples of a class      K: foreground classes
    D: pooled conv5 width (C*B)   M: D + 1 (the bias column)

Samples (spec §8): every window of a training image (GT boxes included) with IoU > ``min_iou`` to
its best ground-truth box, assigned to that box's class, with that box as its target; optionally
(``bbox_reg.jitter_per_gt``, a deviation) also boxes drawn around each GT box (:func:`jitter_gt`),
kept by the same rule. Their pooled conv5 features are D floats each (51 KB for ZF-5), so the
samples of a VOC-sized set do not fit in memory. They go to disk instead, one file per image:

1. **Collect** (:func:`collect_samples`): each process pools the samples of its share of the images
   and writes ``<folder>/<image index>.npz`` atomically (``x<c>``, ``p<c>``, ``t<c>`` per class c:
   features, windows, targets; ``counts``: samples per class). A file already there and intact is
   kept, so a rerun after a kill resumes from the images already done.
2. **Fit** (:func:`fit_from_samples`): one class at a time, reading only that class's members.
   A class with fewer samples than M is solved in the dual form on its stacked samples (an N x N
   problem; N < M bounds it); a larger one in the primal form from ``X^T X`` and ``X^T Y`` summed
   over chunks of rows (one M x M matrix, whatever N). Classes are split across processes.

Memory is so bounded by one image's samples while collecting and by about ``M^2`` float64 values
while fitting, whatever the number of images. Results: equal to stacking every sample and calling
:func:`detector.bbox_reg.fit_bbox_regressor` (bit for bit in the dual form; in the primal form the
chunked sums round differently, within 1e-9 relative, see ``tests/test_bbox_train.py``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from detector import distributed
from detector.artifacts import atomic_path, verify
from detector.bbox_reg import BoxRegressor, decode, fit_bbox_regressor, ridge_solve_normal, whiten_targets
from detector.boxes import clip_boxes, pairwise_iou
from detector.config import BBoxRegConfig
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from detector.train_items import candidates

if TYPE_CHECKING:
    from detector.train_items import TrainItem

__all__ = ["jitter_gt", "collect_samples", "fit_from_samples", "train_box_regressors"]

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # rows per X^T X update of the primal form


def _sample_path(folder: Path, i: int) -> Path:
    return folder / f"{i:07d}.npz"


def _read_counts(path: Path, num_classes: int) -> np.ndarray | None:
    """Samples per class of an intact sample file, or None (missing, damaged, other classes)."""
    why = verify(path)
    if why is not None:
        if why != "missing":
            log.warning("box-regression samples %s: %s; pooled again", path, why)
        return None
    with np.load(path) as z:
        counts = z["counts"] if "counts" in z.files else None
    if counts is None or counts.shape != (num_classes,):
        log.warning("box-regression samples %s: not a sample file of %d classes; pooled again", path, num_classes)
        return None
    return counts.astype(np.int64)


def jitter_gt(gt: Tensor, n: int, sigma: float, height: int, width: int, generator: torch.Generator) -> Tensor:
    """``n`` boxes drawn around each ground-truth box, clipped to the image.

    Each box moves its centre by ``sigma * w * N(0, 1)`` horizontally and ``sigma * h * N(0, 1)``
    vertically and scales its width and height by ``exp(sigma * N(0, 1))`` (independent draws, in
    the order GT box, sample, then (dx, dy, dw, dh)): :func:`detector.bbox_reg.decode` of Gaussian
    deltas, then :func:`detector.boxes.clip_boxes`. Samples whose IoU with a GT box is too low are
    left to the caller's filter.

    Args:
        gt (Tensor[G, 4]): xyxy ground-truth boxes, image pixels.
        n: samples per box.
        sigma: standard deviation of the deltas.
        height, width: image size; boxes are clipped to ``[0, width] x [0, height]``.
        generator: the source of the draws (seeded by the caller, so samples are reproducible).
    Returns:
        Tensor[G * n, 4] float32 xyxy: box g's samples are rows ``g * n`` to ``g * n + n - 1``.
    """
    gt = gt.to(torch.float32).reshape(-1, 4)  # (G, 4)
    if n == 0 or gt.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    d = torch.randn((gt.shape[0], n, 4), generator=generator, dtype=torch.float32) * sigma  # (G, n, 4)
    boxes = decode(gt.repeat_interleave(n, dim=0), d.reshape(-1, 4))  # (G*n, 4)
    return clip_boxes(boxes, height, width)


def collect_samples(
    items: Sequence["TrainItem"],
    load_pyramid: Callable[["TrainItem"], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    pool_scale: float,
    min_iou: float,
    folder: str | Path,
    progress: bool = True,
    jitter: int = 0,
    jitter_sigma: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Pool every image's regression samples and write them to ``folder`` (one file per image).

    With several processes each pools its share of the images; the counts are gathered.

    Args:
        items: training items (no flips).
        load_pyramid: item -> its conv5 pyramid (the conv5 cache).
        levels, proj: SPP levels and projection constants.
        pool_scale: the spec §8 scale applied to the pooled features.
        min_iou: a window is a sample when its IoU with its best GT box is above this.
        folder: where the per-image files go (shared by the processes of a job).
        jitter, jitter_sigma: ``jitter`` boxes per GT box from :func:`jitter_gt`, appended to the
            image's windows and kept by the same IoU rule; image ``i`` draws them from a generator
            seeded with ``(seed, i)``, so they do not depend on how images are split across processes.
    Returns:
        ndarray[len(items), K] int64: samples per image and class, on every rank.
    Raises:
        RuntimeError: features that are not finite (the image is named).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mine: dict[int, np.ndarray] = {}
    reused = 0
    for i in tqdm(distributed.shard(range(len(items))), desc="box-regression samples", disable=not progress,
                  unit="img"):
        path = _sample_path(folder, i)
        counts = _read_counts(path, num_classes)
        if counts is not None:
            mine[i] = counts
            reused += 1
            continue
        item = items[i]
        arrays: dict[str, np.ndarray] = {}
        counts = np.zeros(num_classes, dtype=np.int64)
        if item.gt_boxes.shape[0]:
            cand = candidates(item)  # (G+R, 4)
            if jitter:
                g = torch.Generator().manual_seed(_image_seed(seed, i))
                extra = jitter_gt(item.gt_boxes, jitter, jitter_sigma, item.record.height, item.record.width, g)
                cand = torch.cat([cand, extra])  # (G+R+G*jitter, 4)
            best, arg = pairwise_iou(cand, item.gt_boxes).max(dim=1)  # (G+R,)
            keep = torch.nonzero(best > min_iou).flatten()
            if keep.numel():
                feats = pool_regions(load_pyramid(item), cand[keep], levels, proj).cpu() * pool_scale  # (n, D)
                if not bool(torch.isfinite(feats).all()):
                    raise RuntimeError(f"box-regression features of image '{item.record.image_id}' are not finite: "
                                       f"the trunk weights or that image's conv5 cache entry hold NaN/inf")
                cls = item.gt_labels[arg[keep]]
                for c in torch.unique(cls).tolist():
                    m = cls == c
                    arrays[f"x{c}"] = feats[m].numpy()
                    arrays[f"p{c}"] = cand[keep][m].numpy()
                    arrays[f"t{c}"] = item.gt_boxes[arg[keep]][m].numpy()
                    counts[c] = int(m.sum())
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, counts=counts, **arrays)
        mine[i] = counts
    if reused:
        log.info("box-regression samples: %d images read back from %s (an earlier run's)", reused, folder)
    for part in distributed.all_gather(mine):
        mine.update(part)
    return np.stack([mine[i] for i in range(len(items))]) if items else np.zeros((0, num_classes), np.int64)


def _image_seed(seed: int, i: int) -> int:
    """A 63-bit seed for image ``i`` of a run seeded with ``seed`` (distinct pairs, distinct seeds)."""
    return (seed * 1_000_003 + i) % (1 << 63)


class _ClassSamples:
    """One class's samples across the per-image files, in image order, optionally a subset.

    Args:
        folder: the sample files.
        counts (ndarray[I]): the class's samples per image.
        c: the class.
        select (Tensor[N'] int64 | None): positions in the concatenation to keep, in this order.
    """

    def __init__(self, folder: Path, counts: np.ndarray, c: int, select: Tensor | None) -> None:
        self.folder, self.c = folder, c
        self.images = np.nonzero(counts)[0].tolist()
        n = counts[self.images]
        self.offsets = np.concatenate([[0], np.cumsum(n)])  # (I'+1,)
        total = int(self.offsets[-1])
        self.select = select
        # where each kept sample goes: out_pos[g] = position in the output of global row g, or -1
        if select is None:
            self.out_pos = None
            self.n = total
        else:
            self.out_pos = np.full(total, -1, dtype=np.int64)
            self.out_pos[select.numpy()] = np.arange(select.shape[0])
            self.n = int(select.shape[0])

    def _rows(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows of image j's member to keep, their output positions)."""
        lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
        if self.out_pos is None:
            return np.arange(hi - lo), np.arange(lo, hi)
        pos = self.out_pos[lo:hi]
        rows = np.nonzero(pos >= 0)[0]
        return rows, pos[rows]

    def stacked(self, member: str) -> np.ndarray:
        """The member (``x``, ``p`` or ``t``) of every kept sample, stacked in output order."""
        out = None
        for j, i in enumerate(self.images):
            rows, pos = self._rows(j)
            if rows.size == 0:
                continue
            with np.load(_sample_path(self.folder, i)) as z:
                a = z[f"{member}{self.c}"]
            if out is None:
                out = np.empty((self.n, a.shape[1]), dtype=a.dtype)
            out[pos] = a[rows]
        assert out is not None
        return out

    def normal_equations(self, yw: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """``X^T X`` (ndarray[M, M]) and ``X^T Y`` (ndarray[M, 4]) in float64, X = [features, 1],
        Y = ``yw`` (ndarray[N, 4], output order), summed over chunks of about ``chunk_rows`` rows
        taken in image order."""
        xtx = xty = None
        buf_x: list[np.ndarray] = []
        buf_y: list[np.ndarray] = []

        def flush() -> None:
            nonlocal xtx, xty
            x = np.concatenate(buf_x).astype(np.float64)  # (n, D)
            x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # (n, M)
            y = np.concatenate(buf_y)  # (n, 4)
            xtx = x.T @ x if xtx is None else xtx + x.T @ x  # (M, M)
            xty = x.T @ y if xty is None else xty + x.T @ y  # (M, 4)
            buf_x.clear()
            buf_y.clear()

        for j, i in enumerate(self.images):
            rows, pos = self._rows(j)
            if rows.size == 0:
                continue
            with np.load(_sample_path(self.folder, i)) as z:
                buf_x.append(z[f"x{self.c}"][rows])
            buf_y.append(yw[pos])
            if sum(b.shape[0] for b in buf_x) >= chunk_rows:
                flush()
        if buf_x:
            flush()
        assert xtx is not None and xty is not None
        return xtx, xty


def fit_from_samples(
    folder: str | Path,
    counts: np.ndarray,
    params: BBoxRegConfig,
    seed: int,
    class_names: Sequence[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> BoxRegressor | None:
    """Fit every class's regressor from the sample files of :func:`collect_samples`.

    A class with more than ``params.max_per_class`` samples (when > 0) keeps a random subset drawn
    with one generator seeded by ``seed``, the classes in order. With several processes each fits
    its share of the classes; rank 0 packs them.

    Args:
        folder: the sample files.
        counts (ndarray[I, K]): samples per image and class.
        params: ``lam``, ``whiten_eps``, ``max_per_class``.
        chunk_rows: rows per ``X^T X`` update in the primal form.
    Returns:
        BoxRegressor (weight [D+1, 4K], whitening folded in) on rank 0, None on the others.
    Raises:
        RuntimeError: no class has a sample.
    """
    folder = Path(folder)
    K = counts.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(K)]
    g = torch.Generator().manual_seed(seed)
    selects: list[Tensor | None] = []
    for c in range(K):  # every rank draws every class's subset: the same generator sequence
        n = int(counts[:, c].sum())
        cap = params.max_per_class
        selects.append(torch.randperm(n, generator=g)[:cap] if cap and n > cap else None)
    mine = distributed.shard([c for c in range(K) if counts[:, c].sum() > 0])
    fitted: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    in_dim = None
    for c in mine:
        smp = _ClassSamples(folder, counts[:, c], c, selects[c])
        p, t = torch.from_numpy(smp.stacked("p")), torch.from_numpy(smp.stacked("t"))  # (N, 4)
        with np.load(_sample_path(folder, smp.images[0])) as z:
            in_dim = int(z[f"x{c}"].shape[1])
        if smp.n < in_dim + 1:  # dual form on the stacked samples (N < M)
            x = torch.from_numpy(smp.stacked("x"))  # (N, D)
            fitted[c] = fit_bbox_regressor(x.double(), p, t, lam=params.lam, whiten_eps=params.whiten_eps)
            form = "dual"
        else:  # primal form from chunked normal equations
            yw, mu, t_inv = whiten_targets(p, t, params.whiten_eps)
            xtx, xty = smp.normal_equations(yw.numpy(), chunk_rows)
            fitted[c] = (ridge_solve_normal(xtx, xty, params.lam), mu, t_inv)
            del xtx, xty
            form = "primal"
        log.info("bbox regression %s: fitted on %d samples (%s form)", names[c], smp.n, form)
    parts = distributed.all_gather((fitted, in_dim))
    if not distributed.current().main:
        return None
    for part, d in parts:
        fitted.update(part)
        in_dim = in_dim if d is None else d
    if in_dim is None:
        raise RuntimeError(f"no box-regression samples: no window overlaps a ground-truth box by IoU > "
                           f"{params.min_iou:.2f}")
    for c in range(K):
        if c not in fitted:
            log.warning("bbox regression %s: no samples, no regressor (its boxes stay the proposals)", names[c])
    return BoxRegressor.from_per_class([fitted.get(c) for c in range(K)], in_dim)


@torch.inference_mode()
def train_box_regressors(
    items: Sequence["TrainItem"],
    load_pyramid: Callable[["TrainItem"], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    pool_scale: float,
    params: BBoxRegConfig,
    seed: int,
    folder: str | Path,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    keep_samples: bool = False,
) -> BoxRegressor | None:
    """Per-class ridge regressors from pooled conv5 features to box deltas (spec §8):
    :func:`collect_samples` into ``folder``, then :func:`fit_from_samples`.

    Args:
        folder: scratch folder of the per-image sample files (shared by the processes of a job).
            It is removed once the regressors are fitted unless ``keep_samples``.
    Returns:
        BoxRegressor with ``feature_scale = pool_scale`` on rank 0; None on the other ranks.
    """
    folder = Path(folder)
    counts = collect_samples(items, load_pyramid, levels, proj, num_classes, pool_scale, params.min_iou, folder,
                             progress=progress, jitter=params.jitter_per_gt, jitter_sigma=params.jitter_sigma,
                             seed=seed)
    if counts.sum() == 0:
        raise RuntimeError(f"no box-regression samples: no window overlaps a ground-truth box by IoU > "
                           f"{params.min_iou:.2f}")
    reg = fit_from_samples(folder, counts, params, seed, class_names)
    distributed.barrier("box regressors fitted")
    if not keep_samples and distributed.current().main:
        shutil.rmtree(folder, ignore_errors=True)
    if reg is not None:
        reg.feature_scale = float(pool_scale)
    return reg
