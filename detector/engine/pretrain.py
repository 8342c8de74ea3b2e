"""Stage ``pretrain``: the trunk trained as a multi-size SPP classifier on crops (paper §3, Table 2).

On a machine without ImageNet weights (``backbone.weights: none`` with ``pretrain.enabled``) the
detector's trunk and its fc6/fc7 start from a classifier trained on object and background crops of
the training images. Held-out crops come from the images the detector also holds out
(:mod:`detector.engine.data`), never from the test split; nothing is selected on them (training runs
a fixed number of epochs and keeps the last).

Outputs in ``<output_dir>/pretrain`` (or the folder given): ``classifier.pt`` (keyed, see
``detector.classifier``; ``build_backbone(arch, weights=<it>)`` loads its trunk),
``resolved_config.yaml``, ``metrics.json``; an interrupted run resumes after its last finished
epoch (``resume.pt``). :func:`table2` trains the paper's four Table 2 rows and writes the table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from detector import distributed
from detector.artifacts import (
    ArtifactError,
    digest,
    load_keyed,
    load_torch,
    save_keyed,
    tensor_digest,
    write_text,
)
from detector.backbones import build_backbone
from detector.classifier import SPPClassifier, classifier_state, reinit_kaiming
from detector.config import Config, config_to_dict, save_config
from detector.data.crops import CropSet, crops_from_folder, crops_from_records
from detector.data.imagefolder import CentreCrops, FolderSplit, RandomCrops, evaluate_views, is_imagenet_layout
from detector.data.voc import VOCDataError
from detector.engine.data import TrainingData, training_data
from detector.engine.run import Stage
from detector.pretrain import (
    evaluate_native,
    evaluate_warped,
    preprocess_crops,
    train_classifier,
)
from proposals.imageio import read_image

__all__ = ["CropData", "classifier_crops", "pretrain_classifier", "PretrainStage", "table2", "views_table"]

log = logging.getLogger(__name__)


@dataclass
class CropData:
    """Training and held-out crops of a config, with the image ids that key the classifier."""

    train: CropSet
    heldout: CropSet
    ids: dict  # "train" / "heldout" image ids
    heldout_source: str
    seconds: float
    views: FolderSplit | None = None  # ImageNet layout: the val split, scored in the paper's views


def _crop_records(cfg: Config, data: TrainingData) -> tuple[list, list, str]:
    """The images whose crops train and hold out the classifier (``pretrain.max_images`` and
    ``pretrain.val_max_images`` cut them)."""
    dc, pc = cfg.data, cfg.pretrain
    src = (f"split '{dc.val_split}'" if dc.val_split else
           f"{dc.val_fraction:.0%} of '{dc.train_split}' held out (seed {cfg.seed}, as the detector)")
    recs, held = data.finetune, data.held_out
    if pc.max_images:
        recs = recs[: pc.max_images]
    if pc.val_max_images:
        held = held[: pc.val_max_images]
    return list(recs), list(held), src


def classifier_crops(cfg: Config, data: TrainingData | None = None, store: Path | None = None) -> CropData:
    """Training and held-out crops of ``cfg.data`` with ``cfg.pretrain``'s sampling settings.

    ``data.root`` is a detection data set in ``data.format`` (VOC folder or COCO json: object crops
    and background crops, background = class K) or, for format "voc" without ``Annotations/``, an
    image folder ``root/<class>/*.jpg``. With ``store`` (a folder) the warped crops of a detection
    data set are kept in temporary files there instead of memory (``detector.data.crop_store``).

    Raises:
        VOCDataError / FileNotFoundError / ValueError: data that cannot be read (named), or no
            held-out images.
    """
    t0 = time.perf_counter()
    dc, pc = cfg.data, cfg.pretrain
    root = Path(dc.root)
    size = max(pc.sizes)
    if dc.format == "voc" and is_imagenet_layout(root):  # root/train/<class>/*, root/val/<class>/*
        train_split = FolderSplit(root / "train", dc.classes or None)
        val = FolderSplit(root / "val", train_split.classes)
        train = CropSet(images=RandomCrops(train_split, size, pc.seed, pc.workers), labels=train_split.labels,
                        class_names=train_split.classes, image_ids=train_split.ids())
        held = CropSet(images=CentreCrops(val, size, pc.workers), labels=val.labels, class_names=val.classes,
                       image_ids=val.ids())
        return CropData(train, held, {"train": train.image_ids, "heldout": held.image_ids}, f"{root / 'val'}",
                        time.perf_counter() - t0, views=val)
    if dc.format == "voc" and not (root / "Annotations").is_dir():
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} does not exist (the embedded digits set is built by "
                                    f"`sppnet make-digits --out {root}`)")
        train, held = crops_from_folder(root, read_image, size, dc.classes or None, dc.val_fraction, pc.seed)
        return CropData(train, held, {"train": train.image_ids, "heldout": held.image_ids},
                        f"{dc.val_fraction:.0%} of each class folder of {root}", time.perf_counter() - t0)
    data = data or training_data(cfg)
    recs, held, src = _crop_records(cfg, data)
    if not held:
        raise VOCDataError("no held-out images for the classifier (set data.val_split or data.val_fraction > 0)")
    names = data.class_names
    train = crops_from_records(recs, names, read_image, size, pc.crops_per_image, pc.bg_per_image, pc.seed,
                               pc.jitter, pc.context, progress=True, windows=pc.pool_window, store=store)
    heldout = crops_from_records(held, names, read_image, size, 0, pc.bg_per_image, pc.seed + 1,
                                 heldout=True, progress=True, windows=pc.pool_window,
                                 heldout_context=(1.0 + pc.context) / 2 if pc.pool_window else 1.0, store=store)
    ids = {"train": [r.image_id for r in recs], "heldout": [r.image_id for r in held]}
    return CropData(train, heldout, ids, f"{src}: {len(held)} images", time.perf_counter() - t0)


def classifier_key(cfg: Config, ids: dict) -> str:
    """Everything that changes a pre-trained classifier: the pretrain and backbone settings (not
    ``pretrain.bn_images``, which acts after it: stage ``bnstats``), the data, the image ids and the seed."""
    pc = dataclasses.replace(cfg.pretrain, bn_images=0)
    return digest("classifier", pc, cfg.backbone, cfg.data.root, ids, cfg.seed, cfg.data.val_split,
                  cfg.data.val_fraction)


def _conv5_side(backbone: torch.nn.Module, side: int) -> int:
    with torch.no_grad():
        return int(backbone(torch.zeros(1, 3, side, side)).shape[-1])


def pretrain_classifier(cfg: Config, out: Path, data: CropData, argv: Sequence[str] = ()) -> dict:
    """Train one classifier into ``out/classifier.pt`` (or reuse a valid one); returns its metrics.

    The global generators are seeded from ``cfg.seed`` first, so the result does not depend on what
    ran before in the process.
    """
    pc, bc = cfg.pretrain, cfg.backbone
    key = classifier_key(cfg, data.ids)
    ckpt = out / "classifier.pt"
    done = load_keyed(ckpt, key)
    if all(distributed.all_gather(done is not None)):
        log.info("%s is valid for this configuration; skipping training", ckpt)
        return done["meta"]["metrics"]
    if distributed.current().main:
        save_config(cfg, out, list(argv))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    backbone = build_backbone(bc.arch, width_mult=bc.width_mult, weights=bc.weights, input_format=bc.input_format)
    K = len(data.train.class_names)
    model = SPPClassifier(backbone, K, fc_dim=pc.fc_dim, levels=pc.levels, dropout=pc.dropout, spp=pc.mode != "nospp",
                          nospp_conv5=_conv5_side(backbone, max(pc.sizes)))
    input_std = float(preprocess_crops(data.train.images[:64], model.input_format).std())
    if pc.init == "kaiming" and bc.weights == "none":
        torch.manual_seed(pc.seed)
        g = torch.Generator().manual_seed(pc.seed)
        pick = torch.randperm(len(data.train), generator=g)[:32]
        reinit_kaiming(model, sample=preprocess_crops(data.train.images[pick], model.input_format))
    elif bc.weights != "none":
        torch.manual_seed(pc.seed)
        reinit_kaiming(model.head)  # pretrained trunk: only the new fc layers start from He init
    state_path = out / "resume.pt"
    resume = load_keyed(state_path, key)
    hist = train_classifier(
        model, data.train, mode=pc.mode, sizes=pc.sizes, epochs=pc.epochs, batch_size=pc.batch_size, lr=pc.lr,
        momentum=pc.momentum, weight_decay=pc.weight_decay, seed=pc.seed, hflip=pc.hflip,
        warmup_iters=pc.warmup_iters, clip_grad=pc.clip_grad, input_std=input_std, optimizer=pc.optimizer,
        device=cfg.device, resume=None if resume is None else resume["state"],
        on_epoch_end=lambda s: save_keyed(state_path, key, {"state": s}),
    )
    t_train = time.perf_counter() - t0
    if not distributed.current().main:  # rank 0 evaluates and writes; the others read its file
        distributed.barrier("classifier written")
        return load_keyed(ckpt, key)["meta"]["metrics"]
    size = max(pc.sizes)
    views = None
    if data.views is not None:  # ImageNet layout: the paper's 1-view, 10-view and full-image columns
        views = evaluate_views(model, data.views, size, device=cfg.device, workers=pc.workers,
                               max_images=pc.val_max_images)
        warped = {"error": views["1 view"]["top1"], "n": views["n"]}
        own = {"error": views["full image"]["top1"], "n": views["n"]} if model.spp else None
    else:
        warped = evaluate_warped(model, data.heldout, size=size, device=cfg.device)
        own = evaluate_native(model, data.heldout, pc.eval_min_side, device=cfg.device) if model.spp else None
    metrics = {
        "mode": pc.mode, "seed": pc.seed, "epochs": pc.epochs, "sizes": list(pc.sizes),
        "arch": bc.arch, "width_mult": bc.width_mult, "fc_dim": pc.fc_dim,
        "classes": list(data.train.class_names),
        "train_crops": len(data.train), "heldout_crops": len(data.heldout), "heldout_source": data.heldout_source,
        "train_counts": data.train.counts(), "heldout_counts": data.heldout.counts(),
        f"error_{size}": warped["error"], "eval_warped": warped,
        "error_own": None if own is None else own["error"], "eval_own": own, "views": views,
        "history": hist, "train_seconds": t_train, "crop_seconds": data.seconds,
        "eval_seconds": time.perf_counter() - t0 - t_train,
    }
    log.info("%s: held-out top-1 error %.4f at %d, %s at own size (%d crops)", pc.mode, warped["error"], size,
             "n/a" if own is None else f"{own['error']:.4f}", len(data.heldout))
    meta = {"metrics": metrics, "config": config_to_dict(cfg)}
    state = classifier_state(model, arch=bc.arch, width_mult=bc.width_mult, class_names=data.train.class_names,
                             mode=pc.mode, meta=meta)
    save_keyed(ckpt, key, state)
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    state_path.unlink(missing_ok=True)
    log.info("wrote %s", ckpt)
    distributed.barrier("classifier written")
    return metrics


def views_table(metrics: dict) -> str:
    """The paper's Table 1-4 columns of an ImageNet-layout classifier: top-1 / top-5 error (%) at
    1 view (centre crop), 10 views and the full image (through SPP)."""
    v = metrics["views"]
    cols = ("1 view", "10 views", "full image")
    return "\n".join([
        f"top-1 / top-5 error (%) on {metrics['heldout_source']} ({v['n']} images), "
        f"{metrics['arch']} x{metrics['width_mult']}, {metrics['epochs']} epochs, sizes {metrics['sizes']}:",
        "| training | " + " | ".join(cols) + " |", "|---|---|---|---|",
        f"| {metrics['mode']} | " + " | ".join(f"{100 * v[c]['top1']:.2f} / {100 * v[c]['top5']:.2f}" for c in cols)
        + " |"])


class PretrainStage(Stage[str]):
    """The trunk's weights: ``backbone.weights`` as configured, or, when ``pretrain.enabled`` with
    ``backbone.weights: none``, the classifier pre-trained into ``<out>/pretrain/classifier.pt``.
    The value is what ``build_backbone(weights=...)`` takes."""

    name = "pretrain"

    def __init__(self, cfg: Config, data: TrainingData, out_dir: Path) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data
        self.enabled = cfg.pretrain.enabled and cfg.backbone.weights == "none"
        self.folder = Path(out_dir) / "pretrain"
        recs, held, _ = _crop_records(cfg, data)
        self.ids = {"train": [r.image_id for r in recs], "heldout": [r.image_id for r in held]}

    def settings(self) -> object:
        if not self.enabled:
            return ["weights", self.cfg.backbone]
        return ["pretrain", classifier_key(self.cfg, self.ids)]

    @property
    def path(self) -> Path:
        return self.folder / "classifier.pt"

    def load(self) -> str | None:
        if not self.enabled:
            return self.cfg.backbone.weights
        done = load_keyed(self.path, classifier_key(self.cfg, self.ids))
        return None if done is None else str(self.path)

    def build(self) -> str:
        log.info("pre-training the backbone as a multi-size SPP classifier on crops -> %s", self.folder)
        data = classifier_crops(self.cfg, self.data, store=self.folder)
        log.info("crops: %d training %s, %d held-out (%.1f s)", len(data.train), data.train.counts(),
                 len(data.heldout), data.seconds)
        pretrain_classifier(self.cfg, self.folder, data)
        return str(self.path)

    def identity(self, value: str) -> str:
        p = Path(value)
        if p.is_file():
            try:  # the weights, not the file's metadata (timings): a rebuild into the same weights is the same
                return digest(self.key, tensor_digest(load_torch(p)))
            except ArtifactError:
                st = p.stat()
                return digest(self.key, st.st_size, st.st_mtime_ns)
        return self.key


# ------------------------------------------------------------------------------------------------
# Table 2: the four training modes


SECTION = ("<!-- benchmark:classifier -->", "<!-- /benchmark:classifier -->")


def row_names(sizes: Sequence[int]) -> dict[str, str]:
    """Table 2 row labels for the configured training sizes (paper: 180 and 224)."""
    lo, hi = min(sizes), max(sizes)
    return {
        "nospp": f"no SPP (fixed pool5 grid, crops warped to {hi})",
        "single": f"SPP single-size ({hi})",
        "multi": f"SPP multi-size ({'/'.join(str(s) for s in sizes)}, by epoch)",
        "random": f"SPP random-size ([{lo}, {hi}], by batch)",
    }


def _fmt(values: list[float | None], size: int = 224) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return f"n/a (fixed grid: crops are warped to {size})"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})"


def _where(device: str) -> str:
    """Where the table was made, for its footer: device, CPU cores, torch version."""
    dev = torch.device(device)
    gpu = f", GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" and torch.cuda.is_available() else ""
    return (f"device {dev.type}{gpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def table2_markdown(results: dict[str, list[dict]], cfg: Config, command: str) -> str:
    """Markdown section shaped like the paper's Table 2."""
    size = max(cfg.pretrain.sizes)
    any_m = next(iter(results.values()))[0]
    pc = cfg.pretrain
    lines = [
        SECTION[0],
        "## SPP classifier pre-training: Table 2 on digits crops",
        "",
        f"Top-1 error (%) on held-out crops ({any_m['heldout_crops']} crops: every non-difficult object of "
        f"{any_m['heldout_source']}, plus {pc.bg_per_image} background crops per image; background "
        f"is an extra class). `@{size}`: crops warped to {size}x{size}; `@own size`: each crop at its own pixel "
        f"size and aspect (shorter sides under {pc.eval_min_side} px enlarged to it), one per forward "
        f"pass. Trunk {any_m['arch']} x{any_m['width_mult']}, fc6/fc7 {any_m['fc_dim']}, "
        f"{any_m['train_crops']} training crops, {pc.epochs} epochs, batch {pc.batch_size}, "
        f"lr {pc.lr} cosine, init {pc.init}. Seeds: "
        f"{', '.join(str(m['seed']) for m in results[next(iter(results))])}. No model selection (last epoch).",
        "",
        (f"Crops: each object crop shows up to {pc.context}x its box (held-out crops "
         f"{(1 + pc.context) / 2:g}x) and the SPP rows pool only the object's own window in it "
         f"(`pretrain.pool_window`); the no-SPP row's fixed grid pools the whole crop."
         if pc.pool_window else
         f"Crops: each object crop is its box enlarged by up to {pc.context}x, pooled whole."),
        "",
        f"| | top-1 err @{size} | top-1 err @own size | epochs | seeds | train s (each) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("nospp", "single", "multi", "random"):  # the paper's row order
        if mode not in results:
            continue
        ms = results[mode]
        lines.append(
            f"| {row_names(pc.sizes)[mode]} | {_fmt([m[f'error_{size}'] for m in ms])} | "
            f"{_fmt([m['error_own'] for m in ms], size)} | {ms[0]['epochs']} | {', '.join(str(m['seed']) for m in ms)} "
            f"| {', '.join('%.0f' % m['train_seconds'] for m in ms)} |"
        )
    counts = any_m["heldout_counts"]
    prior = 1.0 - max(counts.values()) / max(1, sum(counts.values()))
    lines += [
        "",
        f"Baseline: always answering the most frequent held-out class gives {100 * prior:.2f}% error; a row "
        f"at that value has not learned to tell the classes apart.",
        "",
        "Paper (ImageNet 2012 val, ZF-5, 10-view top-1, [P3 Table 2]): no SPP 35.99, SPP single-size 34.98, "
        "SPP multi-size 34.60; random-size is reported only for Overfeat-7 (30.06 vs 29.68 multi-size). "
        "Several seeds are needed before a difference between rows here means anything; mean ± sample std "
        "over seeds is shown when there is more than one.",
        "",
        f"Command: `{command}`. Ran on: {_where(cfg.device)}; other jobs on the same machine make the "
        f"seconds noisy.",
        SECTION[1],
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the classifier section of a markdown file, keeping everything else."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    a, b = text.find(SECTION[0]), text.find(SECTION[1])
    if a >= 0 and b > a:
        text = text[:a] + section.rstrip("\n") + text[b + len(SECTION[1]):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text if text.endswith("\n") else text + "\n")


def table2(cfg: Config, out: Path, seeds: Sequence[int], benchmarks: Path | None, command: str) -> str:
    """Train the four Table 2 modes for every seed into ``out/<mode>-s<seed>`` and return the
    markdown table; with ``benchmarks`` the table is written into that file after every run (an
    interrupted table still shows what finished)."""
    results: dict[str, list[dict]] = {}
    section = ""
    for seed in seeds:
        cfg_s = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, seed=seed))
        data = classifier_crops(cfg_s)
        for mode in ("multi", "single", "nospp", "random"):  # the default (multi) first
            cfg_m = dataclasses.replace(cfg_s, pretrain=dataclasses.replace(cfg_s.pretrain, mode=mode))
            results.setdefault(mode, []).append(pretrain_classifier(cfg_m, out / f"{mode}-s{seed}", data))
            section = table2_markdown(results, cfg, command)
            if benchmarks is not None:
                write_section(benchmarks, section)
    return section
