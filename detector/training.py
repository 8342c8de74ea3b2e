"""Training drivers of the SPP-net detector (spec §6–8), with explicit arguments.

Shape shorthand:
    R: proposals in one image   G: ground-truth boxes   S: scales   C: conv5 channels
    B: SPP bins                 D = C*B pooled width    F: fc7 width   K: foreground classes

Stages (each driven by tools/train_detector.py, which owns caching and resume):
    conv5 cache (detector.cache) -> :func:`finetune_head` -> :func:`feature_norm_scales`
    -> :func:`train_svms` -> :func:`train_box_regressors`.

A training item is one image, or its horizontal mirror, with its proposals; the conv5 maps of
both come from the cache through a ``load_pyramid`` callable.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F_
from tqdm import tqdm

from detector.bbox_reg import BoxRegressor, fit_bbox_regressor
from detector.boxes import hflip_boxes, pairwise_iou
from detector.head import FCHead
from detector.projection import project_boxes, select_scales
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from detector.sampling import label_windows
from detector.svm import HardNegativeMiner
from detector.data.voc import ImageRecord

log = logging.getLogger(__name__)

__all__ = [
    "TrainItem",
    "make_items",
    "split_train_val",
    "finetune_head",
    "finetune_head_and_tail",
    "feature_norm_scales",
    "train_svms",
    "train_box_regressors",
]


@dataclass(frozen=True)
class TrainItem:
    """One training image (or its mirror) with ground truth and proposals in its own frame.

    Attributes:
        record: the annotation of the original image.
        flipped: True for the horizontally mirrored copy.
        gt_boxes (Tensor[G, 4]): xyxy in this item's frame.
        gt_labels (Tensor[G] int64), gt_difficult (Tensor[G] bool).
        proposals (Tensor[R, 4]): xyxy in this item's frame.
    """

    record: ImageRecord
    flipped: bool
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_difficult: torch.Tensor
    proposals: torch.Tensor

    @property
    def key(self) -> tuple[str, bool]:
        return (self.record.image_id, self.flipped)


def make_items(records: Sequence[ImageRecord], proposals: dict[str, np.ndarray], flips: bool) -> list[TrainItem]:
    """Training items for ``records`` (and their mirrors when ``flips``).

    Args:
        records: annotated images.
        proposals: image id -> float32 [R, 4] xyxy.
        flips: add the mirrored copy of every image (spec §2, §6).
    """
    items = []
    for rec in records:
        if rec.image_id not in proposals:
            raise KeyError(f"no proposals for image '{rec.image_id}'")
        props = torch.as_tensor(np.asarray(proposals[rec.image_id], dtype=np.float32)).reshape(-1, 4)
        items.append(TrainItem(rec, False, rec.boxes, rec.labels, rec.difficult, props))
        if flips:
            items.append(TrainItem(rec, True, hflip_boxes(rec.boxes, rec.width), rec.labels, rec.difficult,
                                   hflip_boxes(props, rec.width)))
    return items


def split_train_val(records: Sequence[ImageRecord], fraction: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out ``fraction`` of the images (at least one) for model selection, chosen with ``seed``."""
    n = len(records)
    if n < 2 or fraction <= 0:
        return list(records), []
    g = np.random.default_rng(seed)
    n_val = max(1, int(round(fraction * n)))
    val_idx = set(g.permutation(n)[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]


# ------------------------------------------------------------------------------------------------
# fine-tuning (spec §6)


def _candidates(item: TrainItem) -> torch.Tensor:
    """GT boxes first, then proposals: Tensor[G + R, 4]."""
    return torch.cat([item.gt_boxes, item.proposals], dim=0)  # (G+R, 4)


def _item_labels(item: TrainItem, num_classes: int, fg_iou: float, bg_low: float, bg_high: float) -> torch.Tensor:
    labels, _, _ = label_windows(_candidates(item), item.gt_boxes, item.gt_labels, num_classes,
                                 fg_iou=fg_iou, bg_low=bg_low, bg_high=bg_high)
    return labels  # (G+R,) int64: class, K = background, -1 = unused


def _pool_selection(
    items: Sequence[TrainItem],
    selection: list[tuple[int, int]],
    load_pyramid: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    random_scale: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Pool the selected (item, candidate) windows; scales random per window or the spec §5 choice.

    Returns Tensor[M, D] in the order of ``selection``.
    """
    by_item: dict[int, list[int]] = {}
    for pos, (it, _) in enumerate(selection):
        by_item.setdefault(it, []).append(pos)
    out: torch.Tensor | None = None
    for it, positions in by_item.items():
        item = items[it]
        pyr = load_pyramid(item)
        cand = _candidates(item)
        widx = torch.tensor([selection[p][1] for p in positions], dtype=torch.int64)
        boxes = cand[widx]
        scale_index = (torch.randint(len(pyr.fmaps), (len(positions),), generator=generator)
                       if random_scale else None)
        feats = pool_regions(pyr, boxes, levels, proj, scale_index)  # (m, D)
        if out is None:
            out = torch.zeros((len(selection), feats.shape[1]), dtype=torch.float32)
        out[torch.tensor(positions)] = feats.cpu()
    assert out is not None
    return out


def _draw(pool: list[tuple[int, int]], n: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """n entries uniformly without replacement (with replacement only when the pool is smaller)."""
    if not pool:
        return []
    if n <= len(pool):
        idx = torch.randperm(len(pool), generator=generator)[:n]
    else:
        idx = torch.randint(len(pool), (n,), generator=generator)
    return [pool[i] for i in idx.tolist()]


def _chunk_batches(
    item_labels: Sequence[torch.Tensor],
    order: Sequence[int],
    num_classes: int,
    n_batches: int,
    batch_size: int,
    fg_fraction: float,
    generator: torch.Generator,
) -> tuple[list[tuple[int, int]], int, int]:
    """Sample the windows of ``n_batches`` batches from the images in ``order`` (spec §6 sampler).

    Foreground and background windows of all those images are pooled together and drawn
    uniformly without replacement, so every batch mixes many images.

    Returns:
        (selection: foreground (item, candidate) pairs first, then background; n_fg; n_bg).
        When foreground is short, background fills the batches.
    """
    fg_pool, bg_pool = [], []
    for it in order:
        lab = item_labels[it]
        fg_pool += [(it, j) for j in torch.nonzero((lab >= 0) & (lab < num_classes)).flatten().tolist()]
        bg_pool += [(it, j) for j in torch.nonzero(lab == num_classes).flatten().tolist()]
    n_fg_batch = int(round(batch_size * fg_fraction))
    fg_sel = _draw(fg_pool, min(n_fg_batch * n_batches, len(fg_pool)), generator)
    n_bg = batch_size * n_batches - len(fg_sel)
    bg_sel = _draw(bg_pool, n_bg, generator) if bg_pool else _draw(fg_pool, 0, generator)
    return fg_sel + bg_sel, len(fg_sel), len(bg_sel)


def _sgd(modules: Sequence[tuple[torch.nn.Module, float]], lr: float, momentum: float,
         weight_decay: float) -> tuple[torch.optim.SGD, list[float]]:
    """SGD over (module, lr multiplier) pairs: weights at ``lr * mult`` with weight decay, biases at
    twice that without (spec §6). Returns the optimizer and each group's base learning rate."""
    groups, base_lrs = [], []
    for module, mult in modules:
        named = list(module.named_parameters())
        groups += [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": weight_decay},
                   {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
        base_lrs += [lr * mult, 2 * lr * mult]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum), base_lrs


def finetune_head(
    head: FCHead,
    train_items: Sequence[TrainItem],
    val_items: Sequence[TrainItem],
    load_pyramid: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    iters: int,
    lr: float,
    lr_steps: Sequence[int],
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    fg_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_low: float = 0.1,
    bg_high: float = 0.5,
    random_scale: bool = True,
    val_every: int = 2000,
    val_batches: int = 50,
    chunk_iters: int = 100,
    chunk_images: int = 64,
    seed: int = 0,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[FCHead, dict]:
    """Fine-tune fc6, fc7 and a (K+1)-way classifier on SPP features of windows (spec §6).

    Mini-batches of ``batch_size`` windows, ``fg_fraction`` foreground (IoU >= fg_iou),
    the rest background (IoU in [bg_low, bg_high)), drawn from ``chunk_images`` images at a time
    and pooled at a random scale per window (``random_scale``). SGD with momentum, weight decay,
    bias learning rate x2, learning rate x0.1 at each of ``lr_steps``. Every ``val_every``
    iterations the window classification error on fixed batches of ``val_items`` (scale chosen by
    spec §5) is measured and the best head kept (model selection on held-out data, never test).

    Args:
        head: FCHead with ``num_classes`` outputs (K + 1 with background at index K).
        resume_state / save_state: resume dict written by ``save_state`` every ``val_every`` iterations.
    Returns:
        (best head, history dict with iterations, losses and validation errors).
    """
    device = torch.device(device)
    head = head.to(device).train()
    opt, base_lrs = _sgd([(head, 1.0)], lr, momentum, weight_decay)
    labels = [_item_labels(it, num_classes, fg_iou, bg_low, bg_high) for it in train_items]

    # fixed validation batches at the spec §5 scale
    val_feats, val_labels = None, None
    if val_items:
        gv = torch.Generator().manual_seed(seed + 7919)
        vlabels = [_item_labels(it, num_classes, fg_iou, bg_low, bg_high) for it in val_items]
        sel, _, _ = _chunk_batches(vlabels, list(range(len(val_items))), num_classes, val_batches,
                                   batch_size, fg_fraction, gv)
        val_feats = _pool_selection(val_items, sel, load_pyramid, levels, proj, False, gv)
        val_labels = torch.tensor([int(vlabels[i][j]) for i, j in sel], dtype=torch.int64)

    history: dict = {"iter": [], "loss": [], "val_iter": [], "val_error": [], "best_iter": 0, "best_val_error": None}
    start = 0
    best_state = copy.deepcopy(head.state_dict())
    best_err = math.inf
    if resume_state is not None:
        head.load_state_dict(resume_state["head"])
        opt.load_state_dict(resume_state["optimizer"])
        best_state = resume_state["best_head"]
        best_err = resume_state["best_err"]
        history = resume_state["history"]
        start = int(resume_state["iter"])
        log.info("fine-tuning resumes at iteration %d", start)

    def evaluate() -> float:
        if val_feats is None:
            return math.nan
        head.eval()
        with torch.no_grad():
            logits = head(val_feats.to(device))
        head.train()
        return float((logits.argmax(1).cpu() != val_labels).float().mean())

    n_items = len(train_items)
    it = start
    bar = tqdm(total=iters, initial=start, desc="fine-tune fc6/fc7", disable=not progress, unit="it")
    while it < iters:
        chunk = it // chunk_iters
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        perm = torch.randperm(n_items, generator=g).tolist()
        order = perm[: min(chunk_images, n_items)]
        n_batches = min(chunk_iters, iters - chunk * chunk_iters)
        # chunks always start at multiples of chunk_iters, so a resume at `it` replays the same draw
        offset = it - chunk * chunk_iters
        sel, nfg, nbg = _chunk_batches(labels, order, num_classes, chunk_iters, batch_size, fg_fraction, g)
        feats = _pool_selection(train_items, sel, load_pyramid, levels, proj, random_scale, g)
        lab = torch.tensor([int(labels[i][j]) for i, j in sel], dtype=torch.int64)
        # batches: each takes its share of fg and bg, shuffled within the batch
        fg_idx = torch.arange(nfg)[torch.randperm(nfg, generator=g)] if nfg else torch.zeros(0, dtype=torch.int64)
        bg_idx = nfg + torch.randperm(nbg, generator=g) if nbg else torch.zeros(0, dtype=torch.int64)
        for b in range(offset, n_batches):
            # batch b takes the b-th equal share of the chunk's fg and bg draws
            f0, f1 = b * nfg // chunk_iters, (b + 1) * nfg // chunk_iters
            b0, b1 = b * nbg // chunk_iters, (b + 1) * nbg // chunk_iters
            idx = torch.cat([fg_idx[f0:f1], bg_idx[b0:b1]])
            if idx.numel() == 0:
                continue
            factor = 0.1 ** sum(it >= s for s in lr_steps)
            for grp, base in zip(opt.param_groups, base_lrs):
                grp["lr"] = base * factor
            x = feats[idx].to(device)
            y = lab[idx].to(device)
            loss = F_.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            bar.update(1)
            if it % 20 == 0 or it == iters:
                history["iter"].append(it)
                history["loss"].append(float(loss))
                bar.set_postfix(loss=f"{float(loss):.3f}")
            if (val_every and it % val_every == 0) or it == iters:
                err = evaluate()
                history["val_iter"].append(it)
                history["val_error"].append(err)
                if val_feats is None or err < best_err:
                    best_err = err if val_feats is not None else math.nan
                    best_state = copy.deepcopy(head.state_dict())
                    history["best_iter"] = it
                    history["best_val_error"] = None if val_feats is None else err
                log.info("iter %d: loss %.4f, val error %s", it, float(loss),
                         "n/a" if val_feats is None else f"{err:.4f}")
                if save_state is not None and it < iters:
                    save_state({"head": head.state_dict(), "optimizer": opt.state_dict(), "best_head": best_state,
                                "best_err": best_err, "history": history, "iter": it})
            if it >= iters:
                break
    bar.close()
    head.load_state_dict(best_state)
    head.eval()
    return head, history


def finetune_head_and_tail(
    head: FCHead,
    trunk: torch.nn.Module,
    n_tail: int,
    train_items: Sequence[TrainItem],
    val_items: Sequence[TrainItem],
    load_prefix: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    iters: int,
    lr: float,
    lr_steps: Sequence[int],
    tail_lr_mult: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    images_per_batch: int = 2,
    fg_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_low: float = 0.1,
    bg_high: float = 0.5,
    random_scale: bool = True,
    val_every: int = 2000,
    val_batches: int = 50,
    seed: int = 0,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[FCHead, dict]:
    """Fine-tune the trunk's last ``n_tail`` conv units together with fc6, fc7 and the (K+1)-way
    classifier on SPP-pooled windows (a deviation from spec §6, which tunes the fc layers only;
    Fast R-CNN's finding that tuning conv layers on detection windows pays).

    ``load_prefix`` gives an item's cached maps *before* the tail (``trunk.forward_prefix``);
    each iteration runs the tail with gradients on ``images_per_batch`` images and pools
    ``batch_size / images_per_batch`` windows from each (``fg_fraction`` foreground at IoU >=
    ``fg_iou``, the rest background in [bg_low, bg_high); background fills when foreground is
    short), gradients flowing through ``spp_pool`` into the tail. One random scale per image when
    ``random_scale`` (the tail runs on one map instead of all), else the spec §5 choice per window.
    SGD with momentum, weight decay, bias learning rate x2, the tail at ``lr * tail_lr_mult``, x0.1
    at each of ``lr_steps``. Every ``val_every`` iterations the window error on fixed windows of
    ``val_items`` (spec §5 scales, the tuned tail) is measured and the best head and tail are kept.
    The trunk stays in ``eval()`` (BatchNorm statistics frozen); its tail is updated in place.

    Args:
        head: FCHead with K + 1 outputs (background = K).
        trunk: the backbone (``tail_modules``, ``forward_tail``); its tail is trained in place.
        n_tail: number of tail units (1 .. ``trunk.tail_units``).
        resume_state / save_state: resume dict written by ``save_state`` every ``val_every`` iterations.
    Returns:
        (best head, history dict); the trunk holds the best tail.
    """
    device = torch.device(device)
    if not 1 <= n_tail <= trunk.tail_units:
        raise ValueError(f"n_tail must be in 1..{trunk.tail_units}, got {n_tail}")
    if images_per_batch < 1 or batch_size < images_per_batch:
        raise ValueError(f"need 1 <= images_per_batch <= batch_size, got {images_per_batch}, {batch_size}")
    head = head.to(device).train()
    trunk.to(device).eval()
    tail = torch.nn.ModuleList(trunk.tail_modules(n_tail))  # shares the trunk's parameters
    opt, base_lrs = _sgd([(head, 1.0), (tail, float(tail_lr_mult))], lr, momentum, weight_decay)
    labels = [_item_labels(it, num_classes, fg_iou, bg_low, bg_high) for it in train_items]
    usable = [i for i, lab in enumerate(labels) if bool((lab >= 0).any())]
    if not usable:
        raise ValueError("fine-tuning: no training image has a labelled window")

    def tuned(item: TrainItem) -> Conv5Pyramid:
        pre = load_prefix(item)
        with torch.no_grad():
            fmaps = [trunk.forward_tail(f.to(device).float().unsqueeze(0), n_tail)[0] for f in pre.fmaps]
        return Conv5Pyramid(fmaps=fmaps, scaled_sizes=pre.scaled_sizes, image_size=pre.image_size)

    val_sel, val_labels = None, None
    if val_items:
        gv = torch.Generator().manual_seed(seed + 7919)
        vlabels = [_item_labels(it, num_classes, fg_iou, bg_low, bg_high) for it in val_items]
        val_sel, _, _ = _chunk_batches(vlabels, list(range(len(val_items))), num_classes, val_batches,
                                       batch_size, fg_fraction, gv)
        val_labels = torch.tensor([int(vlabels[i][j]) for i, j in val_sel], dtype=torch.int64)

    def evaluate() -> float:
        if val_sel is None:
            return math.nan
        head.eval()
        with torch.no_grad():
            feats = _pool_selection(val_items, val_sel, tuned, levels, proj, False, torch.Generator())
            logits = head(feats.to(device))
        head.train()
        return float((logits.argmax(1).cpu() != val_labels).float().mean())

    history: dict = {"iter": [], "loss": [], "val_iter": [], "val_error": [], "best_iter": 0, "best_val_error": None}
    start, best_err = 0, math.inf
    best_state = (copy.deepcopy(head.state_dict()), copy.deepcopy(tail.state_dict()))
    if resume_state is not None:
        head.load_state_dict(resume_state["head"])
        tail.load_state_dict(resume_state["tail"])
        opt.load_state_dict(resume_state["optimizer"])
        best_state, best_err = (resume_state["best_head"], resume_state["best_tail"]), resume_state["best_err"]
        history, start = resume_state["history"], int(resume_state["iter"])
        log.info("fine-tuning resumes at iteration %d", start)

    per_image = batch_size // images_per_batch
    n_fg = int(round(per_image * fg_fraction))
    bar = tqdm(total=iters, initial=start, desc=f"fine-tune conv tail ({n_tail}) + fc", disable=not progress,
               unit="it")
    for it in range(start, iters):
        g = torch.Generator().manual_seed(seed * 1_000_003 + it)  # per iteration: a resume replays the draw
        factor = 0.1 ** sum(it >= s for s in lr_steps)
        for grp, base in zip(opt.param_groups, base_lrs):
            grp["lr"] = base * factor
        feats, ys = [], []
        for pick in torch.randint(len(usable), (images_per_batch,), generator=g).tolist():
            idx = usable[pick]
            item, lab = train_items[idx], labels[idx]
            fg = torch.nonzero((lab >= 0) & (lab < num_classes)).flatten()
            bg = torch.nonzero(lab == num_classes).flatten()
            fg = fg[torch.randperm(len(fg), generator=g)[:n_fg]]
            bg = bg[torch.randperm(len(bg), generator=g)[: per_image - len(fg)]]
            sel = torch.cat([fg, bg])  # (m,)
            pre = load_prefix(item)
            # the tail with gradients only on the maps the windows are pooled from
            scales = ([int(torch.randint(len(pre.fmaps), (1,), generator=g))] if random_scale
                      else list(range(len(pre.fmaps))))
            pyr = Conv5Pyramid(
                [trunk.forward_tail(pre.fmaps[s].to(device).float().unsqueeze(0), n_tail)[0] for s in scales],
                [pre.scaled_sizes[s] for s in scales], pre.image_size)
            scale_index = torch.zeros(len(sel), dtype=torch.int64) if random_scale else None
            feats.append(pool_regions(pyr, _candidates(item)[sel], levels, proj, scale_index))  # (m, D)
            ys.append(lab[sel])
        loss = F_.cross_entropy(head(torch.cat(feats)), torch.cat(ys).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = it + 1
        bar.update(1)
        if done % 20 == 0 or done == iters:
            history["iter"].append(done)
            history["loss"].append(float(loss.detach()))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if (val_every and done % val_every == 0) or done == iters:
            err = evaluate()
            history["val_iter"].append(done)
            history["val_error"].append(err)
            if val_sel is None or err < best_err:
                best_err = err if val_sel is not None else math.nan
                best_state = (copy.deepcopy(head.state_dict()), copy.deepcopy(tail.state_dict()))
                history["best_iter"] = done
                history["best_val_error"] = None if val_sel is None else err
            log.info("iter %d: loss %.4f, val error %s", done, float(loss.detach()),
                     "n/a" if val_sel is None else f"{err:.4f}")
            if save_state is not None and done < iters:
                save_state({"head": head.state_dict(), "tail": tail.state_dict(), "optimizer": opt.state_dict(),
                            "best_head": best_state[0], "best_tail": best_state[1], "best_err": best_err,
                            "history": history, "iter": done})
    bar.close()
    head.load_state_dict(best_state[0])
    tail.load_state_dict(best_state[1])
    head.eval()
    return head, history


# ------------------------------------------------------------------------------------------------
# feature statistics (spec §7, §8)


@torch.inference_mode()
def feature_norm_scales(
    head: FCHead,
    items: Sequence[TrainItem],
    load_pyramid: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    target_norm: float = 20.0,
    max_images: int = 200,
    max_rois: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Scale factors that bring the mean L2 norm of fc7 and of pool5 features to ``target_norm``.

    Computed on <= max_images random images x <= max_rois random windows each (GT included),
    with the spec §5 scale, fixed seed (spec §7).

    Returns:
        (fc7 scale, pool5 scale).
    """
    g = np.random.default_rng(seed)
    chosen = g.permutation(len(items))[:max_images]
    fc_norms, pool_norms = [], []
    head = head.to(device).eval()
    for i in chosen:
        item = items[int(i)]
        cand = _candidates(item)
        pick = g.permutation(cand.shape[0])[:max_rois]
        pooled = pool_regions(load_pyramid(item), cand[torch.as_tensor(pick)], levels, proj)  # (r, D)
        pool_norms.append(pooled.norm(dim=1).cpu())
        fc_norms.append(head.features(pooled.to(device)).norm(dim=1).cpu())
    fc_mean = float(torch.cat(fc_norms).mean())
    pool_mean = float(torch.cat(pool_norms).mean())
    if fc_mean <= 0 or pool_mean <= 0:
        raise RuntimeError("feature norms are zero: the backbone or head produces all-zero features")
    return target_norm / fc_mean, target_norm / pool_mean


# ------------------------------------------------------------------------------------------------
# SVMs with hard-negative mining (spec §7)


def _dedup_windows(item_pyr: Conv5Pyramid, boxes: torch.Tensor, proj: ProjectionParams) -> torch.Tensor:
    """Indices of boxes with a distinct (scale, conv5 window): spec §7 dedup."""
    s_idx = select_scales(boxes, item_pyr.image_size, item_pyr.short_sides(), target_side=proj.target_side)
    keys = torch.zeros((boxes.shape[0], 5), dtype=torch.int64)
    keys[:, 0] = s_idx
    for s in torch.unique(s_idx).tolist():
        m = s_idx == s
        keys[m, 1:] = project_boxes(boxes[m], item_pyr.image_size, item_pyr.scaled_sizes[s],
                                    tuple(item_pyr.fmaps[s].shape[-2:]), proj.stride, proj.offset0, proj.shrink)
    _, first = np.unique(keys.numpy(), axis=0, return_index=True)
    return torch.from_numpy(np.sort(first))


@torch.inference_mode()
def train_svms(
    head: FCHead,
    items: Sequence[TrainItem],
    load_pyramid: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    feature_scale: float,
    C: float = 0.001,
    pos_weight: float = 2.0,
    bias: float = 10.0,
    neg_iou: float = 0.3,
    hard_thresh: float = -1.0001,
    evict_thresh: float = -1.2,
    retrain_every: int = 2000,
    max_hard_per_image: int = 0,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-class linear SVMs on scaled fc7 features with one pass of hard-negative mining.

    Positives: every ground-truth box of the class (difficult included, spec §7). Negatives:
    proposals with IoU < ``neg_iou`` to every GT box of that class, deduplicated by
    (scale, conv5 window).

    Returns:
        (W Tensor[F, K], b Tensor[K], stats dict).
    """
    head = head.to(device).eval()
    # positives first: the miner needs them before the first retrain
    feats_pos: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    for item in tqdm(items, desc="SVM features", disable=not progress, unit="img"):
        pyr = load_pyramid(item)
        props = item.proposals
        keep = _dedup_windows(pyr, props, proj) if props.shape[0] else torch.zeros(0, dtype=torch.int64)
        props = props[keep]
        boxes = torch.cat([item.gt_boxes, props])  # (G+R, 4)
        f = head.features(pool_regions(pyr, boxes, levels, proj).to(device)).cpu() * feature_scale  # (G+R, F)
        G = item.gt_boxes.shape[0]
        for k in range(G):
            feats_pos[int(item.gt_labels[k])].append(f[k:k + 1])
        iou = pairwise_iou(props, item.gt_boxes)  # (R, G)
        neg = torch.ones((props.shape[0], num_classes), dtype=torch.bool)
        for c in range(num_classes):
            m = item.gt_labels == c
            if m.any():
                neg[:, c] = iou[:, m].max(dim=1).values < neg_iou
        cache.append((f[G:].half(), neg))
    feat_dim = int(head.out_dim)
    miner = HardNegativeMiner(num_classes, feat_dim, C=C, pos_weight=pos_weight, bias=bias,
                              hard_thresh=hard_thresh, evict_thresh=evict_thresh, retrain_every=retrain_every,
                              class_names=class_names, max_hard_per_image=max_hard_per_image)
    for c in range(num_classes):
        if feats_pos[c]:
            miner.add_positives(c, torch.cat(feats_pos[c]))
    for i, (f, neg) in enumerate(tqdm(cache, desc="hard-negative mining", disable=not progress, unit="img")):
        miner.process_image(f.float(), neg, image_index=i)
    W, b = miner.finish()
    return W, b, {"num_pos": [sum(x.shape[0] for x in fp) for fp in feats_pos]}


# ------------------------------------------------------------------------------------------------
# box regression (spec §8)


@torch.inference_mode()
def train_box_regressors(
    items: Sequence[TrainItem],
    load_pyramid: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    num_classes: int,
    pool_scale: float,
    lam: float = 4000.0,
    min_iou: float = 0.5,
    whiten_eps: float = 0.001,
    max_per_class: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Per-class ridge regressors from pooled conv5 features to box deltas (spec §8).

    Samples: windows (GT included) with IoU > ``min_iou`` to their best GT box, assigned to that
    GT's class; target = encode(window, best GT).

    Returns:
        Tensor[D + 1, 4K]: packed regressors (whitening folded in) for ``[x * pool_scale, 1]``.
    """
    X: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    P: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    T: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    for item in tqdm(items, desc="box-regression samples", disable=not progress, unit="img"):
        if item.gt_boxes.shape[0] == 0:
            continue
        cand = _candidates(item)
        iou = pairwise_iou(cand, item.gt_boxes)  # (G+R, G)
        best, arg = iou.max(dim=1)
        keep = torch.nonzero(best > min_iou).flatten()
        if keep.numel() == 0:
            continue
        feats = pool_regions(load_pyramid(item), cand[keep], levels, proj).cpu() * pool_scale  # (n, D)
        cls = item.gt_labels[arg[keep]]
        for c in torch.unique(cls).tolist():
            m = cls == c
            X[c].append(feats[m])
            P[c].append(cand[keep][m])
            T[c].append(item.gt_boxes[arg[keep]][m])
    g = torch.Generator().manual_seed(seed)
    regs = []
    D = None
    for c in range(num_classes):
        if not X[c]:
            regs.append(None)
            continue
        x, p, t = torch.cat(X[c]), torch.cat(P[c]), torch.cat(T[c])
        D = x.shape[1]
        if max_per_class and x.shape[0] > max_per_class:
            sel = torch.randperm(x.shape[0], generator=g)[:max_per_class]
            x, p, t = x[sel], p[sel], t[sel]
        regs.append(fit_bbox_regressor(x.double(), p, t, lam=lam, whiten_eps=whiten_eps))
        log.info("box regressor %d: %d samples", c, x.shape[0])
    if D is None:
        raise RuntimeError("no box-regression samples: no window overlaps a ground-truth box by IoU > %.2f" % min_iou)
    return BoxRegressor.from_per_class(regs, D).weight
