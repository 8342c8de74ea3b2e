"""Train a torchvision peer detector from scratch on a VOC-layout split in a wall-clock budget, and
score it exactly as the project's detector is scored (devkit VOC AP, COCO AP, seconds per image).

The peers are torchvision's own CPU-sized detectors, ``fasterrcnn_mobilenet_v3_large_fpn`` and
``ssdlite320_mobilenet_v3_large``, built with ``weights=None, weights_backbone=None`` (every BatchNorm
trainable, every backbone layer trained). Each keeps its reference recipe (torchvision's
``references/detection``: optimiser, warm-up, schedule, augmentation), scaled to the budget:

* the schedule (warm-up included) is laid over a number of iterations fixed by a timed probe of
  ``probe_iters`` iterations on a throw-away copy of the model (``iterations = (budget - probe) /
  seconds per iteration``), so the learning rate finishes its decay when the budget ends and
  ``iterations=N`` replays a run exactly;
* the batch is cut to what 2 CPU cores can take and the learning rate is scaled with it
  (:data:`RECIPES` says how for each peer).

A run writes ``peer.pt`` (the weights, ``torch.load(weights_only=True)``), ``eval.json`` (mAP, COCO
AP/AP50/AP75, wall times, seconds per test image, the recipe), ``pr_curves.png`` and its test
detections as devkit comp4 files in ``results/`` (what ``sppnet eval`` and ``sppnet errors`` read,
as for the project's runs) into its folder. Training state is saved every ``save_every_s`` seconds to ``train_state.pt``; a killed run
started again with the same arguments resumes from it and ends with the same weights as an
uninterrupted one (data order and augmentation are seeded per iteration).

Shape shorthand: B images in a batch, G objects in an image, K foreground classes (the models
have K + 1 outputs, 0 = background).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from detector.artifacts import digest, load_keyed, save_keyed, save_torch, tensor_digest, write_json
from detector.data.records import DataError, ImageRecord
from detector.data.voc import load_voc_split
from detector.eval.coco import coco_evaluate
from detector.eval.comp4 import write_comp4
from detector.eval.plots import plot_pr_curves
from detector.eval.voc_ap import evaluate as voc_evaluate

__all__ = ["PeerRecipe", "RECIPES", "PEERS", "PeerResult", "lr_at", "peer_transform", "build_peer", "train_peer", "with_overrides"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerRecipe:
    """One peer's training recipe (torchvision ``references/detection``), scaled to 2 CPU cores.

    Attributes:
        model: the ``torchvision.models.detection`` builder.
        batch_size: B.
        lr: base learning rate for B (SGD, momentum 0.9).
        weight_decay: SGD weight decay.
        warmup_factor: the warm-up starts at ``lr * warmup_factor`` and rises linearly.
        warmup_iters: at most this many warm-up iterations, and at most one epoch minus one (as
            the references' ``min(1000, len(data_loader) - 1)``).
        warmup_fraction: and at most this fraction of the run (the references warm up during the
            first of 26 or 600 epochs; a budget of less than an epoch keeps that share).
        schedule: ``"multistep"`` (x0.1 at each fraction of the run in ``lr_steps``) or ``"cosine"``
            (to 0 over the run).
        lr_steps: fractions of the run where a multistep schedule divides the rate by 10.
        augmentation: ``"hflip"`` (random horizontal flip) or ``"ssdlite"`` (random IoU crop, then
            flip), the references' ``--data-augmentation`` presets.
        min_size, max_size: the model's resize (Faster R-CNN); None keeps the builder's default.
        why: how the reference was scaled, for the report.
    """

    model: str
    batch_size: int
    lr: float
    weight_decay: float
    warmup_factor: float = 0.001
    warmup_iters: int = 1000
    warmup_fraction: float = 1.0
    schedule: Literal["multistep", "cosine"] = "multistep"
    lr_steps: tuple[float, ...] = ()
    augmentation: Literal["hflip", "ssdlite"] = "hflip"
    min_size: int | None = None
    max_size: int | None = None
    why: str = ""


RECIPES: dict[str, PeerRecipe] = {
    "fasterrcnn_mobilenet_v3_large_fpn": PeerRecipe(
        model="fasterrcnn_mobilenet_v3_large_fpn", batch_size=4, lr=0.02, weight_decay=1e-4,
        warmup_fraction=1 / 26, schedule="multistep", lr_steps=(16 / 26, 22 / 26), augmentation="hflip", min_size=480, max_size=800,
        why="reference: 26 epochs, lr 0.02 for 16 images (8 GPUs x 2), x0.1 at epochs 16 and 22, flips, "
            "warm-up 1000 iterations from 0.001; here 4 images at the same lr 0.02 (the rate the issue's "
            "first peer measurement trained with), steps at the same fractions of the budget, images "
            "resized to a 480 px short side (the data sets' own scale) instead of 800"),
    "ssdlite320_mobilenet_v3_large": PeerRecipe(
        model="ssdlite320_mobilenet_v3_large", batch_size=16, lr=0.0125, weight_decay=4e-5,
        warmup_fraction=1 / 600, schedule="cosine", augmentation="ssdlite",
        why="reference: 600 epochs, lr 0.15 for 192 images (8 GPUs x 24), cosine, weight decay 4e-5, random "
            "IoU crop + flip, warm-up 1000 iterations from 0.001; here 16 images at lr 0.0125 (linear "
            "scaling), the cosine laid over the budget"),
}
PEERS = tuple(RECIPES)


def lr_at(recipe: PeerRecipe, it: int, total: int, epoch_iters: int) -> float:
    """Learning rate of iteration ``it`` (0-based) of a ``total``-iteration run with ``epoch_iters``
    iterations per epoch: the warm-up factor times the schedule's factor times ``recipe.lr``."""
    warm = min(recipe.warmup_iters, max(epoch_iters - 1, 0), max(int(recipe.warmup_fraction * total), 1))
    w = 1.0
    if it < warm:  # torch LinearLR(start_factor=f, total_iters=warm), as the references
        w = recipe.warmup_factor + (1 - recipe.warmup_factor) * it / warm
    if recipe.schedule == "cosine":
        s = 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    else:
        s = 0.1 ** sum(it >= int(f * total) for f in recipe.lr_steps)
    return recipe.lr * w * s


def peer_transform(augmentation: str, train: bool):
    """torchvision ``transforms.v2`` pipeline of a recipe: uint8 image + boxes -> float image in 0..1,
    boxes kept in step (flips, crops) and emptied boxes dropped."""
    import torchvision.transforms.v2 as T

    ops: list = []
    if train and augmentation == "ssdlite":
        ops += [T.RandomIoUCrop()]
    if train:
        ops += [T.RandomHorizontalFlip(p=0.5)]
    ops += [T.ToDtype(torch.float32, scale=True), T.SanitizeBoundingBoxes()]
    return T.Compose(ops)


def build_peer(name: str, num_classes: int, recipe: PeerRecipe | None = None) -> torch.nn.Module:
    """A from-scratch torchvision detector with ``num_classes`` = K + 1 outputs."""
    import torchvision.models.detection as D

    if name not in RECIPES:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    recipe = recipe or RECIPES[name]
    kw: dict = {}
    if recipe.min_size is not None:
        kw["min_size"] = recipe.min_size
    if recipe.max_size is not None:
        kw["max_size"] = recipe.max_size
    return getattr(D, name)(weights=None, weights_backbone=None, num_classes=num_classes, **kw)


def _sample(record: ImageRecord, transform, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """One training sample under torch seed ``seed``: (Tensor[3, H, W] float, {"boxes", "labels"})."""
    from torchvision import tv_tensors

    from proposals.imageio import read_image

    im = torch.from_numpy(read_image(record.path)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    boxes = tv_tensors.BoundingBoxes(record.boxes.clone(), format="XYXY", canvas_size=(im.shape[1], im.shape[2]))
    torch.manual_seed(seed)
    img, target = transform(tv_tensors.Image(im), {"boxes": boxes, "labels": record.labels + 1})
    return img.as_subclass(Tensor), {"boxes": target["boxes"].as_subclass(Tensor).float(),
                                     "labels": target["labels"]}


def _batch_ids(n: int, batch: int, it: int, seed: int) -> list[int]:
    """Record indices of iteration ``it``: each epoch is a seeded permutation of the ``n`` records
    cut into ``n // batch`` batches (the short rest is dropped, as ``drop_last``); with fewer records
    than a batch, the permutation is repeated to fill one."""
    per_epoch = max(n // batch, 1)
    epoch, j = divmod(it, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    if n < batch:
        return (order * -(-batch // n))[:batch]
    return order[j * batch:(j + 1) * batch]


@dataclass
class PeerResult:
    """What :func:`train_peer` measured (also in ``eval.json``)."""

    model: str
    iterations: int
    train_s: float
    test_s_per_image: dict[str, float]
    mAP: float
    coco: dict[str, float]
    out_dir: Path
    report: dict = field(default_factory=dict)

    def row(self) -> str:
        """One markdown row: model, mAP, COCO AP, AP50, AP75, training minutes, test s per image."""
        return (f"| {self.model} | {self.mAP:.4f} | {self.coco['AP']:.4f} | {self.coco['AP50']:.4f} | "
                f"{self.coco['AP75']:.4f} | {self.train_s / 60:.1f} | {self.test_s_per_image['median']:.3f} |")


def _optimizer(net: torch.nn.Module, recipe: PeerRecipe) -> torch.optim.SGD:
    """The references' SGD (momentum 0.9) over the trainable parameters."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)


def _step(model, opt, records, transform, recipe: PeerRecipe, seed: int, it: int, lr: float) -> float:
    """Training iteration ``it`` at learning rate ``lr``: its batch (:func:`_batch_ids`), each image
    augmented under its own seed, one SGD step. Returns the loss."""
    images, targets = [], []
    for j, i in enumerate(_batch_ids(len(records), recipe.batch_size, it, seed)):
        img, tgt = _sample(records[i], transform, seed * 7919 + it * recipe.batch_size + j)
        images.append(img)
        targets.append(tgt)
    for g in opt.param_groups:
        g["lr"] = lr
    losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"peer training: loss {float(loss)} at lr {lr:g}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _probe(net, records, transform, recipe: PeerRecipe, seed: int, epoch_iters: int, probe_iters: int,
           budget_s: float, progress: bool) -> tuple[float, int]:
    """Time ``probe_iters`` training iterations (after one untimed) on copies of the model and
    optimiser, which are then dropped. Returns (seconds the probe took, iterations that fill the
    rest of ``budget_s``)."""
    import copy

    from tqdm import tqdm

    t_start = time.perf_counter()
    p_net = copy.deepcopy(net).train()
    p_opt = _optimizer(p_net, recipe)
    times = []
    for i in tqdm(range(probe_iters + 1), desc="timing iterations", unit="it", disable=not progress):
        t0 = time.perf_counter()
        _step(p_net, p_opt, records, transform, recipe, seed, i, lr_at(recipe, i, 10 ** 9, epoch_iters))
        if i:
            times.append(time.perf_counter() - t0)
    probe_s = time.perf_counter() - t_start
    per_it = statistics.median(times) if times else probe_s
    total = max(int((budget_s - probe_s) / per_it), 1)
    log.info("%.2f s per iteration (median of %d): %d iterations fill the %.1f min budget after the %.0f s probe",
             per_it, len(times), total, budget_s / 60, probe_s)
    return probe_s, total


@torch.inference_mode()
def _detect(model, records: Sequence[ImageRecord], progress: bool) -> tuple[dict, list[float]]:
    from tqdm import tqdm

    from proposals.imageio import read_image

    model.eval()
    dets, times = {}, []
    for r in tqdm(records, desc="peer test", unit="img", disable=not progress):
        im = torch.from_numpy(read_image(r.path)).permute(2, 0, 1).float().div_(255)
        t0 = time.perf_counter()
        out = model([im])[0]
        times.append(time.perf_counter() - t0)
        dets[r.image_id] = {"boxes": out["boxes"].float(), "scores": out["scores"].float(),
                            "labels": out["labels"].long() - 1}
    return dets, times


def train_peer(
    data_root: str | Path,
    model: str,
    out_dir: str | Path,
    *,
    budget_s: float,
    train_split: str = "trainval",
    test_split: str = "test",
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    iterations: int | None = None,
    probe_iters: int = 10,
    num_threads: int | None = None,
    recipe: PeerRecipe | None = None,
    save_every_s: float = 300.0,
    progress: bool = True,
) -> PeerResult:
    """Train peer ``model`` on ``train_split`` for ``budget_s`` seconds of training, then score it on
    ``test_split`` with the devkit evaluator (VOC07 11-point AP) and COCO AP.

    Args:
        data_root: a VOC-layout folder.
        model: one of :data:`PEERS`.
        out_dir: the run's folder (``peer.pt``, ``eval.json``, ``pr_curves.png``, ``train_state.pt``).
        budget_s: training wall-clock budget; the iteration count is fixed from the probe.
        class_names: K names in id order; None = every name of ``train_split``, sorted.
        iterations: fix the iteration count instead of probing (replays a run exactly).
        probe_iters: iterations timed (after the first, which warms up) to size the run.
        num_threads: torch intra-op threads (None: leave as is).
        recipe: override :data:`RECIPES` ``[model]`` (same model).
        save_every_s: seconds between saves of the training state.
    Returns:
        :class:`PeerResult`.
    """
    from tqdm import tqdm

    if model not in RECIPES:
        raise ValueError(f"unknown peer {model!r}; choose one of {', '.join(PEERS)}")
    recipe = recipe or RECIPES[model]
    if recipe.model != model:
        raise ValueError(f"recipe is for {recipe.model!r}, not {model!r}")
    if not budget_s > 0 and iterations is None:
        raise ValueError(f"budget_s must be positive, got {budget_s!r}")
    if num_threads:
        torch.set_num_threads(num_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, names = load_voc_split(data_root, train_split, class_names)
    records = [r for r in records if len(r.boxes)]
    if not records:
        raise DataError(f"{data_root}: no image of '{train_split}' has an object to train on")
    test_records, _ = load_voc_split(data_root, test_split, names, raw_boxes=True)
    transform = peer_transform(recipe.augmentation, train=True)
    epoch_iters = max(len(records) // recipe.batch_size, 1)
    # the training state is valid for these images, annotations and settings only: an edited
    # annotation or a replaced image file starts the run over instead of resuming it
    files = [(r.image_id, st.st_size, st.st_mtime_ns) for r in records for st in [r.path.stat()]]
    key = digest(asdict(recipe), files, tensor_digest([[r.boxes, r.labels] for r in records]), names, seed,
                 budget_s, iterations, probe_iters)

    torch.manual_seed(seed)
    net = build_peer(model, len(names) + 1, recipe)
    opt = _optimizer(net, recipe)
    state = load_keyed(out / "train_state.pt", key)
    it, total, train_s, probe_s, losses = 0, iterations, 0.0, 0.0, []
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        it, total, train_s, probe_s, losses = (state["it"], state["total"], state["train_s"], state["probe_s"],
                                               state["losses"])
        log.info("resuming %s at iteration %d of %s", out / "train_state.pt", it, total)

    def save() -> None:
        save_keyed(out / "train_state.pt", key, {"model": net.state_dict(), "opt": opt.state_dict(), "it": it,
                                                 "total": total, "train_s": train_s, "probe_s": probe_s,
                                                 "losses": losses})

    log.info("training %s from scratch on %d images of %s (%d classes), %s", model, len(records), data_root,
             len(names), f"{iterations} iterations" if iterations else f"a {budget_s / 60:.1f} min budget")
    if total is None:
        probe_s, total = _probe(net, records, transform, recipe, seed, epoch_iters, probe_iters, budget_s,
                                progress)
        train_s = probe_s  # the probe is part of the budget's wall clock
        save()
    net.train()
    last_save = time.perf_counter()
    bar = tqdm(total=total, initial=it, desc=f"{model} train", unit="it", disable=not progress)
    while it < total:
        t0 = time.perf_counter()
        lr = lr_at(recipe, it, total, epoch_iters)
        losses.append(_step(net, opt, records, transform, recipe, seed, it, lr))
        train_s += time.perf_counter() - t0
        it += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2g}")
        if time.perf_counter() - last_save > save_every_s:
            save()
            last_save = time.perf_counter()
    bar.close()
    save()
    save_torch(out / "peer.pt", {"model": model, "num_classes": len(names) + 1, "class_names": list(names),
                                 "recipe": asdict(recipe), "iterations": total, "state_dict": net.state_dict()})

    t0 = time.perf_counter()
    dets, times = _detect(net, test_records, progress)
    test_wall = time.perf_counter() - t0
    result = voc_evaluate(test_records, names, dets, metric="07")
    coco = coco_evaluate(test_records, names, dets)
    plot_pr_curves(result, out / "pr_curves.png")
    write_comp4(out / "results", test_split, names, dets)
    timing = {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}
    report = {"model": model, "data_root": str(data_root), "train_split": train_split, "test_split": test_split,
              "train_images": len(records), "seed": seed, "budget_s": budget_s, "iterations": total,
              "train_s": train_s, "probe_s": probe_s, "test_wall_s": test_wall, "test_s_per_image": timing, "coco": coco,
              "threads": torch.get_num_threads(), "recipe": asdict(recipe),
              "loss_first_last": [losses[0], losses[-1]] if losses else [], **result.to_dict()}
    write_json(out / "eval.json", report)
    log.info("%s: mAP %.4f, COCO AP %.4f (AP50 %.4f, AP75 %.4f) after %d iterations in %.1f min", model,
             result.mAP, coco["AP"], coco["AP50"], coco["AP75"], total, train_s / 60)
    return PeerResult(model=model, iterations=total, train_s=train_s, test_s_per_image=timing, mAP=result.mAP,
                      coco=coco, out_dir=out, report=report)


def with_overrides(recipe: PeerRecipe, **kw) -> PeerRecipe:
    """``recipe`` with the given fields replaced (None values ignored)."""
    return replace(recipe, **{k: v for k, v in kw.items() if v is not None})
