"""Fine-tuning fc6, fc7 and a (K+1)-way classifier on SPP-pooled windows (spec §6), optionally
with the trunk's last conv units.

Shape shorthand:
    R: proposals in one image   G: ground-truth boxes   B: windows in a mini-batch
    D = C*B pooled width        K: foreground classes (background is index K)

One loop, :func:`finetune`, does what every mode shares: SGD with momentum and weight decay, bias
learning rate x2 (spec §6), learning rate x0.1 at each of ``lr_steps``, validation on fixed
held-out windows every ``val_every`` iterations keeping the best weights (model selection on
held-out data, never test), a loss history, and resume files that replay the run exactly (the
batch draws are functions of the iteration; the dropout generator's state is saved).

Where the pooled features of a batch come from is a *window source*:

:class:`CachedWindows` (the spec: fc layers only)
    The conv5 maps are fixed, so every ``chunk_iters`` iterations ``chunk_images`` random images
    are pooled once and their windows drawn into the next ``chunk_iters`` batches: every batch
    mixes windows of many images (spec §6 builds 500 batches at a time).
:class:`TunedTailWindows` (``finetune.conv_layers`` > 0, a deviation Fast R-CNN showed pays)
    The cache holds the maps *before* the trunk's last units; every iteration runs those units
    with gradients on ``images_per_batch`` random images and pools ``batch_size /
    images_per_batch`` windows from each, so gradients flow through the SPP layer into the tail.

Both draw their windows with :func:`detector.sampling.sample_windows` (a ``fg_fraction`` share of
foreground windows, IoU >= ``fg_iou``, the rest background, IoU in [``bg_iou_low``,
``bg_iou_high``)) from generators seeded by ``seed`` and the chunk or iteration, and pool at a
random scale per window (or per image with a tail) when ``random_scale``; validation windows use
the spec §5 scale choice.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from detector import distributed
from detector.config import FinetuneConfig
from detector.head import FCHead
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from detector.sampling import label_windows, sample_windows
from detector.train_items import TrainItem, candidates

__all__ = ["WindowSource", "CachedWindows", "TunedTailWindows", "finetune", "warn_if_collapsed", "window_labels"]

log = logging.getLogger(__name__)

LoadPyramid = Callable[[TrainItem], Conv5Pyramid]


def window_labels(items: Sequence[TrainItem], num_classes: int, params: FinetuneConfig) -> list[Tensor]:
    """Fine-tuning label of every window of every item: Tensor[G + R] int16 each (K = background,
    -1 = unused), from :func:`detector.sampling.label_windows` with the params' IoU thresholds.

    int16, not int64: the labels of every window of every item are held through fine-tuning (4 KB
    instead of 16 KB per item of 2000 windows); batches widen them back to int64."""
    if num_classes >= torch.iinfo(torch.int16).max:
        raise ValueError(f"window_labels: {num_classes} classes do not fit int16 labels")
    return [label_windows(candidates(it), it.gt_boxes, it.gt_labels, num_classes, fg_iou=params.fg_iou,
                          bg_low=params.bg_iou_low, bg_high=params.bg_iou_high)[0].to(torch.int16) for it in items]


def pool_selected(items: Sequence[TrainItem], selection: Sequence[tuple[int, int]], load_pyramid: LoadPyramid,
                  levels: Sequence[int], proj: ProjectionParams,
                  scale_generator: torch.Generator | None) -> Tensor:
    """Pooled features of the selected ``(item, window)`` pairs, in the order of ``selection``.

    Each item's maps are loaded once. ``scale_generator`` draws a random scale per window (in
    order of first appearance of each item); None uses the spec §5 choice.

    Returns:
        Tensor[M, D] float32 on the CPU.
    """
    by_item: dict[int, list[int]] = {}
    for pos, (it, _) in enumerate(selection):
        by_item.setdefault(it, []).append(pos)
    out: Tensor | None = None
    for it, positions in by_item.items():
        item = items[it]
        pyr = load_pyramid(item)
        widx = torch.tensor([selection[p][1] for p in positions], dtype=torch.int64)
        scale_index = (torch.randint(len(pyr.fmaps), (len(positions),), generator=scale_generator)
                       if scale_generator is not None else None)
        feats = pool_regions(pyr, candidates(item)[widx], levels, proj, scale_index)  # (m, D)
        if out is None:
            out = torch.zeros((len(selection), feats.shape[1]), dtype=torch.float32)
        out[torch.tensor(positions)] = feats.cpu()
    if out is None:
        raise ValueError("pool_selected: empty selection")
    return out


class WindowSource(Protocol):
    """Pooled features of fine-tuning batches and of the fixed validation windows."""

    def trainable(self) -> list[tuple[nn.Module, float]]:
        """Modules trained besides the head, each with its learning-rate multiplier."""

    def batches(self, start: int, iters: int) -> Iterator[tuple[Tensor, Tensor, int, Tensor]]:
        """``(x Tensor[b, D], y Tensor[b] int64, B, rows Tensor[b] int64)`` for iterations ``start`` ..
        ``iters - 1``: this rank's ``b`` windows of the batch of ``B`` (all of them with one process)
        and their positions in the batch as one process orders it (dropout draws the whole batch's
        mask, :meth:`FCHead.forward`)."""

    def validation(self) -> tuple[Tensor, Tensor] | None:
        """Features and labels of the fixed validation windows under the current weights (None:
        no held-out images)."""

    def state_dict(self) -> dict:
        """The trained modules' weights (for the best snapshot and resume)."""

    def load_state_dict(self, state: dict) -> None: ...


def _validation_selection(val_items: Sequence[TrainItem], num_classes: int, params: FinetuneConfig
                          ) -> tuple[list[tuple[int, int]], Tensor] | None:
    """The fixed validation windows: ``val_batches`` batches' worth drawn once from every held-out
    image with a generator seeded by ``seed``; returns (selection, labels Tensor[M] int64)."""
    if not val_items:
        return None
    gv = torch.Generator().manual_seed(params.seed + 7919)
    vlabels = window_labels(val_items, num_classes, params)
    n_fg = int(round(params.batch_size * params.fg_fraction))
    sel, _, _ = sample_windows(vlabels, range(len(val_items)), num_classes, n_fg * params.val_batches,
                               params.batch_size * params.val_batches, gv)
    if not sel:
        return None
    return sel, torch.tensor([int(vlabels[i][j]) for i, j in sel], dtype=torch.int64)


class CachedWindows:
    """Batches pooled from fixed (cached) conv5 maps, a chunk of batches at a time (spec §6).

    Chunk ``c`` (iterations ``c*chunk_iters`` ..) draws its images, windows, scales and batch
    order from ``Generator().manual_seed(seed * 1_000_003 + c)``: ``chunk_images`` images in random
    order, ``chunk_iters * batch_size`` windows from them (``fg_fraction`` foreground), each pooled
    at a random scale when ``random_scale``; batch ``b`` takes the ``b``-th equal share of the
    chunk's shuffled foreground and background draws. A resume inside a chunk replays its draw.

    Args:
        items: training items; ``load_pyramid(item)`` gives their conv5 maps.
        val_items: held-out items for validation (may be empty).
    """

    def __init__(self, items: Sequence[TrainItem], val_items: Sequence[TrainItem], load_pyramid: LoadPyramid,
                 levels: Sequence[int], proj: ProjectionParams, num_classes: int, params: FinetuneConfig) -> None:
        self.items, self.val_items, self.load = list(items), list(val_items), load_pyramid
        self.levels, self.proj, self.num_classes, self.params = tuple(levels), proj, num_classes, params
        self.labels = window_labels(self.items, num_classes, params)
        self._val: tuple[Tensor, Tensor] | None | bool = False  # computed once, on first use

    def trainable(self) -> list[tuple[nn.Module, float]]:
        return []

    def batches(self, start: int, iters: int) -> Iterator[tuple[Tensor, Tensor, int]]:
        p = self.params
        n_items = len(self.items)
        n_fg = int(round(p.batch_size * p.fg_fraction))
        it = start
        while it < iters:
            chunk = it // p.chunk_iters
            g = torch.Generator().manual_seed(p.seed * 1_000_003 + chunk)
            order = torch.randperm(n_items, generator=g).tolist()[: min(p.chunk_images, n_items)]
            sel, nfg, nbg = sample_windows(self.labels, order, self.num_classes, n_fg * p.chunk_iters,
                                           p.batch_size * p.chunk_iters, g)
            feats = pool_selected(self.items, sel, self.load, self.levels, self.proj, g if p.random_scale else None)
            lab = torch.tensor([int(self.labels[i][j]) for i, j in sel], dtype=torch.int64)  # (M,)
            fg_idx = torch.randperm(nfg, generator=g) if nfg else torch.zeros(0, dtype=torch.int64)
            bg_idx = nfg + torch.randperm(nbg, generator=g) if nbg else torch.zeros(0, dtype=torch.int64)
            n_batches = min(p.chunk_iters, iters - chunk * p.chunk_iters)
            for b in range(it - chunk * p.chunk_iters, n_batches):
                f0, f1 = b * nfg // p.chunk_iters, (b + 1) * nfg // p.chunk_iters
                b0, b1 = b * nbg // p.chunk_iters, (b + 1) * nbg // p.chunk_iters
                idx = torch.cat([fg_idx[f0:f1], bg_idx[b0:b1]])  # (B,)
                if idx.numel() == 0:
                    raise ValueError(f"fine-tuning: {len(order)} images hold only {nfg + nbg} labelled windows "
                                     f"for {p.chunk_iters} batches (finetune.chunk_iters): a batch would be "
                                     f"empty; use more images or a smaller finetune.chunk_iters")
                lo, hi = _slice(len(idx))
                yield feats[idx[lo:hi]], lab[idx[lo:hi]], len(idx), torch.arange(lo, hi)
                it += 1

    def validation(self) -> tuple[Tensor, Tensor] | None:
        if self._val is False:
            sel = _validation_selection(self.val_items, self.num_classes, self.params)
            self._val = None if sel is None else (
                pool_selected(self.val_items, sel[0], self.load, self.levels, self.proj, None), sel[1])
        return self._val  # type: ignore[return-value]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TunedTailWindows:
    """Batches pooled from conv5 maps that the trunk's last ``n_tail`` units compute with gradients.

    ``load_prefix(item)`` gives an item's cached maps *before* the tail (``trunk.forward_prefix``).
    Iteration ``i`` draws from ``Generator().manual_seed(seed * 1_000_003 + i)``: ``images_per_batch``
    images uniformly (with replacement) among those with a labelled window, from each
    ``batch_size / images_per_batch`` windows (``fg_fraction`` foreground), and, when
    ``random_scale``, one random scale per image (the tail then runs on one map instead of all).
    The trunk stays in ``eval()`` (BatchNorm statistics frozen); its tail is trained in place.

    Args:
        trunk: the backbone (``tail_modules``, ``forward_tail``).
        n_tail: tail units, 1 .. ``trunk.tail_units``.
    """

    def __init__(self, trunk: nn.Module, n_tail: int, items: Sequence[TrainItem], val_items: Sequence[TrainItem],
                 load_prefix: LoadPyramid, levels: Sequence[int], proj: ProjectionParams, num_classes: int,
                 params: FinetuneConfig, device: str | torch.device = "cpu") -> None:
        if not 1 <= n_tail <= trunk.tail_units:
            raise ValueError(f"n_tail must be in 1..{trunk.tail_units}, got {n_tail}")
        if params.images_per_batch < 1 or params.batch_size < params.images_per_batch:
            raise ValueError(f"need 1 <= images_per_batch <= batch_size, got {params.images_per_batch}, "
                             f"{params.batch_size}")
        self.trunk, self.n_tail, self.device = trunk.to(device).eval(), n_tail, torch.device(device)
        self.tail = nn.ModuleList(trunk.tail_modules(n_tail))  # shares the trunk's parameters
        self.items, self.val_items, self.load = list(items), list(val_items), load_prefix
        self.levels, self.proj, self.num_classes, self.params = tuple(levels), proj, num_classes, params
        self.labels = window_labels(self.items, num_classes, params)
        self.usable = [i for i, lab in enumerate(self.labels) if bool((lab >= 0).any())]
        if not self.usable:
            raise ValueError("fine-tuning: no training image has a labelled window")
        first = self.load(self.items[self.usable[0]])
        self.n_scales = len(first.fmaps)  # every item has the cache's scales
        self._dim = int(trunk.out_channels) * sum(n * n for n in self.levels)
        self._val_sel = _validation_selection(self.val_items, num_classes, params)

    def trainable(self) -> list[tuple[nn.Module, float]]:
        return [(self.tail, float(self.params.conv_lr_mult))]

    def _tuned(self, item: TrainItem) -> Conv5Pyramid:
        pre = self.load(item)
        with torch.no_grad():
            fmaps = [self.trunk.forward_tail(f.to(self.device).float().unsqueeze(0), self.n_tail)[0]
                     for f in pre.fmaps]  # S x (C, Hs, Ws)
        return Conv5Pyramid(fmaps=fmaps, scaled_sizes=pre.scaled_sizes, image_size=pre.image_size)

    def batches(self, start: int, iters: int) -> Iterator[tuple[Tensor, Tensor, int]]:
        p = self.params
        per_image = p.batch_size // p.images_per_batch
        n_fg = int(round(per_image * p.fg_fraction))
        info = distributed.current()
        for it in range(start, iters):
            g = torch.Generator().manual_seed(p.seed * 1_000_003 + it)  # per iteration: a resume replays it
            plan = []  # (item index, windows, scale): every rank draws the whole batch, in one order
            for pick in torch.randint(len(self.usable), (p.images_per_batch,), generator=g).tolist():
                idx = self.usable[pick]
                sel, _, _ = sample_windows(self.labels, [idx], self.num_classes, n_fg, per_image, g)
                win = torch.tensor([j for _, j in sel], dtype=torch.int64)  # (m,)
                scale = int(torch.randint(self.n_scales, (1,), generator=g)) if p.random_scale else None
                plan.append((idx, win, scale))
            feats, ys = [], []
            offsets = [0]
            for _, w, _ in plan:  # where each image's windows start in the one-process batch
                offsets.append(offsets[-1] + len(w))
            rows = [torch.arange(offsets[k], offsets[k + 1]) for k in range(info.rank, len(plan), info.world)]
            for idx, win, scale in plan[info.rank::info.world]:  # this rank's images of the batch
                item, pre = self.items[idx], self.load(self.items[idx])
                # the tail runs with gradients only on the maps the windows are pooled from
                scales = [scale] if scale is not None else list(range(len(pre.fmaps)))
                pyr = Conv5Pyramid(
                    [self.trunk.forward_tail(pre.fmaps[s].to(self.device).float().unsqueeze(0), self.n_tail)[0]
                     for s in scales],
                    [pre.scaled_sizes[s] for s in scales], pre.image_size)
                scale_index = torch.zeros(len(win), dtype=torch.int64) if scale is not None else None
                feats.append(pool_regions(pyr, candidates(item)[win], self.levels, self.proj, scale_index))  # (m, D)
                ys.append(self.labels[idx][win].long())
            n = offsets[-1]
            if not feats:  # more ranks than images in the batch: this rank adds nothing to it
                yield torch.zeros((0, self._dim)), torch.zeros(0, dtype=torch.int64), n, torch.zeros(0, dtype=torch.int64)
                continue
            yield torch.cat(feats), torch.cat(ys), n, torch.cat(rows)

    def validation(self) -> tuple[Tensor, Tensor] | None:
        if self._val_sel is None:
            return None
        sel, labels = self._val_sel
        return pool_selected(self.val_items, sel, self._tuned, self.levels, self.proj, None), labels

    def state_dict(self) -> dict:
        return copy.deepcopy(self.tail.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.tail.load_state_dict(state)


def _sgd(modules: Sequence[tuple[nn.Module, float]], lr: float, momentum: float,
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


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _slice(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``n`` items (all of them with one process)."""
    info = distributed.current()
    return n * info.rank // info.world, n * (info.rank + 1) // info.world


def _all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the ranks (one collective on a flat buffer); a missing
    gradient (a rank whose share of the batch was empty) counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def warn_if_collapsed(best_err: float | None, background_err: float, lr: float) -> bool:
    """Warn when fine-tuning never beat calling every validation window background: the head has
    collapsed to the class prior and the detector built on it finds next to nothing. Returns
    whether it warned.

    Seen with trunks whose conv5 maps are dense (the CPU-width ResNet-18 on digits: validation
    error 0.25 = the foreground share at every check at lr 0.02, held-out mAP 0.002; at 0.002 it
    learns), where fc6's inputs are much longer than ZF-5's and the same rate drives the head to
    the prior.
    """
    if best_err is None or math.isnan(background_err) or best_err < background_err - 1e-6:
        return False
    log.warning("fine-tuning did not learn: the best validation error %.4f is no better than calling every "
                "window background (%.4f); the detector built on this head will find next to nothing. Lower "
                "finetune.lr (now %g; trunks with dense conv5 maps such as resnet18 need about 10x less than "
                "ZF-5's 0.02) or check the pre-trained weights", best_err, background_err, lr)
    return True


def finetune(
    head: FCHead,
    source: WindowSource,
    params: FinetuneConfig,
    *,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "fine-tune",
) -> tuple[FCHead, dict]:
    """Fine-tune ``head`` (and the source's trainable modules) on the source's batches (spec §6).

    Uses ``params.iters``, ``lr``, ``lr_steps``, ``momentum``, ``weight_decay``, ``val_every``;
    the source uses the sampling fields. Dropout draws from torch's global generator, whose state
    is part of the resume file.

    With several processes (``detector.distributed``) every rank draws the same batch (the draws
    are functions of the iteration), takes its share of it, and the gradients are summed over the
    ranks (one all-reduce per step) into the batch's gradient. Every rank draws from the same
    dropout stream the masks of the whole batch and keeps its rows, so a step equals the
    one-process step on the same windows, dropout included, up to the order of the float sum.
    ``batch_size`` is the whole batch over all ranks, so the learning rate needs no change with the
    number of processes. Rank 0 writes the resume file; a run resumes with any number of processes.

    Args:
        head: FCHead with a (K+1)-way ``cls_score`` (background = K).
        source: a :class:`WindowSource`.
        resume_state: a dict that ``save_state`` was given: training continues from it exactly.
        save_state: called with the resume dict after every validation before the last iteration.
    Returns:
        (head holding the best weights, in eval mode; history dict with iterations, losses,
        validation iterations and errors, best iteration and error). The source's modules hold
        their best weights too.
    """
    device = torch.device(device)
    info = distributed.current()
    head = head.to(device).train()
    modules = [(head, 1.0), *source.trainable()]
    opt, base_lrs = _sgd(modules, params.lr, params.momentum, params.weight_decay)
    trained = [p for m, _ in modules for p in m.parameters()]
    if info.active:  # every rank starts from rank 0's weights
        for p in trained:
            dist.broadcast(p.data, src=0)
    iters = int(params.iters)
    history: dict = {"iter": [], "loss": [], "val_iter": [], "val_error": [], "best_iter": 0, "best_val_error": None}
    start, best_err = 0, math.inf
    best = (copy.deepcopy(head.state_dict()), source.state_dict())
    if resume_state is not None:
        head.load_state_dict(resume_state["head"])
        source.load_state_dict(resume_state["source"])
        opt.load_state_dict(resume_state["optimizer"])
        best, best_err = (resume_state["best_head"], resume_state["best_source"]), resume_state["best_err"]
        history, start = resume_state["history"], int(resume_state["iter"])
        # every rank draws the one dropout stream (rank 0's), whatever the number of processes that
        # saved the state: a resume with another number continues the uninterrupted run's draws
        _set_rng_state(resume_state["rng"][0], device)
        log.info("fine-tuning resumes at iteration %d (saved by %d process(es), resumed by %d)", start,
                 len(resume_state["rng"]), info.world)

    background_err = math.nan  # the validation error of calling every window background

    def validation_error() -> float:
        nonlocal background_err
        head.eval()
        with torch.no_grad():
            val = source.validation()
            err = math.nan if val is None else float((head(val[0].to(device)).argmax(1).cpu() != val[1]).float().mean())
            if val is not None:
                background_err = float((val[1] != head.cls_score.out_features - 1).float().mean())
        head.train()
        return err

    bar = tqdm(total=iters, initial=start, desc=desc, disable=not progress, unit="it")
    it = start
    for x, y, n, rows in source.batches(start, iters):
        factor = 0.1 ** sum(it >= s for s in params.lr_steps)
        for grp, base in zip(opt.param_groups, base_lrs):
            grp["lr"] = base * factor
        opt.zero_grad(set_to_none=True)
        if not info.active:
            loss = F.cross_entropy(head(x.to(device)), y.to(device))
            loss.backward()
        else:  # this rank's share of the batch's mean loss; the sum over ranks is the batch's gradient
            loss = F.cross_entropy(head(x.to(device), rows, n), y.to(device), reduction="sum") / n
            loss.backward()
            _all_reduce_grads(trained)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
        opt.step()
        it += 1
        bar.update(1)
        if it % 20 == 0 or it == iters:
            history["iter"].append(it)
            history["loss"].append(float(loss.detach()))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if (params.val_every and it % params.val_every == 0) or it == iters:
            err = validation_error()
            history["val_iter"].append(it)
            history["val_error"].append(err)
            if math.isnan(err) or err < best_err:
                best_err = err
                best = (copy.deepcopy(head.state_dict()), source.state_dict())
                history["best_iter"] = it
                history["best_val_error"] = None if math.isnan(err) else err
            log.info("iter %d: loss %.4f, val error %s", it, float(loss.detach()),
                     "n/a" if math.isnan(err) else f"{err:.4f}")
            if save_state is not None and it < iters:
                rngs = distributed.all_gather(_rng_state(device))  # the ranks' dropout streams (one and the same)
                if info.main:
                    save_state({"head": head.state_dict(), "source": source.state_dict(),
                                "optimizer": opt.state_dict(), "best_head": best[0], "best_source": best[1],
                                "best_err": best_err, "history": history, "iter": it, "rng": rngs})
    bar.close()
    warn_if_collapsed(history.get("best_val_error"), background_err, params.lr)
    head.load_state_dict(best[0])
    source.load_state_dict(best[1])
    head.eval()
    return head, history
