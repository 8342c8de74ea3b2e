"""Fully connected head on SPP-pooled window features: fc6 -> fc7 (-> (K+1)-way cls_score).

Shape shorthand:
    R: windows (proposals) in a batch      D = C*B: pooled SPP width (12800 for ZF-5, levels 6,3,2,1)
    F: fc6 / fc7 width (4096)              K: foreground classes (background is index K)
    r: rank of a truncated-SVD factorisation

Spec §1 (network), §6 (fine-tuning), §7 (SVM features):
    fc6 = ReLU(W6 x + b6), fc7 = ReLU(W7 fc6 + b7), each followed by dropout 0.5 *during
    fine-tuning only*. The SVMs read the deterministic fc7 (:meth:`FCHead.features`), never a
    dropped-out one. Fine-tuning adds a (K+1)-way ``cls_score`` (20 classes + background on VOC).

Init (spec §1): every weight N(0, 0.01^2); fc6/fc7 biases 1 (the Caffe ZF prototxt). The bias 1
keeps most ReLUs of a randomly initialised head alive, which is what the original recipe relies on;
it is also harmless for the CPU configs here, whose head is normally loaded from the pretrained SPP
classifier anyway (``init_bias`` makes it adjustable). ``cls_score`` starts with N(0, 0.01^2)
weights and bias 0: the spec's fc8 bias 1 is a constant shift that a softmax ignores.

Inference: fc6 and fc7 are one ``torch.addmm`` each over all R windows (no loop over windows).
:meth:`FCHead.compress_svd` replaces fc6/fc7 by truncated-SVD factor pairs (Fast R-CNN §3.1):
W [out, in] ~= U_r (S_r V_r^T), i.e. a Linear(in, r, no bias) followed by Linear(r, out) carrying the
original bias; cost r*(in+out) instead of in*out multiply-adds per window.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FCHead", "LowRankLinear", "svd_factorize"]

log = logging.getLogger(__name__)


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-r factorisation of a Linear layer (truncated SVD).

    Args:
        in_features: input width.
        out_features: output width.
        rank: inner width r.
    Attributes:
        down (nn.Linear): ``in -> r``, no bias (weight ``S_r V_r^T``, shape [r, in]).
        up (nn.Linear): ``r -> out`` with the original bias (weight ``U_r``, shape [out, r]).
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """x (Tensor[R, in]) -> Tensor[R, out]: one mm and one addmm."""
        if not isinstance(self.down, nn.Linear):  # int8 factors (detector.fc_precision)
            return self.up(self.down(x))  # (R, out)
        h = torch.mm(x, self.down.weight.t())  # (R, r)
        return torch.addmm(self.up.bias, h, self.up.weight.t())  # (R, out)

    def effective_weight(self) -> Tensor:
        """The dense weight ``up.weight @ down.weight`` (Tensor[out, in]) this layer applies."""
        return self.up.weight @ self.down.weight  # (out, in)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@torch.no_grad()
def svd_factorize(linear: nn.Linear, rank: int, exact: bool | None = None, niter: int = 2,
                  seed: int = 0) -> LowRankLinear:
    """Truncated-SVD factorisation of ``linear``.

    Exact (``torch.linalg.svd`` in float64): by Eckart-Young the factorised weight is the best rank-r
    approximation; its spectral error is the (r+1)-th singular value and its Frobenius error
    ``sqrt(sum_{i>r} s_i^2)``. Randomized (range finder with ``niter`` power iterations, Halko et al. 2011,
    ``q = r + 16`` columns, seeded): near-optimal in a fraction of the time; an exact
    SVD of the 4096 x 12800 fc6 takes minutes on 2 CPU cores. Either way ``down.weight`` is the
    projection ``U_r^T W``, so the result is the orthogonal projection of W onto the found subspace.

    Args:
        linear: a Linear layer with weight [out, in] and a bias.
        rank: 1 <= rank <= min(out, in).
        exact: True = full SVD; False = randomized; None = exact when min(out, in) <= 2048 or
            ``rank`` > half of it.
        niter: power iterations of the randomized method.
        seed: seed of the randomized method's test matrix (the global RNG is left untouched).
    Returns:
        LowRankLinear with ``down.weight = diag(S_r) V_r^T`` [r, in] and ``up.weight = U_r`` [out, r].
    """
    out_f, in_f = linear.weight.shape
    m = min(out_f, in_f)
    if not 1 <= rank <= m:
        raise ValueError(f"svd rank must be in [1, {m}] for a {out_f}x{in_f} layer, got {rank}")
    if exact is None:
        exact = m <= 2048 or 2 * rank > m
    devices = [linear.weight.device] if linear.weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leaves the caller's RNG streams untouched
        torch.manual_seed(seed)
        if exact:
            w = linear.weight.detach().to(torch.float64)
            u = torch.linalg.svd(w, full_matrices=False)[0][:, :rank]  # (out, r)
        else:
            w = linear.weight.detach().to(torch.float32)
            u = _randomized_left_vectors(w, rank, oversample=16, niter=niter)  # (out, r)
        layer = LowRankLinear(in_f, out_f, rank).to(device=linear.weight.device, dtype=linear.weight.dtype)
    layer.down.weight.copy_(u.T @ w)  # (r, in) = S_r V_r^T
    layer.up.weight.copy_(u)  # (out, r)
    if linear.bias is not None:
        layer.up.bias.copy_(linear.bias)
    else:
        layer.up.bias.zero_()
    return layer


def _randomized_left_vectors(w: Tensor, rank: int, oversample: int, niter: int) -> Tensor:
    """Top-``rank`` left singular vectors of w [out, in] by a randomized range finder with power
    iterations (Halko, Martinsson, Tropp 2011, Alg. 4.4); the small final problem is the eigh of
    B B^T with B = Q^T w [q, in]. Uses the global RNG (seeded by the caller)."""
    out_f, in_f = w.shape
    q = min(rank + oversample, out_f, in_f)
    omega = torch.randn(in_f, q, dtype=w.dtype, device=w.device)
    basis = torch.linalg.qr(w @ omega)[0]  # (out, q)
    for _ in range(niter):
        z = torch.linalg.qr(w.T @ basis)[0]  # (in, q)
        basis = torch.linalg.qr(w @ z)[0]  # (out, q)
    b = basis.T @ w  # (q, in)
    evals, evecs = torch.linalg.eigh((b @ b.T).double())  # ascending
    top = evecs[:, torch.argsort(evals, descending=True)[:rank]].to(w.dtype)  # (q, r)
    return basis @ top  # (out, r)


def _apply_linear(layer: nn.Module, x: Tensor) -> Tensor:
    if isinstance(layer, nn.Linear):
        return torch.addmm(layer.bias, x, layer.weight.t())  # (R, out)
    return layer(x)


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout (-> cls_score) on pooled window features.

    Args:
        in_dim: D, the SPP output width (``SpatialPyramidPool.out_dim``).
        fc_dim: F, width of fc6 and fc7 (4096 in the paper).
        num_classes: K; when given, a (K+1)-way ``cls_score`` layer (background = index K) is added
            for fine-tuning. None = feature head only.
        dropout: dropout probability after fc6 and fc7, active in ``train()`` mode in :meth:`forward`
            only.
        init_std: std of the Gaussian weight init (spec §1: 0.01).
        init_bias: fc6/fc7 bias init (spec §1: 1).
    Attributes:
        out_dim (int): F, the width of :meth:`features`.
    """

    def __init__(
        self,
        in_dim: int,
        fc_dim: int,
        num_classes: int | None = None,
        *,
        dropout: float,
        init_std: float = 0.01,
        init_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if in_dim <= 0 or fc_dim <= 0:
            raise ValueError(f"in_dim and fc_dim must be positive, got in_dim={in_dim}, fc_dim={fc_dim}")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.fc_dim = fc_dim
        self.num_classes = num_classes
        self.dropout = dropout
        self.fc6: nn.Module = nn.Linear(in_dim, fc_dim)
        self.fc7: nn.Module = nn.Linear(fc_dim, fc_dim)
        self.cls_score: nn.Linear | None = nn.Linear(fc_dim, num_classes + 1) if num_classes is not None else None
        with torch.no_grad():
            for layer in (self.fc6, self.fc7):
                layer.weight.normal_(0.0, init_std)
                layer.bias.fill_(init_bias)
            if self.cls_score is not None:
                self.cls_score.weight.normal_(0.0, init_std)
                self.cls_score.bias.zero_()

    @property
    def out_dim(self) -> int:
        """F: width of the fc7 features."""
        return self.fc_dim

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"FCHead expects pooled features of shape [R, {self.in_dim}], got {tuple(x.shape)}")

    def _dropout(self, h: Tensor, rows: Tensor | None, total: int | None) -> Tensor:
        if not self.training or self.dropout == 0.0 or rows is None:
            return F.dropout(h, self.dropout, self.training)
        # the whole batch's mask drawn as F.dropout draws it on the CPU (empty_like(input).bernoulli_
        # (1 - p), divided by 1 - p), then this process's rows of it
        noise = torch.empty((int(total), h.shape[1]), dtype=h.dtype, device=h.device).bernoulli_(1.0 - self.dropout)
        noise.div_(1.0 - self.dropout)
        return h * noise[rows.to(h.device)]  # (R, F)

    def features(self, x: Tensor) -> Tensor:
        """Deterministic fc7 = ReLU(W7 ReLU(W6 x + b6) + b7), no dropout in any mode (spec §7).

        Args:
            x (Tensor[R, D]): pooled SPP features (any float dtype; cast to the weights' dtype).
        Returns:
            Tensor[R, F]: fc7 activations. Differentiable; wrap in ``torch.inference_mode()`` at test
            time.
        """
        self._check(x)
        x = x.to(self._weight_dtype())
        h = F.relu(_apply_linear(self.fc6, x), inplace=True)  # (R, F)
        return F.relu(_apply_linear(self.fc7, h), inplace=True)  # (R, F)

    def forward(self, x: Tensor, dropout_rows: Tensor | None = None, dropout_total: int | None = None) -> Tensor:
        """Training path with dropout (active in ``train()`` mode).

        Args:
            x (Tensor[R, D]): pooled SPP features.
            dropout_rows (Tensor[R] int64, optional), dropout_total: in a data-parallel step, where
                this process's R windows sit in the whole batch of ``dropout_total`` windows. Each
                dropout mask is then drawn for the whole batch, as one process draws it, and this
                process keeps its rows, so the processes' steps together are the one-process step
                (every process must draw from the same generator state). None: a mask for x alone.
        Returns:
            Tensor[R, K+1]: ``cls_score`` logits when ``num_classes`` was given (background = K);
            otherwise Tensor[R, F], fc7 after dropout.
        """
        self._check(x)
        x = x.to(self._weight_dtype())
        h = F.relu(_apply_linear(self.fc6, x), inplace=True)  # (R, F)
        h = self._dropout(h, dropout_rows, dropout_total)
        h = F.relu(_apply_linear(self.fc7, h), inplace=True)  # (R, F)
        h = self._dropout(h, dropout_rows, dropout_total)
        if self.cls_score is None:
            return h
        return torch.addmm(self.cls_score.bias, h, self.cls_score.weight.t())  # (R, K+1)

    def _weight_dtype(self) -> torch.dtype:
        """fc6's weight dtype: the input is cast to it (float32 for int8 layers, which quantise it)."""
        w = next(self.fc6.parameters(), None)
        return torch.float32 if w is None else w.dtype

    @torch.no_grad()
    def compress_svd(self, rank: int, fc7_rank: int | None = None, exact: bool | None = None) -> "FCHead":
        """A copy of this head with fc6 and fc7 replaced by truncated-SVD factor pairs.

        A layer whose factorisation would not save work (``rank * (in + out) >= in * out``) is kept
        dense, with a log line. ``cls_score`` is copied unchanged. The new head is in ``eval()``
        mode; this head is not modified.

        Args:
            rank: r for fc6 (and for fc7 when ``fc7_rank`` is None); clipped to min(out, in).
            fc7_rank: separate rank for fc7.
            exact: see :func:`svd_factorize` (None = exact for small layers, randomized for fc6/fc7
                of the paper's size).
        Returns:
            FCHead whose ``fc6``/``fc7`` are :class:`LowRankLinear` (or the original Linear).
        """
        if rank <= 0 or (fc7_rank is not None and fc7_rank <= 0):
            raise ValueError(f"svd ranks must be positive, got rank={rank}, fc7_rank={fc7_rank}")
        new = copy.deepcopy(self)
        for name, r in (("fc6", rank), ("fc7", fc7_rank if fc7_rank is not None else rank)):
            layer = getattr(self, name)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"{name} is already compressed ({layer})")
            out_f, in_f = layer.weight.shape
            r = min(r, out_f, in_f)
            if r * (in_f + out_f) >= in_f * out_f:
                log.info("svd: %s %dx%d kept dense (rank %d would not save work)", name, out_f, in_f, r)
                continue
            setattr(new, name, svd_factorize(layer, r, exact=exact))
            log.info("svd: %s %dx%d -> rank %d (%.1fx fewer multiply-adds)", name, out_f, in_f, r,
                     in_f * out_f / (r * (in_f + out_f)))
        return new.eval()
