"""From per-window class scores to detections: threshold, clip, per-class NMS, top-k per class.

Shape shorthand:
    R: windows in one image      K: foreground classes      N: detections

Spec §9: per class keep windows scoring > -1.5, greedy NMS suppressing IoU > 0.3, keep at most 100
per class and image. Thresholding, clipping and the per-class top-k are vectorised over classes
(the top-k by a stable sort); NMS runs ``torchvision.ops.nms`` once per class on that class's
contiguous slice of the candidates (``nms_per_label``: the same result as
``torchvision.ops.batched_nms``, without its full-length masks per class), on each class's best
``8 x max_per_class`` candidates first (``nms_top_per_label``: exact, see there). No loop over windows.

IoU and the spec's +1: the spec's NMS computes IoU on 1-based inclusive pixel boxes with ``+1``
widths. In the project's continuous convention (``detector.boxes``) an inclusive VOC box
``(xmin..xmax)`` is ``(xmin - 1, xmax)``, whose plain width ``x2 - x1`` already equals
``xmax - xmin + 1``; so torchvision's IoU (no +1) on project boxes is *the same number* as the
spec's +1 IoU on the inclusive boxes, with no deviation. (Regressed boxes are fractional in both
conventions; the identity holds for them too.) torchvision also suppresses IoU strictly greater
than the threshold, as the spec does.

TorchScript: every function here compiles with ``torch.jit.script`` (typed lists, no numpy), so the
exported program (``detector.export``) runs this very code after the windows are scored.

Ties: with exactly equal scores torchvision's CPU and CUDA kernels may keep different boxes
(vision#2157); SVM scores are continuous, so this does not arise in practice.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torchvision.ops import batched_nms
from torchvision.ops import nms as _tv_nms


__all__ = ["nms", "nms_per_label", "nms_top_per_label", "detections_from_scores", "topk_per_class"]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3) -> Tensor:
    """Greedy NMS of one class (torchvision.ops.nms): suppresses boxes with IoU > ``iou_threshold``.

    Args:
        boxes (Tensor[N, 4]): xyxy.
        scores (Tensor[N]): higher is better.
        iou_threshold: IoU above which the lower-scored box is dropped.
    Returns:
        Tensor[N'] int64: indices of kept boxes, by decreasing score.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"nms expects boxes [N, 4] and scores [N], got {list(boxes.shape)}, {list(scores.shape)}")
    return _tv_nms(boxes.float(), scores.float(), float(iou_threshold))


def nms_per_label(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of each label's boxes separately; same result as ``torchvision.ops.batched_nms``.

    The candidates are grouped by label with one stable sort, and ``torchvision.ops.nms`` runs on
    each label's contiguous slice. torchvision's ``batched_nms`` (its CPU path for more than 1000
    boxes) instead builds a full-length ``idxs == label`` mask, a ``nonzero`` and a scatter for
    every label: 60 passes over 40000 entries for 2000 windows x 20 classes. On a quiet machine
    that costs only ~5% more (tools/benchmark.py, section detect), but each pass is a parallel
    region, and when the 2 cores are shared (another job running) they took 0.18 of batched_nms's
    0.21 s (profiled; the NMS kernels 0.02 s). The loop below runs once per label that has
    candidates, each iteration one kernel call on a slice.

    Args:
        boxes (Tensor[M, 4]): xyxy.
        scores (Tensor[M]): higher is better.
        labels (Tensor[M] int64): non-negative labels; boxes of different labels never suppress
            each other.
        iou_threshold: IoU above which the lower-scored box of a label is dropped.
    Returns:
        Tensor[M'] int64: indices of kept boxes, by decreasing score (stable for ties across labels).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.device.type != "cpu":
        # on a GPU torchvision's single-kernel offset trick is the fast path (no host sync per label)
        return batched_nms(boxes, scores, labels, iou_threshold)
    order = torch.argsort(labels, stable=True)  # (M,) labels grouped
    b, s = boxes[order], scores[order]
    counts: List[int] = torch.bincount(labels).tolist()  # one entry per label value
    slices: List[List[int]] = []  # [start, count] of each label that has candidates
    start = 0
    for n in counts:
        if n:
            slices.append([start, n])
            start += n
    if torch.jit.is_scripting():
        keeps = [_tv_nms(b[a:a + n], s[a:a + n], iou_threshold) + a for a, n in slices]
    else:
        keeps = _nms_slices_threaded(b, s, slices, iou_threshold)
    keep = order[torch.cat(keeps)]  # (M',)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


# torchvision's CPU NMS kernel releases the GIL, so labels' slices run side by side on threads;
# worth it only with many candidates: in a detection (2000 windows x 20 classes, 2 threads) the
# first round's 16000 took 12-14 ms threaded against 16-19 ms in turn, the second NMS's 2000 kept
# boxes 1.5-2.5 ms against 1.7-2.0 ms
_THREADED_NMS_MIN_BOXES = 4000
_nms_pool: Optional[ThreadPoolExecutor] = None
_nms_pool_lock = threading.Lock()
_nms_pool_size = 0


def _forget_nms_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool there if needed."""
    global _nms_pool, _nms_pool_size
    _nms_pool, _nms_pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_nms_pool)


@torch.jit.unused
def _nms_slices_threaded(b: Tensor, s: Tensor, slices: List[List[int]], iou_threshold: float) -> List[Tensor]:
    """``torchvision.ops.nms`` of each ``[start, count]`` slice of (b, s), offset back to ``b``'s rows,
    in slice order: on up to ``torch.get_num_threads()`` threads when the slices hold at least
    ``_THREADED_NMS_MIN_BOXES`` boxes in all (each slice's result is the same either way; 20 slices
    of 800 random boxes: 11.8 ms in turn, 5.9 ms on 2 threads)."""
    global _nms_pool, _nms_pool_size

    def one(sl: List[int]) -> Tensor:
        a, n = sl
        return _tv_nms(b[a:a + n], s[a:a + n], iou_threshold) + a

    threads = min(torch.get_num_threads(), len(slices))
    if threads < 2 or b.shape[0] < _THREADED_NMS_MIN_BOXES:
        return [one(sl) for sl in slices]
    with _nms_pool_lock:
        if _nms_pool is None or _nms_pool_size < threads:
            if _nms_pool is not None:
                _nms_pool.shutdown(wait=False)
            _nms_pool, _nms_pool_size = ThreadPoolExecutor(threads, thread_name_prefix="sppnet-nms"), threads
        pool = _nms_pool
    return list(pool.map(one, slices))


def _rank_in_order(labels: Tensor) -> Tensor:
    """Position of each entry among the entries of its label, in the given order (vectorised).

    Args:
        labels (Tensor[N] int64): labels of an ordered list.
    Returns:
        Tensor[N] int64: 0 for the first entry of each label, 1 for the second, ...
    """
    n = labels.shape[0]
    order = torch.argsort(labels, stable=True)  # (N,) groups labels, keeps the given order inside
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)  # (max_label + 1,)
    starts = torch.cumsum(counts, 0) - counts  # first position of each label in `order`
    rank_sorted = torch.arange(n, device=labels.device) - starts[sorted_labels]  # (N,)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def topk_per_class(labels: Tensor, k: int) -> Tensor:
    """Mask keeping the first ``k`` entries of each label, in the given order (vectorised).

    Args:
        labels (Tensor[N] int64): labels of a score-sorted list.
        k: entries kept per label.
    Returns:
        Tensor[N] bool.
    """
    if labels.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=labels.device)
    return _rank_in_order(labels) < k


def nms_top_per_label(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, k: int,
                      first: Optional[int] = None) -> Tensor:
    """Per-label greedy NMS that settles each label's ``k`` best kept boxes from few candidates.

    Greedy NMS decides a box's fate from higher-scored boxes only, so NMS on a label's ``m``
    best-scored candidates keeps exactly the boxes that NMS on all of them keeps among those ``m``.
    Once that is at least ``k`` boxes (or ``m`` covers the label), the label's ``k`` best kept boxes
    are final; labels not yet settled run again on ``4 m`` candidates. The NMS kernel's cost grows
    with kept boxes x candidates: on 2000 selective-search windows x 20 classes of a random model
    (the benchmark's worst case, every window above the score threshold) NMS keeps ~400 windows per
    class, and this replaces those 20 x 2000-box calls by 20 x ``8 k``-box calls (tools/benchmark.py,
    section detect, measures both). Equal scores (windows that project onto the same conv5 cells)
    are ordered by a stable sort here and unstably inside torchvision's kernel: either order is a
    valid greedy NMS.

    Args:
        boxes (Tensor[M, 4]), scores (Tensor[M]), labels (Tensor[M] int64): candidates.
        iou_threshold: suppress IoU above this.
        k: kept boxes needed per label (> 0).
        first: candidates per label in the first round (default ``8 k``: on the benchmark's worst
            case, 40000 candidates, 32 ms vs 41 ms with ``4 k`` (which needed a second round for 9 of
            the 20 classes) and 36 ms with ``2 k``; all candidates at once: 94 ms).
    Returns:
        Tensor[M'] int64: indices of kept boxes by decreasing score: the ``k`` best kept boxes of
        every label (all of them for a label that keeps fewer), possibly more.
    """
    m = 8 * k if first is None else int(first)
    if boxes.shape[0] <= m or k <= 0:
        return nms_per_label(boxes, scores, labels, iou_threshold)
    n_lab = int(labels.max()) + 1
    order = torch.argsort(scores, descending=True, stable=True)  # (M,)
    rank = torch.empty_like(order)
    rank[order] = _rank_in_order(labels[order])  # (M,) rank by score within the label
    count = torch.bincount(labels, minlength=n_lab)  # (L,)
    pending = torch.ones(n_lab, dtype=torch.bool, device=labels.device)  # (L,)
    keeps: List[Tensor] = []
    while True:
        idx = torch.nonzero(pending[labels] & (rank < m)).squeeze(1)  # (m',)
        kept = idx[nms_per_label(boxes[idx], scores[idx], labels[idx], iou_threshold)]
        n_kept = torch.bincount(labels[kept], minlength=n_lab)  # (L,)
        done = pending & ((n_kept >= k) | (count <= m))  # (L,)
        keeps.append(kept[done[labels[kept]]])
        pending &= ~done
        if not bool(pending.any()):
            break
        m *= 4
    keep = torch.cat(keeps)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _clip(boxes: Tensor, height: int, width: int) -> Tensor:
    """``detector.boxes.clip_boxes`` for Tensor[M, 4] (the same clamps), in TorchScript's subset."""
    x = boxes[:, 0::2].clamp(0, width)  # (M, 2)
    y = boxes[:, 1::2].clamp(0, height)  # (M, 2)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)  # (M, 4)


def detections_from_scores(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float,
    nms_thresh: float,
    max_per_class: int,
    image_size: Optional[List[int]] = None,
    return_indices: bool = False,
) -> Dict[str, Tensor]:
    """Per-class detections of one image.

    Args:
        boxes (Tensor[R, 4] or Tensor[R, K, 4]): xyxy windows (shared by all classes) or per-class
            regressed boxes, original-image pixels.
        scores (Tensor[R, K]): class scores (SVM margins), no background column.
        score_thresh: candidates need ``score > score_thresh`` (spec: -1.5; use ``-inf`` for none).
        nms_thresh: per-class NMS IoU threshold (0.3).
        max_per_class: detections kept per class after NMS (100; <= 0 = no limit).
        image_size: (H, W); boxes are clipped to ``[0, W] x [0, H]`` before NMS and candidates that
            become empty (zero width or height) are dropped. None = no clipping.
        return_indices: also return ``window_index`` (Tensor[N] int64): the row of ``scores`` each
            detection came from (e.g. to regress only the kept boxes, spec §8).
    Returns:
        dict with ``boxes`` (Tensor[N, 4] float32, xyxy), ``scores`` (Tensor[N] float32) and
        ``labels`` (Tensor[N] int64, in [0, K)), sorted by decreasing score.
    """
    if scores.ndim != 2:
        raise ValueError(f"detections_from_scores expects scores [R, K], got {list(scores.shape)}")
    r, k = scores.shape[0], scores.shape[1]
    if not (list(boxes.shape) == [r, 4] or list(boxes.shape) == [r, k, 4]):
        raise ValueError(f"detections_from_scores expects boxes [R, 4] or [R, K, 4] with R={r}, K={k}, got "
                         f"{list(boxes.shape)}")
    mask = scores > score_thresh  # (R, K)
    nz = torch.nonzero(mask)  # (M, 2) row-major: window, then class
    win, lab = nz[:, 0], nz[:, 1]  # (M,), (M,)
    cand_scores = scores[win, lab].float()  # (M,)
    cand_boxes = (boxes[win] if boxes.ndim == 2 else boxes[win, lab]).float()  # (M, 4)
    if image_size is not None:
        cand_boxes = _clip(cand_boxes, image_size[0], image_size[1])
        ok = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])  # (M,)
        win, lab, cand_scores, cand_boxes = win[ok], lab[ok], cand_scores[ok], cand_boxes[ok]
    if max_per_class > 0 and cand_boxes.device.type == "cpu":
        keep = nms_top_per_label(cand_boxes, cand_scores, lab, float(nms_thresh), max_per_class)
        keep = keep[topk_per_class(lab[keep], max_per_class)]  # (N,) by decreasing score
    else:
        # every label at once; on a GPU one batched_nms kernel (nms_top_per_label's rounds would
        # each wait for the device), then the per-class top k
        keep = nms_per_label(cand_boxes, cand_scores, lab, float(nms_thresh))  # (N,) by decreasing score
        if max_per_class > 0:
            keep = keep[topk_per_class(lab[keep], max_per_class)]
    out = {
        "boxes": cand_boxes[keep].contiguous(),
        "scores": cand_scores[keep].contiguous(),
        "labels": lab[keep].to(torch.int64),
    }
    if return_indices:
        out["window_index"] = win[keep].to(torch.int64)
    return out
