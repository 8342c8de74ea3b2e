"""Bounding-box regression: delta encoding and per-class whitened ridge regressors (spec §8).

Shape shorthand:
    R: windows in one image       N: training samples of a class      K: foreground classes
    D: feature width (pooled conv5, C*B = 12800 for ZF-5)              G: ground-truth boxes

Deltas (spec §8, R-CNN): with the project's continuous xyxy boxes the width is ``w = x2 - x1``
(no +1, as the spec's regression step also uses) and the centre ``x1 + 0.5 w``::

    dx = (gx - px) / pw     dy = (gy - py) / ph     dw = log(gw / pw)     dh = log(gh / ph)

Widths and heights are clamped below by ``eps`` (a guard against degenerate boxes; the R-CNN code
adds MATLAB's eps). :func:`decode` is the exact inverse of :func:`encode`; it clamps dw and dh at
``log(1000 / 16)`` by default (detectron2's guard against exp overflow), which the round trip never
reaches for boxes within a factor 62.5 of each other.

Fit, per class (spec §8 / R-CNN ``rcnn_train_bbox_regressor.m``): features X get a constant 1
column; targets Y are centred by their mean mu and whitened with
``T = V diag((d + eps)^-1/2) V^T`` from the eigendecomposition of their (1/N) covariance; ridge
``min ||X beta - (Y - mu) T||^2 + lam ||beta||^2`` with the bias weight penalised too, solved by
Cholesky; prediction ``(X beta) T^-1 + mu``. The features are pooled conv5 scaled by
``20 / mean_norm`` of that layer (the caller scales them; see ``svm.fit_feature_scale``).

At test time :class:`BoxRegressor` packs all K classes, whitening folded in, into one
``[D + 1, 4K]`` matrix, so predicting every class is one ``torch.addmm``; the detector keeps only
that matrix (``SPPDetector.bbox_weight``) and applies it to the kept boxes.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from detector.workspace import scratch


__all__ = [
    "encode",
    "decode",
    "ridge_solve",
    "ridge_solve_normal",
    "whiten_targets",
    "fit_bbox_regressor",
    "predict_one_class",
    "BoxRegressor",
    "refine_boxes",
    "fit_box_regressors",
]

log = logging.getLogger(__name__)

_DEFAULT_MAX_DLOG = math.log(1000.0 / 16.0)


def _width_height_centre(boxes: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    w = (boxes[..., 2] - boxes[..., 0]).clamp(min=eps)
    h = (boxes[..., 3] - boxes[..., 1]).clamp(min=eps)
    return w, h, boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h


def encode(proposals: Tensor, gt: Tensor, eps: float = 1e-6) -> Tensor:
    """Regression targets that move ``proposals`` onto ``gt``.

    Args:
        proposals (Tensor[R, 4]): xyxy, original-image pixels.
        gt (Tensor[R, 4]): xyxy, the matched ground-truth box of each proposal.
        eps: lower bound on widths and heights (pixels).
    Returns:
        Tensor[R, 4]: (dx, dy, dw, dh), same dtype as ``proposals``.
    """
    if proposals.shape != gt.shape or proposals.ndim != 2 or proposals.shape[-1] != 4:
        raise ValueError(f"encode expects proposals and gt of equal shape [R, 4], got "
                         f"{tuple(proposals.shape)} and {tuple(gt.shape)}")
    gt = gt.to(proposals.dtype)
    pw, ph, px, py = _width_height_centre(proposals, eps)
    gw, gh, gx, gy = _width_height_centre(gt, eps)
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)  # (R, 4)


def decode(proposals: Tensor, deltas: Tensor, eps: float = 1e-6,
           max_dlog: Optional[float] = _DEFAULT_MAX_DLOG) -> Tensor:
    """Apply deltas to proposals; the inverse of :func:`encode`.

    Args:
        proposals (Tensor[R, 4]): xyxy.
        deltas (Tensor[R, 4] or Tensor[R, K, 4]): (dx, dy, dw, dh), one set per class when 3-d.
        eps: the same width floor as in :func:`encode`.
        max_dlog: dw and dh are clamped at this value before ``exp`` (None = no clamp).
    Returns:
        Tensor[R, 4] or Tensor[R, K, 4]: xyxy boxes (not clipped), dtype of ``deltas``.
    """
    if proposals.ndim != 2 or proposals.shape[-1] != 4:
        raise ValueError(f"decode expects proposals [R, 4], got {list(proposals.shape)}")
    if deltas.shape[0] != proposals.shape[0] or deltas.shape[-1] != 4 or not (deltas.ndim == 2 or deltas.ndim == 3):
        raise ValueError(f"decode expects deltas [R, 4] or [R, K, 4] with R={proposals.shape[0]}, got "
                         f"{list(deltas.shape)}")
    proposals = proposals.to(deltas.dtype)
    pw, ph, px, py = _width_height_centre(proposals, eps)  # (R,) each
    if deltas.ndim == 3:
        pw, ph, px, py = pw[:, None], ph[:, None], px[:, None], py[:, None]  # (R, 1)
    dx, dy, dw, dh = deltas.unbind(-1)
    if max_dlog is not None:
        dw = dw.clamp(max=max_dlog)
        dh = dh.clamp(max=max_dlog)
    cx = dx * pw + px
    cy = dy * ph + py
    w = torch.exp(dw) * pw
    h = torch.exp(dh) * ph
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (R, [K,] 4)


def ridge_solve(X: Tensor, Y: Tensor, lam: float, form: str = "auto") -> Tensor:
    """``argmin_beta ||X beta - Y||^2 + lam ||beta||^2`` by Cholesky, in float64.

    The primal form factors the (M x M) matrix ``X^T X + lam I``; the dual (kernel) form factors
    the (N x N) matrix ``X X^T + lam I`` and returns ``X^T alpha``; both give the same beta.

    Args:
        X (Tensor[N, M]): design matrix (bias column included by the caller).
        Y (Tensor[N, T]): targets.
        lam: ridge penalty (> 0).
        form: "primal", "dual" or "auto" (dual when N < M).
    Returns:
        Tensor[M, T] float64.
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"ridge_solve expects X [N, M] and Y [N, T], got {tuple(X.shape)}, {tuple(Y.shape)}")
    if lam <= 0:
        raise ValueError(f"ridge_solve needs lam > 0, got {lam}")
    n, m = X.shape
    if form == "auto":
        form = "dual" if n < m else "primal"
    x = X.detach().cpu().double().numpy()
    y = Y.detach().cpu().double().numpy()
    if form == "primal":
        return ridge_solve_normal(x.T @ x, x.T @ y, lam)  # (M, M), (M, T)
    elif form == "dual":
        k = x @ x.T  # (N, N)
        k[np.diag_indices_from(k)] += lam
        alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(k, overwrite_a=True, check_finite=False),
                                       y, check_finite=False)  # (N, T)
        beta = x.T @ alpha  # (M, T)
    else:
        raise ValueError(f"ridge_solve: form must be 'primal', 'dual' or 'auto', got {form!r}")
    return torch.from_numpy(beta)


def ridge_solve_normal(xtx: np.ndarray, xty: np.ndarray, lam: float) -> Tensor:
    """The primal ridge solution from the normal equations: ``(X^T X + lam I)^-1 X^T Y`` by Cholesky.

    With ``X^T X`` and ``X^T Y`` summed over chunks of rows, a regressor is fitted on any number of
    samples in the memory of one (M x M) matrix.

    Args:
        xtx (ndarray[M, M] float64): ``X^T X`` (overwritten).
        xty (ndarray[M, T] float64): ``X^T Y``.
        lam: ridge penalty (> 0).
    Returns:
        Tensor[M, T] float64.
    """
    if lam <= 0:
        raise ValueError(f"ridge_solve_normal needs lam > 0, got {lam}")
    xtx[np.diag_indices_from(xtx)] += lam
    beta = scipy.linalg.cho_solve(scipy.linalg.cho_factor(xtx, overwrite_a=True, check_finite=False), xty,
                                  check_finite=False)  # (M, T)
    return torch.from_numpy(beta)


def whiten_targets(proposals: Tensor, targets_gt: Tensor, whiten_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The regression targets of one class, centred and whitened (spec §8).

    Args:
        proposals (Tensor[N, 4]), targets_gt (Tensor[N, 4]): xyxy sample windows and their GT boxes.
        whiten_eps: added to the target covariance's eigenvalues.
    Returns:
        (y, mu, T_inv): y (Tensor[N, 4] float64) = ``(encode(p, g) - mu) T``, the mean mu
        (Tensor[4]) and T's inverse (Tensor[4, 4]).
    """
    n = proposals.shape[0]
    y = encode(proposals.double(), targets_gt.double())  # (N, 4)
    mu = y.mean(dim=0)  # (4,)
    yc = y - mu  # (N, 4)
    cov = yc.T @ yc / n  # (4, 4)
    d, v = torch.linalg.eigh(cov)  # (4,), (4, 4)
    d = d.clamp(min=0.0)
    t = v @ torch.diag((d + whiten_eps).rsqrt()) @ v.T  # (4, 4)
    t_inv = v @ torch.diag((d + whiten_eps).sqrt()) @ v.T  # (4, 4)
    return yc @ t, mu, t_inv


def fit_bbox_regressor(
    features: Tensor,
    proposals: Tensor,
    targets_gt: Tensor,
    lam: float,
    whiten_eps: float,
    form: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit one class's whitened ridge regressor (spec §8).

    Args:
        features (Tensor[N, D]): pooled conv5 features of the samples, already scaled by 20/mean_norm.
        proposals (Tensor[N, 4]): xyxy sample windows (IoU > 0.5 with a GT of this class, GT included).
        targets_gt (Tensor[N, 4]): xyxy, the highest-IoU GT box of each sample.
        lam: ridge penalty (4000); the bias weight is penalised too.
        whiten_eps: added to the target covariance's eigenvalues (0.001).
        form: see :func:`ridge_solve` ("auto": the dual form when N < D + 1).
    Returns:
        (beta, mu, T_inv): beta (Tensor[D+1, 4] float64, last row = bias), mu (Tensor[4] float64),
        T_inv (Tensor[4, 4] float64). Predict with :func:`predict_one_class`.
    """
    n = features.shape[0]
    if features.ndim != 2 or proposals.shape != (n, 4) or targets_gt.shape != (n, 4):
        raise ValueError(f"fit_bbox_regressor expects features [N, D], proposals [N, 4], targets_gt [N, 4]; got "
                         f"{tuple(features.shape)}, {tuple(proposals.shape)}, {tuple(targets_gt.shape)}")
    if n == 0:
        raise ValueError("fit_bbox_regressor: no samples")
    yw, mu, t_inv = whiten_targets(proposals, targets_gt, whiten_eps)  # (N, 4)
    x = torch.cat([features.double(), features.new_ones(n, 1, dtype=torch.float64)], dim=1)  # (N, D+1)
    beta = ridge_solve(x, yw, lam, form=form)  # (D+1, 4)
    return beta, mu, t_inv


def predict_one_class(features: Tensor, beta: Tensor, mu: Tensor, T_inv: Tensor) -> Tensor:
    """Reference (unpacked) prediction of one class: ``((X beta[:-1] + beta[-1]) T_inv) + mu``.

    Args:
        features (Tensor[R, D]), beta (Tensor[D+1, 4]), mu (Tensor[4]), T_inv (Tensor[4, 4]).
    Returns:
        Tensor[R, 4]: deltas, dtype of ``beta``.
    """
    y = features.to(beta.dtype) @ beta[:-1] + beta[-1]  # (R, 4)
    return y @ T_inv + mu  # (R, 4)


def refine_boxes(weight: Tensor, feature_scale: float, boxes: Tensor, pooled: Tensor, rows: Tensor,
                 labels: Tensor, pooled_rows: Optional[Tensor] = None,
                 gather_buffer: Optional[Tensor] = None) -> Tensor:
    """:meth:`BoxRegressor.refine` as a free function of the packed weights (TorchScript compiles it:
    the exported program of ``detector.export`` calls it).

    Args:
        weight (Tensor[D+1, 4K]): packed regressors, last row = bias; feature_scale: their pool5 scale.
        boxes (Tensor[R, 4]), pooled (Tensor[R, D] or [U, D]), rows (Tensor[N] int64), labels
            (Tensor[N] int64), pooled_rows (Tensor[N] int64 or None): as :meth:`BoxRegressor.refine`.
        gather_buffer (Tensor[>= U * D], optional): 1-D, ``pooled``'s dtype and device: where the
            detections' pooled rows are gathered (a reused buffer instead of a fresh [U, D] matrix).
    Returns:
        Tensor[N, 4]: refined xyxy boxes (not clipped).
    """
    if rows.shape[0] == 0:
        return boxes[rows]
    prow = rows if pooled_rows is None else pooled_rows  # (N,) each detection's row of pooled
    uwin, inv = torch.unique(prow, return_inverse=True)  # (U,), (N,)
    # index_select, not pooled[uwin]: advanced indexing gathers element by element and took 14-76 ms
    # for 1146 x 12800 rows on 2 threads against index_select's 8 ms (BENCHMARKS.md, detect notes)
    n_el = uwin.shape[0] * pooled.shape[1]
    if gather_buffer is not None and gather_buffer.numel() >= n_el:
        feats = torch.index_select(pooled, 0, uwin, out=gather_buffer[:n_el].view(uwin.shape[0], pooled.shape[1]))
    else:
        feats = torch.index_select(pooled, 0, uwin)  # (U, D)
    deltas = torch.addmm(weight[-1], feats, weight[:-1], alpha=feature_scale)  # (U, 4K)
    cols = (labels * 4)[:, None] + torch.arange(4, device=labels.device)  # (N, 4)
    return decode(boxes[rows], deltas[inv].gather(1, cols))  # (N, 4)


class BoxRegressor(nn.Module):
    """All K class regressors packed into one matrix: the deltas of every class are one addmm.

    ``weight[:-1, 4k:4k+4] = beta_k[:-1] T_inv_k`` and ``weight[-1, 4k:4k+4] = beta_k[-1] T_inv_k + mu_k``,
    so ``X @ weight[:-1] + weight[-1]`` (Tensor[R, 4K]) equals each class's :func:`predict_one_class`.

    Args:
        weight (Tensor[D+1, 4K]): packed weights, last row = bias (a buffer: saved in state_dict,
            moved by ``.to()``).
        feature_scale: the spec §8 pool5 scale the regressors were fitted with; :meth:`refine`
            applies it to unscaled pooled features.
    """

    # Largest gather (bytes) that :meth:`refine` keeps in this thread's reused buffer instead of a
    # fresh matrix. A kept buffer saves ~4 ms per image on 1146 x 12800 rows (2.7 against 6.8 ms) but
    # stays allocated between images: uncapped, it raised the peak RSS of a full-width detection
    # (section ``memory``) from 1359 to 1428 MiB, so larger gathers get a fresh matrix.
    GATHER_BUFFER_CAP_BYTES = 32 << 20

    def __init__(self, weight: Tensor, feature_scale: float = 1.0) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[1] % 4 != 0 or weight.shape[0] < 2:
            raise ValueError(f"BoxRegressor weight must be [D+1, 4K], got {tuple(weight.shape)}")
        if not (math.isfinite(feature_scale) and feature_scale > 0):
            raise ValueError(f"BoxRegressor: feature_scale must be a positive number, got {feature_scale!r}")
        self.register_buffer("weight", weight.detach().to(torch.float32).clone())
        self.feature_scale = float(feature_scale)

    def refine(self, boxes: Tensor, pooled: Tensor, rows: Tensor, labels: Tensor,
               pooled_rows: Optional[Tensor] = None) -> Tensor:
        """Regress each detection with its own class's regressor (spec §8: only the kept boxes).

        A window kept for several classes is regressed once for all classes (U x D x 4K
        multiply-adds), then each detection takes its class's 4 deltas: cheaper than gathering an
        [N, 4, D] weight block per detection. The feature scale is the matmul's alpha (no scaled
        [U, D] copy).

        Args:
            boxes (Tensor[R, 4]): xyxy windows of the image.
            pooled (Tensor[R, D] or Tensor[U, D]): their unscaled pooled conv5 features, one row per
                window, or one per distinct pooled window with ``pooled_rows``.
            rows (Tensor[N] int64): window of each detection.
            labels (Tensor[N] int64): class of each detection.
            pooled_rows (Tensor[N] int64, optional): each detection's row of ``pooled`` (default
                ``rows``).
        Returns:
            Tensor[N, 4]: refined xyxy boxes (not clipped).
        """
        buf = None
        n_el = min(rows.shape[0], pooled.shape[0]) * pooled.shape[1]  # at most this many values are gathered
        if (pooled.device.type == "cpu" and n_el * pooled.element_size() <= self.GATHER_BUFFER_CAP_BYTES
                and not (torch.is_grad_enabled() and pooled.requires_grad)):
            buf = scratch("bbox_gather", n_el, pooled.dtype, pooled.device)
        return refine_boxes(self.weight, self.feature_scale, boxes, pooled, rows, labels, pooled_rows, buf)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1] // 4

    @property
    def in_dim(self) -> int:
        """D: expected feature width."""
        return self.weight.shape[0] - 1

    @classmethod
    def from_per_class(cls, params: list[tuple[Tensor, Tensor, Tensor] | None], in_dim: int) -> "BoxRegressor":
        """Pack per-class ``(beta, mu, T_inv)`` from :func:`fit_bbox_regressor`.

        Args:
            params: one entry per class; None = no regressor (zero deltas: the box stays the proposal).
            in_dim: D.
        """
        k = len(params)
        w = torch.zeros(in_dim + 1, 4 * k, dtype=torch.float64)  # (D+1, 4K)
        for c, p in enumerate(params):
            if p is None:
                continue
            beta, mu, t_inv = (t.double() for t in p)
            if beta.shape != (in_dim + 1, 4):
                raise ValueError(f"class {c}: beta must be [{in_dim + 1}, 4], got {tuple(beta.shape)}")
            w[:, 4 * c:4 * c + 4] = beta @ t_inv
            w[-1, 4 * c:4 * c + 4] += mu
        return cls(w)

    @classmethod
    def identity(cls, num_classes: int, in_dim: int) -> "BoxRegressor":
        """A regressor that predicts zero deltas for every class (boxes unchanged)."""
        return cls(torch.zeros(in_dim + 1, 4 * num_classes))


def fit_box_regressors(
    samples: Sequence[tuple[Tensor, Tensor, Tensor] | None],
    in_dim: int,
    lam: float,
    whiten_eps: float,
    class_names: Sequence[str] | None = None,
) -> BoxRegressor:
    """Fit every class's regressor (:func:`fit_bbox_regressor`) and pack them.

    Args:
        samples: one entry per class: ``(features Tensor[N_c, D], proposals Tensor[N_c, 4],
            targets_gt Tensor[N_c, 4])`` (scaled pooled conv5, xyxy windows, each window's
            highest-IoU GT box), or None for a class without samples (zero deltas: its boxes stay
            the proposals).
        in_dim: D.
        lam, whiten_eps: see :func:`fit_bbox_regressor`.
        class_names: names for the log lines.
    Returns:
        BoxRegressor with weight [D+1, 4K].
    """
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(samples))]
    params: list[tuple[Tensor, Tensor, Tensor] | None] = []
    for c, smp in enumerate(samples):  # training only; prediction is packed
        if smp is None or smp[0].shape[0] == 0:
            log.warning("bbox regression %s: no samples, no regressor (its boxes stay the proposals)", names[c])
            params.append(None)
            continue
        x, p, t = smp
        params.append(fit_bbox_regressor(x.double(), p, t, lam=lam, whiten_eps=whiten_eps))
        log.info("bbox regression %s: fitted on %d samples", names[c], x.shape[0])
    return BoxRegressor.from_per_class(params, in_dim)
