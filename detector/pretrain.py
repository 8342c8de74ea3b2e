"""Training and evaluation loops of the crop classifier (:class:`detector.classifier.SPPClassifier`).

Shape shorthand (one alphabet for the whole project):
    N: crops in a batch      S: stored crop side (224)      K: foreground classes (background = K)

Training sizes per mode (paper §3.2 "multi-size training"; Table 2 rows):

============  =================================================================================
``single``    every batch at ``max(sizes)`` (224)
``multi``     epoch e at ``sizes[e % len(sizes)]``: 180, 224, 180, ... (the paper switches networks
              after each full epoch, keeping all weights)
``random``    each batch at a size drawn uniformly from the integers ``[min(sizes), max(sizes)]``
``nospp``     every batch at ``max(sizes)``, fixed pool5 grid head (no SPP)
============  =================================================================================

Crops are stored at S = 224 and resized per batch (bilinear with antialiasing) to smaller sizes.

Schedule: SGD with momentum, a linear warm-up over the first ``warmup_iters`` iterations, then a
cosine decay to 0 at the last iteration (per iteration, so it resumes exactly per epoch). Weight decay
applies to weights only, not biases. Randomness: epoch ``e`` draws its order, flips and random sizes
from ``torch.Generator().manual_seed(seed * 1000 + e)`` and re-seeds torch's global generator (dropout)
the same way, so a run resumed after epoch ``e`` continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from detector import distributed
from detector.boxes import hflip_boxes
from detector.classifier import SPPClassifier
from detector.data.crops import CropSet

__all__ = [
    "MODES",
    "batch_size_schedule",
    "preprocess_crops",
    "train_classifier",
    "evaluate_warped",
    "evaluate_native",
    "lr_at",
]

log = logging.getLogger(__name__)

MODES = ("single", "multi", "random", "nospp")


def batch_size_schedule(mode: str, sizes: Sequence[int], epoch: int, generator: torch.Generator) -> int:
    """Input side of the next batch in ``epoch`` for a training ``mode`` (see the module table)."""
    if mode not in MODES:
        raise ValueError(f"unknown pre-training mode {mode!r}; expected one of {', '.join(MODES)}")
    sizes = tuple(int(s) for s in sizes)
    if not sizes:
        raise ValueError("sizes must name at least one input size")
    if mode in ("single", "nospp"):
        return max(sizes)
    if mode == "multi":
        return sizes[epoch % len(sizes)]
    return int(torch.randint(min(sizes), max(sizes) + 1, (1,), generator=generator))


def preprocess_crops(crops: Tensor | Sequence[np.ndarray], input_format: str) -> Tensor:
    """uint8 RGB crops -> the backbone's input (``detector.pyramid.preprocess`` per crop).

    Args:
        crops (Tensor[N, S, S, 3] uint8 or a list of equal-size [h, w, 3] uint8 arrays).
        input_format: the backbone's ``input_format``.
    Returns:
        Tensor[N, 3, h, w] float32.
    """
    from detector.pyramid import preprocess

    arrays = crops.numpy() if isinstance(crops, Tensor) else crops
    return torch.stack([preprocess(np.ascontiguousarray(a), input_format) for a in arrays])  # (N, 3, h, w)


def lr_at(it: int, total: int, base_lr: float, warmup_iters: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_iters``, then cosine to 0 at ``total``."""
    if warmup_iters > 0 and it < warmup_iters:
        return base_lr * (it + 1) / warmup_iters
    span = max(1, total - warmup_iters)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, (it - warmup_iters) / span)))


def _param_groups(model: nn.Module, weight_decay: float, input_std: float) -> list[dict]:
    first = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and p is not first:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if first is not None and first.requires_grad:
        groups.append({"params": [first], "weight_decay": weight_decay, "lr_mult": 1.0 / input_std ** 2})
    return groups


def train_classifier(
    model: SPPClassifier,
    train: CropSet,
    *,
    mode: str,
    sizes: Sequence[int],
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    hflip: bool = False,
    warmup_iters: int = 0,
    clip_grad: float = 0.0,
    input_std: float = 1.0,
    optimizer: str = "sgd",
    device: str | torch.device = "cpu",
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` on ``train`` crops (cross-entropy over K + 1 classes).

    Args:
        model: the classifier (trained in place).
        train: training crops (stored at S; ``max(sizes)`` must not exceed S).
        mode: "single", "multi", "random" or "nospp" (module table).
        sizes: training sizes (paper: 180, 224).
        epochs, batch_size, lr, momentum, weight_decay: SGD settings.
        seed: see the module docstring.
        hflip: mirror a random half of every batch (off for data whose mirror image is another
            class, e.g. digits).
        warmup_iters: iterations of linear warm-up.
        clip_grad: clip the global gradient L2 norm to this before each step (0 = off).
        input_std: pixel std of the preprocessed input (~60 for ZF-5's 0..255 minus 128). The first
            conv's weights learn at ``lr / input_std**2``: exactly SGD on standardised inputs with the
            weights rescaled to match, so conv1's relative updates are not ``input_std**2`` times
            larger than every other layer's (which made from-scratch training diverge).
        optimizer: "sgd" (momentum SGD, as the paper) or "adamw" (AdamW: conv1 steps at
            ``lr / input_std``; learns from scratch in far fewer steps, which is what a CPU budget
            allows).
        device: where to train.
        resume: a state from ``on_epoch_end`` (``epoch``, ``model``, ``optimizer``, ``history``);
            training continues after that epoch.
        on_epoch_end: called after every epoch with that state (for atomic resume files), on rank 0
            only in a distributed job.
        progress: tqdm bar per epoch.
    With several processes (``detector.distributed``) the model is wrapped in
    ``DistributedDataParallel``: every rank draws the same global batch of ``batch_size x world``
    crops (the draws are functions of the epoch) and trains on its contiguous share, the gradients
    are averaged into the global batch's; ``batch_size`` is per process (scale ``lr`` with the
    global batch if you change the number of processes).

    Returns:
        History: one dict per epoch with ``epoch``, ``loss``, ``error`` (training top-1), ``size``
        (the size or "random"), ``lr``, ``seconds``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pre-training mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "nospp" and model.spp:
        raise ValueError("mode 'nospp' needs a classifier built with spp=False")
    if mode != "nospp" and not model.spp:
        raise ValueError(f"mode {mode!r} needs an SPP classifier (spp=True)")
    if max(sizes) > train.size:
        raise ValueError(f"training size {max(sizes)} exceeds the stored crop size {train.size}")
    if len(train) == 0:
        raise ValueError("no training crops")
    device = torch.device(device)
    model.to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(_param_groups(model, weight_decay, input_std), lr=lr, momentum=momentum)
    elif optimizer == "adamw":
        # Adam's steps are ~lr in size whatever the gradient scale, so conv1 (whose weights are
        # input_std times smaller for the 0..255 input) steps at lr / input_std.
        opt = torch.optim.AdamW(_param_groups(model, weight_decay, math.sqrt(input_std)), lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adamw'")
    info = distributed.current()
    net = DistributedDataParallel(model) if info.active else model  # gradients averaged over the ranks
    M = len(train)
    global_batch = batch_size * info.world  # every rank takes its batch_size of each global batch
    per_epoch = math.ceil(M / global_batch)
    total = per_epoch * epochs
    history: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        history = list(resume["history"])
        start = int(resume["epoch"]) + 1
        log.info("resuming classifier training after epoch %d of %d", start, epochs)
    fmt = model.input_format
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed) * 1000 + epoch)
        torch.manual_seed(int(seed) * 1000 + epoch)  # dropout: one stream, each rank keeps its rows of the batch's masks
        model.train()
        perm = torch.randperm(M, generator=g)
        if hasattr(train.images, "set_epoch"):  # crops drawn per epoch (ImageNet-layout training)
            train.images.set_epoch(epoch)
        loss_sum, wrong, seen = 0.0, 0, 0
        bar = range(per_epoch)
        if progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"{mode} epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
        for b in bar:
            it = epoch * per_epoch + b
            cur_lr = lr_at(it, total, lr, warmup_iters)
            for grp in opt.param_groups:
                grp["lr"] = cur_lr * grp.get("lr_mult", 1.0)
            idx = perm[b * global_batch:(b + 1) * global_batch]  # the global batch: same draws on every rank
            size = batch_size_schedule(mode, sizes, epoch, g)
            flip = torch.rand(idx.shape[0], generator=g) < 0.5 if hflip else None
            n_global = idx.shape[0]
            rows = None
            if info.active:  # this rank's contiguous share of the global batch
                lo, hi = n_global * info.rank // info.world, n_global * (info.rank + 1) // info.world
                idx, flip = idx[lo:hi], None if flip is None else flip[lo:hi]
                rows = torch.arange(lo, hi)
            x = preprocess_crops(train.images[idx], fmt)  # (N, 3, S, S)
            if flip is not None:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # (N, 3, S, S)
            if size != x.shape[-1]:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            win = _batch_windows(model, train, idx, size, flip)  # (N, 4) or None
            y = train.labels[idx].to(device)
            logits = net(x.to(device), win, rows, n_global)  # (N, K+1)
            if info.active:  # DDP averages the ranks' gradients: scale so the average is the global mean's
                loss = F.cross_entropy(logits, y, reduction="sum") * info.world / n_global
            else:
                loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"classifier loss is {loss.item()} at epoch {epoch + 1}, batch {b}; "
                                         f"lower pretrain.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            opt.step()
            n = idx.shape[0]
            loss_sum += float(F.cross_entropy(logits.detach(), y, reduction="sum")) if info.active else \
                float(loss.detach()) * n
            wrong += int((logits.argmax(1) != y).sum())
            seen += n
            if progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{wrong / seen:.3f}", size=size)
        if info.active:  # the epoch's figures over every rank's samples
            loss_sum, wrong, seen = (sum(v) for v in zip(*distributed.all_gather((loss_sum, wrong, seen))))
        rec = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "error": wrong / seen,
            "size": "random" if mode == "random" else batch_size_schedule(mode, sizes, epoch, g),
            "lr": cur_lr,
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        log.info("%s epoch %d/%d: loss %.4f, train top-1 error %.4f, size %s, %.1f s", mode, epoch + 1, epochs,
                 rec["loss"], rec["error"], rec["size"], rec["seconds"])
        if on_epoch_end is not None and info.main:
            on_epoch_end({"epoch": epoch, "model": copy.deepcopy(model.state_dict()),
                          "optimizer": copy.deepcopy(opt.state_dict()), "history": list(history)})
    model.eval()
    return history


def _batch_windows(model: SPPClassifier, crops: CropSet, idx: Tensor, size: int,
                   flip: Tensor | None = None) -> Tensor | None:
    """The crops' object windows for a batch at input side ``size``, mirrored where ``flip``.

    Returns Tensor[N, 4] (xyxy, input pixels), or None when the set has no windows or the model
    is the no-SPP baseline (its fixed grid always pools the whole crop).
    """
    if crops.windows is None or not model.spp:
        return None
    win = crops.windows[idx]  # (N, 4) in S px
    if flip is not None:
        win = torch.where(flip[:, None], hflip_boxes(win, crops.size), win)
    return win * (size / crops.size)


def _errors(pred: Tensor, labels: Tensor, K: int) -> dict[str, float]:
    wrong = pred != labels
    fg = labels < K
    return {
        "error": float(wrong.float().mean()) if labels.numel() else float("nan"),
        "fg_error": float(wrong[fg].float().mean()) if fg.any() else float("nan"),
        "bg_error": float(wrong[~fg].float().mean()) if (~fg).any() else float("nan"),
        "n": int(labels.numel()),
    }


@torch.inference_mode()
def evaluate_warped(model: SPPClassifier, crops: CropSet, size: int = 224, batch_size: int = 64,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 error with every crop warped to ``size`` x ``size``.

    Returns:
        dict ``error`` (all crops), ``fg_error`` (objects), ``bg_error`` (background), ``n``.
    """
    model.eval().to(device)
    preds = []
    for i in range(0, len(crops), batch_size):
        x = preprocess_crops(crops.images[i:i + batch_size], model.input_format)  # (N, 3, S, S)
        win = _batch_windows(model, crops, torch.arange(i, min(i + batch_size, len(crops))), size)
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        preds.append(model(x.to(device), win).argmax(1).cpu())
    return _errors(torch.cat(preds), crops.labels, model.num_classes)


@torch.inference_mode()
def evaluate_native(model: SPPClassifier, crops: CropSet, min_side: int = 48,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 error with every crop at its own size and aspect ratio, one crop per forward pass.

    Only an SPP head can do this (a fixed pool5 grid needs the training size). A crop whose shorter
    side is under ``min_side`` pixels is enlarged (aspect kept, bilinear) to that side first: the
    ZF-5 trunk needs about 35 px for a 1 x 1 conv5 and 48 px gives 2 x 2.

    Returns:
        dict ``error``, ``fg_error``, ``bg_error``, ``n`` and ``upscaled`` (the share of crops enlarged).
    """
    if not model.spp:
        raise ValueError("own-size evaluation needs an SPP head; a fixed pool5 grid only takes the training size")
    if crops.native is None:
        raise ValueError("this CropSet has no own-size crops (build it with heldout=True)")
    model.eval().to(device)
    preds, upscaled = [], 0
    for a in crops.native:
        h, w = a.shape[:2]
        if min(h, w) < min_side:
            f = min_side / min(h, w)
            a = cv2.resize(a, (max(min_side, round(w * f)), max(min_side, round(h * f))),
                           interpolation=cv2.INTER_LINEAR)
            upscaled += 1
        x = preprocess_crops([a], model.input_format)  # (1, 3, h, w)
        preds.append(int(model(x.to(device)).argmax(1)))
    out = _errors(torch.tensor(preds, dtype=torch.long), crops.labels, model.num_classes)
    out["upscaled"] = upscaled / max(1, len(crops.native))
    return out
