"""Per-class linear SVMs on fc7 features with hard-negative mining (spec §7).

Shape shorthand:
    R: windows in one image      F: feature width (fc7, 4096)      K: foreground classes
    P: positives of a class      Q: negatives of a class           N: feature rows (any)

Solver: scikit-learn's bundled liblinear through ``sklearn.svm.LinearSVC(loss="hinge", dual=True)``,
which is liblinear ``-s 3`` (L2-regularised hinge loss, dual coordinate descent). The spec's
liblinear 1.93 options map as follows (checked against sklearn 1.9 ``svm/_base.py::_fit_liblinear``):

- ``-c C``            -> ``C=C``
- ``-w1 2``           -> ``class_weight={1: 2.0, -1: 1.0}`` (liblinear multiplies C per class)
- ``-B 10``           -> ``fit_intercept=True, intercept_scaling=10``: sklearn passes the scaling as
                         liblinear's bias feature; the synthetic feature's weight is regularised like
                         every other weight and ``intercept_ = 10 * w_B``.

So the minimised objective is the spec's
``C * (2 * sum_pos hinge + sum_neg hinge) + 1/2 ||w||^2 + 1/2 (b / 10)^2`` (:func:`svm_objective`).
Tolerance: ``-e``, passed as sklearn's ``tol``. The training flow uses ``svm.tol`` (default 0.1, the
liblinear command line's default for the dual solvers, which the spec's code used); the functions
here default to sklearn's tighter 1e-4 (the same objective solved more accurately). ``random_state`` fixes
liblinear's coordinate order, so a fit is deterministic. A ``ConvergenceWarning`` (``max_iter``
passes reached) is caught and logged as a warning with the class; the solution is still used.

Features must already be scaled to mean L2 norm 20 (``detector.feature_stats``; spec §7: the C of
0.001 assumes it), at training and at test time alike.

:func:`train_svms` runs the whole step on training items (fc7 of every window, one mining pass);
:class:`LinearSVMs` holds the K trained classifiers and scores all windows with one matmul.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from detector import distributed
from detector.boxes import pairwise_iou
from detector.config import SVMConfig
from detector.regions import Conv5Pyramid, ProjectionParams, distinct_windows, pool_regions
from detector.train_items import candidates

if TYPE_CHECKING:
    from detector.train_items import TrainItem

__all__ = [
    "train_linear_svm",
    "svm_objective",
    "svm_scores",
    "HardNegativeMiner",
    "LinearSVMs",
    "train_svms",
]

log = logging.getLogger(__name__)


def svm_objective(w: Tensor, b: float, pos: Tensor, neg: Tensor, C: float, pos_weight: float,
                  bias: float) -> dict[str, float]:
    """The liblinear primal objective of a linear SVM, split into its terms (float64).

    ``C * pos_weight * sum_pos max(0, 1 - s) + C * sum_neg max(0, 1 + s) + 1/2 ||w||^2 + 1/2 (b/bias)^2``
    with ``s = x . w + b``.

    Args:
        w (Tensor[F]), b: the classifier.
        pos (Tensor[P, F]), neg (Tensor[Q, F]): features.
    Returns:
        dict with ``pos_loss``, ``neg_loss``, ``reg``, ``total``.
    """
    w64 = w.double().flatten()  # (F,)
    zp = pos.double() @ w64 + b
    zn = neg.double() @ w64 + b
    pos_loss = C * pos_weight * float((1.0 - zp).clamp(min=0).sum())
    neg_loss = C * float((1.0 + zn).clamp(min=0).sum())
    reg = 0.5 * float(w64 @ w64) + 0.5 * (b / bias) ** 2
    return {"pos_loss": pos_loss, "neg_loss": neg_loss, "reg": reg, "total": pos_loss + neg_loss + reg}


def train_linear_svm(
    pos: Tensor,
    neg: Tensor,
    C: float,
    pos_weight: float,
    bias: float,
    tol: float = 1e-4,
    max_iter: int = 10000,
    random_state: int = 0,
    name: str = "",
) -> tuple[Tensor, float]:
    """One binary linear SVM with liblinear (``-s 3 -c C -w1 pos_weight -B bias``).

    Args:
        pos (Tensor[P, F]): positive features (P >= 1).
        neg (Tensor[Q, F]): negative features (Q >= 1).
        C, pos_weight, bias: liblinear's ``-c``, ``-w1`` and ``-B`` (spec §7: 0.001, 2, 10).
        tol: stopping tolerance of the dual coordinate descent (sklearn's default).
        max_iter: passes over the data before liblinear stops (then a warning is logged).
        random_state: seeds liblinear's coordinate shuffling.
        name: label for log messages (e.g. the class name).
    Returns:
        (w, b): w (Tensor[F] float32) and the intercept b (float); score = ``x @ w + b``.
    Note:
        liblinear works on a float64 copy of the stacked features (8 bytes x (P+Q) x F).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"train_linear_svm expects pos [P, F] and neg [Q, F], got {tuple(pos.shape)} and {tuple(neg.shape)}")
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError(f"train_linear_svm{' ' + name if name else ''}: needs at least one positive and one "
                         f"negative, got {pos.shape[0]} and {neg.shape[0]}")
    x = np.concatenate([pos.detach().cpu().double().numpy(), neg.detach().cpu().double().numpy()], axis=0)  # (P+Q, F)
    y = np.concatenate([np.ones(pos.shape[0]), -np.ones(neg.shape[0])])  # (P+Q,)
    svc = LinearSVC(
        loss="hinge",
        dual=True,
        C=C,
        class_weight={1: pos_weight, -1: 1.0},
        fit_intercept=True,
        intercept_scaling=bias,
        tol=tol,
        max_iter=max_iter,
        random_state=random_state,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(x, y)
    for wrn in caught:
        if issubclass(wrn.category, ConvergenceWarning):
            log.warning("svm %s: liblinear did not converge in %d passes (tol %g); using the last iterate",
                        name or "?", max_iter, tol)
        else:
            warnings.warn_explicit(wrn.message, wrn.category, wrn.filename, wrn.lineno)
    # classes_ is sorted, so classes_[1] == +1 and coef_ scores the positive class
    assert svc.classes_[1] == 1
    w = torch.from_numpy(svc.coef_[0].astype(np.float32))  # (F,)
    return w, float(svc.intercept_[0])


def svm_scores(features: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """All classes' SVM scores as one matmul.

    Args:
        features (Tensor[R, F]): scaled fc7 features.
        W (Tensor[F, K]): weights, one column per class.
        b (Tensor[K]): intercepts.
    Returns:
        Tensor[R, K]: ``features @ W + b`` (no background column).
    """
    if features.ndim != 2 or W.ndim != 2 or features.shape[1] != W.shape[0] or b.shape != (W.shape[1],):
        raise ValueError(f"svm_scores: features [R, F], W [F, K], b [K] expected, got "
                         f"{tuple(features.shape)}, {tuple(W.shape)}, {tuple(b.shape)}")
    return torch.addmm(b.to(features.dtype), features, W.to(features.dtype))  # (R, K)


class _ClassCache:
    """Cached training data of one class: positives, negatives and their dedup keys."""

    def __init__(self, feat_dim: int) -> None:
        self.pos: list[Tensor] = []
        self.neg = torch.zeros(0, feat_dim)  # (Q, F) float32
        self.neg_keys = torch.zeros(0, dtype=torch.int64)  # (Q,)
        self.pending: list[Tensor] = []  # new negatives since the last retrain
        self.pending_keys: list[Tensor] = []
        self.num_added = 0
        self.dirty = False  # positives changed since the last retrain
        self.trained = False
        self.history: list[dict[str, float]] = []

    def flush(self) -> None:
        if self.pending:
            self.neg = torch.cat([self.neg, *self.pending], dim=0)  # (Q, F)
            self.neg_keys = torch.cat([self.neg_keys, *self.pending_keys], dim=0)  # (Q,)
            self.pending, self.pending_keys = [], []

    def all_keys(self) -> Tensor:
        return torch.cat([self.neg_keys, *self.pending_keys], dim=0)  # (Q,)

    def num_neg(self) -> int:
        return self.neg.shape[0] + sum(p.shape[0] for p in self.pending)


class HardNegativeMiner:
    """One pass of R-CNN/SPP-net hard-negative mining over the training images (spec §7).

    Usage::

        miner = HardNegativeMiner(K, F, **spec_options)   # C, pos_weight, bias, hard/evict thresholds
        for c in range(K): miner.add_positives(c, gt_feats_of_class_c)   # GT boxes only
        for img in images:                                                # no flips
            miner.process_image(feats, neg_mask, keys)                    # feats scaled to norm 20
        W, b = miner.finish()                                             # [F, K], [K]

    Per image: the first image contributes all of its negatives for every class; a later image
    contributes, per class, the negatives that score ``> hard_thresh`` under the current classifier
    and are not cached yet. A class is retrained (on all its positives and cached negatives) after
    the first image and whenever more than ``retrain_every`` new negatives have accumulated; after
    each retrain its cached negatives scoring ``< evict_thresh`` are evicted, which bounds memory.
    :meth:`finish` retrains every class with pending data. A class that has negatives but not yet a
    classifier has W = 0, b = 0, so all its negatives count as hard (as in the R-CNN code).

    Args:
        num_classes: K.
        feat_dim: F.
        C, pos_weight, bias: liblinear options (spec: 0.001, 2, 10).
        hard_thresh: a negative is hard when it scores above this (-1.0001).
        evict_thresh: cached negatives scoring below this are dropped after a retrain (-1.2).
        retrain_every: retrain a class when more than this many new negatives are pending (2000).
        tol, max_iter: liblinear stopping rule (see :func:`train_linear_svm`).
        class_names: names for log lines.
        max_hard_per_image: after the first image, add at most this many new hard negatives per
            class and image, the highest-scoring first (0 = no cap, as the spec).
        active: the classes to train (default all); a process of a distributed job trains its share.
        max_cache: after each retrain keep at most this many cached negatives per class, the
            highest-scoring (0 = no cap, as the spec: its eviction bounds the cache by score only).
    Attributes:
        W (Tensor[F, K]), b (Tensor[K]): the current classifiers.
        num_images (int): images processed so far.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        C: float,
        pos_weight: float,
        bias: float,
        hard_thresh: float,
        evict_thresh: float,
        retrain_every: int,
        tol: float = 1e-4,
        max_iter: int = 10000,
        class_names: Sequence[str] | None = None,
        max_hard_per_image: int = 0,
        active: Sequence[int] | None = None,
        max_cache: int = 0,
    ) -> None:
        if num_classes <= 0 or feat_dim <= 0:
            raise ValueError(f"num_classes and feat_dim must be positive, got {num_classes}, {feat_dim}")
        if evict_thresh >= hard_thresh:
            log.warning("evict_thresh %.4f >= hard_thresh %.4f: freshly mined negatives may be evicted at once",
                        evict_thresh, hard_thresh)
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.C, self.pos_weight, self.bias = C, pos_weight, bias
        self.hard_thresh, self.evict_thresh = hard_thresh, evict_thresh
        self.retrain_every = retrain_every
        self.tol, self.max_iter = tol, max_iter
        self.max_hard_per_image = int(max_hard_per_image)
        self.max_cache = int(max_cache)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {num_classes} classes")
        self.W = torch.zeros(feat_dim, num_classes)  # (F, K)
        self.b = torch.zeros(num_classes)  # (K,)
        self.num_images = 0
        # the classes this miner trains; the others keep W = 0 here (another process trains them).
        # Scores are still computed against the whole [F, K] W, so a class's scores do not depend
        # on which classes a process trains.
        self.active = sorted(set(range(num_classes) if active is None else (int(c) for c in active)))
        self._caches = [_ClassCache(feat_dim) for _ in range(num_classes)]

    # ------------------------------------------------------------------------------------------
    def add_positives(self, cls: int, feats: Tensor) -> None:
        """Add positive features of class ``cls`` (spec §7: ground-truth boxes only).

        Args:
            cls: class id in [0, K).
            feats (Tensor[P, F]): scaled features; may be called several times per class.
        """
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"class id {cls} outside [0, {self.num_classes})")
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(f"add_positives expects Tensor[P, {self.feat_dim}], got {tuple(feats.shape)}")
        if feats.shape[0] == 0:
            return
        cache = self._caches[cls]
        cache.pos.append(feats.detach().to("cpu", torch.float32).clone())
        cache.dirty = True

    def num_positives(self, cls: int) -> int:
        return sum(p.shape[0] for p in self._caches[cls].pos)

    def num_negatives(self, cls: int) -> int:
        """Negatives cached for ``cls`` (including those not yet trained on)."""
        return self._caches[cls].num_neg()

    def negative_keys(self, cls: int) -> Tensor:
        """Tensor[Q] int64: dedup keys ``image_index * 2**32 + key`` of the cached negatives of ``cls``."""
        return self._caches[cls].all_keys().clone()

    # ------------------------------------------------------------------------------------------
    def process_image(
        self,
        features: Tensor,
        neg_mask: Tensor,
        keys: Tensor | None = None,
        image_index: int | None = None,
    ) -> dict[str, int]:
        """Mine the negatives of one image for every class, then retrain the classes that need it.

        Args:
            features (Tensor[R, F]): scaled fc7 features of the image's windows (float16/32).
            neg_mask (Tensor[R, K] bool): True where window r may be a negative of class k (IoU < 0.3
                with every GT of class k).
            keys (Tensor[R] int64, optional): dedup keys in [0, 2**32): windows of this image with
                equal keys are the same sample (spec §7: same conv5 window and scale); the first one
                is used. Default: the window index.
            image_index: index of the image in the pass (default: a counter). A (image_index, key)
                pair already cached for a class is not added again.
        Returns:
            dict with ``added`` (new negatives over all classes) and ``retrained`` (classes retrained).
        """
        R = features.shape[0]
        if features.ndim != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"process_image expects features [R, {self.feat_dim}], got {tuple(features.shape)}")
        if neg_mask.shape != (R, self.num_classes) or neg_mask.dtype != torch.bool:
            raise ValueError(f"process_image expects neg_mask bool [{R}, {self.num_classes}], got "
                             f"{neg_mask.dtype} {tuple(neg_mask.shape)}")
        if keys is None:
            keys = torch.arange(R, dtype=torch.int64)
        if keys.shape != (R,):
            raise ValueError(f"process_image expects keys [R={R}], got {tuple(keys.shape)}")
        keys = keys.to("cpu", torch.int64)
        if R and (int(keys.min()) < 0 or int(keys.max()) >= 2**32):
            raise ValueError("process_image: keys must lie in [0, 2**32)")
        first_time = self.num_images == 0
        idx_img = self.num_images if image_index is None else int(image_index)
        self.num_images += 1
        features = features.detach().to("cpu", torch.float32)
        neg_mask = neg_mask.to("cpu")

        # first occurrence of each key within the image
        uniq_first = torch.zeros(R, dtype=torch.bool)
        if R:
            _, inverse = torch.unique(keys, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), R, dtype=torch.int64)
            first.scatter_reduce_(0, inverse, torch.arange(R), reduce="amin")
            uniq_first[first] = True
        full_keys = keys + idx_img * 2**32  # (R,)

        if first_time:
            candidates = neg_mask & uniq_first[:, None]  # (R, K)
            scores = None
        else:
            scores = svm_scores(features, self.W, self.b)  # (R, K)
            candidates = neg_mask & uniq_first[:, None] & (scores > self.hard_thresh)  # (R, K)
        if self.max_hard_per_image > 0 and scores is not None:
            # keep each class's highest-scoring candidates only (bounds the cache when a weak
            # classifier scores most windows at the margin, -1 > hard_thresh)
            masked = scores.masked_fill(~candidates, float("-inf"))  # (R, K)
            k = min(self.max_hard_per_image, R)
            top = torch.topk(masked, k, dim=0).indices  # (k, K)
            capped = torch.zeros_like(candidates)
            capped.scatter_(0, top, True)
            candidates = candidates & capped  # (R, K)

        added = 0
        retrained = 0
        for c in self.active:  # bookkeeping per class (not a hot path)
            cache = self._caches[c]
            sel = torch.nonzero(candidates[:, c]).flatten()  # (n,)
            if sel.numel():
                new_keys = full_keys[sel]
                known = cache.all_keys()
                if known.numel():
                    keep = ~torch.isin(new_keys, known)
                    sel, new_keys = sel[keep], new_keys[keep]
            if sel.numel():
                cache.pending.append(features[sel].clone())  # (n, F)
                cache.pending_keys.append(new_keys)
                cache.num_added += int(sel.numel())
                added += int(sel.numel())
            if (first_time or cache.num_added > self.retrain_every) and cache.num_neg() > 0:
                retrained += int(self._retrain(c))
        log.debug("hard negatives: image %d added %d, retrained %d classes", idx_img, added, retrained)
        return {"added": added, "retrained": retrained}

    def finish(self) -> tuple[Tensor, Tensor]:
        """Retrain every class with negatives or positives added since its last training.

        Returns:
            (W, b): W (Tensor[F, K] float32), b (Tensor[K] float32). A class that never had both
            positives and negatives keeps W = 0 and gets b = -1000 (it never fires), with a warning.
        """
        for c in self.active:
            cache = self._caches[c]
            if cache.num_added > 0 or cache.dirty or not cache.trained:
                self._retrain(c)
            if not cache.trained:
                log.warning("svm %s: no classifier (%d positives, %d negatives); it will never fire",
                            self.class_names[c], self.num_positives(c), cache.num_neg())
                self.W[:, c] = 0.0
                self.b[c] = -1000.0
        return self.W.clone(), self.b.clone()

    def history(self, cls: int) -> list[dict[str, float]]:
        """Objective terms and cache sizes after each retrain of ``cls`` (for logs and plots)."""
        return list(self._caches[cls].history)

    # ------------------------------------------------------------------------------------------
    def _retrain(self, c: int) -> bool:
        cache = self._caches[c]
        cache.flush()
        name = self.class_names[c]
        if not cache.pos or cache.neg.shape[0] == 0:
            if not cache.pos:
                log.debug("svm %s: no positives yet, not trained", name)
            return False
        pos = torch.cat(cache.pos, dim=0)  # (P, F)
        cache.pos = [pos]
        t0 = time.perf_counter()
        w, b = train_linear_svm(pos, cache.neg, C=self.C, pos_weight=self.pos_weight, bias=self.bias,
                                tol=self.tol, max_iter=self.max_iter, name=name)
        self.W[:, c] = w
        self.b[c] = b
        obj = svm_objective(w, b, pos, cache.neg, self.C, self.pos_weight, self.bias)
        z_neg = cache.neg @ w + b  # (Q,)
        easy = z_neg < self.evict_thresh
        capped = 0  # negatives the count cap drops beyond the spec's eviction by score
        if self.max_cache and int((~easy).sum()) > self.max_cache:  # keep the hardest max_cache
            capped = int((~easy).sum()) - self.max_cache
            order = torch.argsort(z_neg.masked_fill(easy, float("-inf")), descending=True, stable=True)
            easy = torch.ones_like(easy)
            easy[order[: self.max_cache]] = False
            log.warning("svm %s (image %d): %d cached negatives scoring above %.2f exceed svm.max_cache %d; "
                        "the %d lowest-scoring of them are dropped (the spec evicts by score only)",
                        name, self.num_images, self.max_cache + capped, self.evict_thresh, self.max_cache, capped)
        n_before = cache.neg.shape[0]
        cache.neg = cache.neg[~easy].contiguous()  # (Q', F)
        cache.neg_keys = cache.neg_keys[~easy]  # (Q',)
        cache.num_added = 0
        cache.dirty = False
        cache.trained = True
        rec = {**obj, "num_pos": float(pos.shape[0]), "num_neg": float(n_before),
               "evicted": float(int(easy.sum())), "capped": float(capped), "image": float(self.num_images), "seconds": time.perf_counter() - t0}
        cache.history.append(rec)
        log.info("svm %s (image %d): %d pos, %d neg -> objective %.4f (pos %.4f, neg %.4f, reg %.4f), "
                 "evicted %d easy, %.2fs", name, self.num_images, pos.shape[0], n_before, obj["total"],
                 obj["pos_loss"], obj["neg_loss"], obj["reg"], int(easy.sum()), rec["seconds"])
        return True


class LinearSVMs(nn.Module):
    """The K per-class SVMs of a detector, applied to unscaled fc7 features.

    ``scores = (feats * feature_scale) @ weight + bias``, computed as one ``addmm`` with the scale
    as its alpha (no scaled copy of the features).

    Args:
        weight (Tensor[F, K]), bias (Tensor[K]): the classifiers (buffers: saved in the state_dict).
        feature_scale: the spec §7 fc7 scale the SVMs were trained with.
    """

    def __init__(self, weight: Tensor, bias: Tensor, feature_scale: float) -> None:
        super().__init__()
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise ValueError(f"LinearSVMs: weight [F, K] and bias [K] expected, got {tuple(weight.shape)} and "
                             f"{tuple(bias.shape)}")
        if not (math.isfinite(feature_scale) and feature_scale > 0):
            raise ValueError(f"LinearSVMs: feature_scale must be a positive number, got {feature_scale!r}")
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.feature_scale = float(feature_scale)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, feats: Tensor) -> Tensor:
        """feats (Tensor[R, F]) unscaled fc7 -> Tensor[R, K] margins."""
        return torch.addmm(self.bias, feats, self.weight, alpha=self.feature_scale)  # (R, K)

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[0]}, classes={self.num_classes}, feature_scale={self.feature_scale:.6g}"


@torch.inference_mode()
def train_svms(
    head: nn.Module,
    items: Sequence["TrainItem"],
    load_pyramid: Callable[["TrainItem"], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    feature_scale: float,
    params: SVMConfig,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """Per-class linear SVMs on scaled fc7 features with one pass of hard-negative mining (spec §7).

    Positives: every ground-truth box of the class (difficult included). Negatives: windows with
    IoU < ``params.neg_iou`` to every GT box of that class, deduplicated by (scale, conv5 window);
    the windows are the image's GT boxes and proposals (spec §7: other classes' GT boxes qualify),
    or the proposals only with ``params.gt_negatives`` false. Uses ``C``, ``pos_weight``, ``bias``,
    ``tol``, ``hard_thresh``, ``evict_thresh``, ``retrain_every`` and ``max_hard_per_image`` of
    ``params``.

    Two passes over the images, as the original code mines from the conv5 cache: the first keeps
    only the ground truth's features (the positives), the second computes each image's features
    again and mines them, so memory holds one image's features and the miner's bounded caches,
    whatever the number of images. With several processes (``detector.distributed``) the first
    pass is split by image and its positives gathered in image order; the second is split by
    class (each class is its own liblinear problem, mined over every image in order), and the
    classes' weights are gathered: the result equals the one-process result.

    Args:
        head: the fine-tuned FCHead (its deterministic fc7, :meth:`FCHead.features`).
        items: training items (no flips, spec §7).
    Returns:
        (W Tensor[F, K], b Tensor[K], stats dict).
    """
    head = head.to(device).eval()

    def features(item: "TrainItem", pyr: Conv5Pyramid, boxes: Tensor) -> Tensor:
        """Scaled fc7 of ``boxes`` (Tensor[N, 4]) -> Tensor[N, F]."""
        f = head.features(pool_regions(pyr, boxes, levels, proj).to(device)).cpu() * feature_scale  # (N, F)
        if not bool(torch.isfinite(f).all()):
            raise RuntimeError(f"SVM features of image '{item.record.image_id}' are not finite: the trunk or "
                               f"head weights, or that image's conv5 cache entry, hold NaN/inf")
        return f

    def negatives(item: "TrainItem") -> tuple[Tensor, Tensor]:
        """(scaled fc7 of the deduplicated proposals Tensor[R, F], negative mask Tensor[R, K] bool)."""
        pyr = load_pyramid(item)
        props = candidates(item) if params.gt_negatives else item.proposals  # (R, 4)
        keep = distinct_windows(pyr, props, proj)[0]  # spec §7: one sample per (scale, conv5 window)
        props = props[keep]
        iou = pairwise_iou(props, item.gt_boxes)  # (R, G)
        neg = torch.ones((props.shape[0], num_classes), dtype=torch.bool)
        for c in range(num_classes):
            m = item.gt_labels == c
            if m.any():
                neg[:, c] = iou[:, m].max(dim=1).values < params.neg_iou
        return features(item, pyr, props), neg

    # pass 1: the positives (every GT box), each rank its images, gathered in image order
    mine_pos = {}
    for i in tqdm(distributed.shard(range(len(items))), desc="SVM positives", disable=not progress, unit="img"):
        item = items[i]
        mine_pos[i] = features(item, load_pyramid(item), item.gt_boxes)  # (G, F)
    for part in distributed.all_gather(mine_pos):
        mine_pos.update(part)
    feats_pos: list[list[Tensor]] = [[] for _ in range(num_classes)]
    for i, item in enumerate(items):
        for k in range(item.gt_boxes.shape[0]):
            feats_pos[int(item.gt_labels[k])].append(mine_pos[i][k:k + 1])
    del mine_pos

    # pass 2: hard-negative mining over every image, each rank its classes
    classes = distributed.shard(range(num_classes))
    miner = HardNegativeMiner(num_classes, int(head.out_dim), C=params.C, pos_weight=params.pos_weight,
                              bias=params.bias, hard_thresh=params.hard_thresh, evict_thresh=params.evict_thresh,
                              retrain_every=params.retrain_every, class_names=class_names,
                              max_hard_per_image=params.max_hard_per_image, active=classes, tol=params.tol,
                              max_cache=params.max_cache)
    for c in classes:
        if feats_pos[c]:
            miner.add_positives(c, torch.cat(feats_pos[c]))
    for i, item in enumerate(tqdm(items, desc="hard-negative mining", disable=not progress, unit="img")):
        f, neg = negatives(item)
        miner.process_image(f.half().float(), neg, image_index=i)  # negatives kept as float16 values
    W, b = miner.finish()
    for part_classes, part_W, part_b in distributed.all_gather((classes, W, b)):
        W[:, part_classes], b[part_classes] = part_W[:, part_classes], part_b[part_classes]
    return W, b, {"num_pos": [sum(x.shape[0] for x in fp) for fp in feats_pos]}
