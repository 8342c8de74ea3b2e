"""Pre-train the trunk as an SPP classifier on crops (paper §3 and Table 2; issue 3 item 5).

    python tools/train_classifier.py --config configs/digits_zf5.yaml [--set key=value ...]
        [--mode single|multi|random|nospp] [--out DIR]
    python tools/train_classifier.py --config configs/digits_zf5.yaml --all-modes [--seeds 0 1]

Data: ``data.root`` as a VOC-layout folder (object crops + background crops of ``data.train_split``,
background = class K) or an image folder ``root/<class>/*.jpg``. Held-out crops come from
``data.val_split`` or, when it is "", from the ``data.val_fraction`` of the training images that the
detector also holds out (``detector.training.split_train_val`` with ``seed``); never from the test
split. Nothing is selected on them: training runs a fixed number of epochs and keeps the last one.

Outputs in ``--out`` (default ``<output_dir>/pretrain``): ``classifier.pt`` (see
``detector.classifier``; ``build_backbone(arch, weights=<it>)`` loads its trunk),
``resolved_config.yaml``, ``metrics.json`` and ``log.txt``. A run whose ``classifier.pt`` was made under
the same configuration and image ids is skipped; an interrupted run resumes after its last epoch
(``resume.pt``).

``--all-modes`` trains the four Table 2 rows (no SPP, single-size, multi-size, random-size) for each
``--seeds`` value into ``<output_dir>/pretrain_modes/<mode>-s<seed>`` and writes the table into the
``classifier`` section of BENCHMARKS.md (other sections are kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import _common as C
from detector.backbones import build_backbone
from detector.classifier import (
    ClassifierCheckpointError, SPPClassifier, classifier_state, read_classifier_state, reinit_kaiming,
    save_classifier,
)
from detector.config import Config, config_to_dict, save_config
from detector.data.crops import CropSet, crops_from_folder, crops_from_records
from detector.pretrain import MODES, evaluate_native, evaluate_warped, preprocess_crops, train_classifier

log = logging.getLogger("train_classifier")

def row_names(sizes) -> dict[str, str]:
    """Table 2 row labels for the configured training sizes (paper: 180 and 224)."""
    lo, hi = min(sizes), max(sizes)
    return {
        "nospp": f"no SPP (fixed pool5 grid, crops warped to {hi})",
        "single": f"SPP single-size ({hi})",
        "multi": f"SPP multi-size ({'/'.join(str(s) for s in sizes)}, by epoch)",
        "random": f"SPP random-size ([{lo}, {hi}], by batch)",
    }


SECTION = ("<!-- benchmark:classifier -->", "<!-- /benchmark:classifier -->")  # tools/benchmark.py style


@dataclass
class CropData:
    train: CropSet
    heldout: CropSet
    ids: dict  # "train" / "heldout" image ids (cache key)
    heldout_source: str
    seconds: float


def load_crops(cfg: Config) -> CropData:
    """Training and held-out crops of ``cfg.data`` with ``cfg.pretrain``'s sampling settings."""
    from proposals.imageio import read_image

    t0 = time.perf_counter()
    dc, pc = cfg.data, cfg.pretrain
    root = Path(dc.root)
    size = max(pc.sizes)
    if not (root / "Annotations").is_dir():
        if not root.is_dir():
            sys.exit(f"data error: {root} does not exist (build the digits set with tools/make_dataset.py)")
        train, held = crops_from_folder(root, read_image, size, dc.classes or None, dc.val_fraction, pc.seed)
        src = f"{dc.val_fraction:.0%} of each class folder of {root}"
        return CropData(train, held, {"train": train.image_ids, "heldout": held.image_ids}, src,
                        time.perf_counter() - t0)
    from detector.training import split_train_val
    from detector.data.voc import load_voc_split

    recs, names = load_voc_split(root, dc.train_split, dc.classes or None)
    if dc.max_train_images:
        recs = recs[: dc.max_train_images]
    if dc.val_split:
        held, _ = load_voc_split(root, dc.val_split, names)
        held_ids = {r.image_id for r in held}
        recs = [r for r in recs if r.image_id not in held_ids]
        src = f"split '{dc.val_split}'"
    else:
        recs, held = split_train_val(recs, dc.val_fraction, cfg.seed)
        src = f"{dc.val_fraction:.0%} of '{dc.train_split}' held out (seed {cfg.seed}, as the detector)"
    if pc.max_images:
        recs = recs[: pc.max_images]
    if pc.val_max_images:
        held = held[: pc.val_max_images]
    if not held:
        sys.exit("data error: no held-out images (set data.val_split or data.val_fraction > 0)")
    train = crops_from_records(recs, names, read_image, size, pc.crops_per_image, pc.bg_per_image, pc.seed,
                               pc.jitter, pc.context, progress=True, windows=pc.pool_window)
    heldout = crops_from_records(held, names, read_image, size, 0, pc.bg_per_image, pc.seed + 1,
                                 heldout=True, progress=True, windows=pc.pool_window,
                                 heldout_context=(1.0 + pc.context) / 2 if pc.pool_window else 1.0)
    ids = {"train": [r.image_id for r in recs], "heldout": [r.image_id for r in held]}
    return CropData(train, heldout, ids, f"{src}: {len(held)} images", time.perf_counter() - t0)


def run_one(cfg: Config, out: Path, data: CropData, argv: list[str]) -> dict:
    """Train (or reuse) one classifier; returns its metrics."""
    pc, bc = cfg.pretrain, cfg.backbone
    key = C.digest("sppnet-classifier-v1", pc, bc, cfg.data.root, data.ids, cfg.seed, cfg.data.val_split,
                   cfg.data.val_fraction)
    ckpt = out / "classifier.pt"
    if ckpt.is_file():
        try:
            st = read_classifier_state(ckpt)
            if st["meta"].get("key") == key:
                log.info("%s is valid for this configuration; skipping training", ckpt)
                return st["meta"]["metrics"]
            log.info("%s was made under another configuration; retraining", ckpt)
        except ClassifierCheckpointError as e:
            log.warning("%s; retraining", e)
    save_config(cfg, out, argv)
    t0 = time.perf_counter()
    backbone = build_backbone(bc.arch, width_mult=bc.width_mult, weights=bc.weights)
    K = len(data.train.class_names)
    model = SPPClassifier(backbone, K, fc_dim=pc.fc_dim, levels=pc.levels, spp=pc.mode != "nospp",
                          nospp_conv5=_conv5_side(backbone, max(pc.sizes)))
    if pc.init not in ("spec", "kaiming"):
        sys.exit(f"config error: pretrain.init must be 'spec' or 'kaiming', got '{pc.init}'")
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
    resume = C.load_if_valid(state_path, key)
    hist = train_classifier(
        model, data.train, mode=pc.mode, sizes=pc.sizes, epochs=pc.epochs, batch_size=pc.batch_size, lr=pc.lr,
        momentum=pc.momentum, weight_decay=pc.weight_decay, seed=pc.seed, hflip=pc.hflip,
        warmup_iters=pc.warmup_iters, clip_grad=pc.clip_grad, input_std=input_std, optimizer=pc.optimizer,
        device=cfg.device,
        resume=None if resume is None else resume["state"],
        on_epoch_end=lambda s: C.atomic_save({"key": key, "state": s}, state_path),
    )
    t_train = time.perf_counter() - t0
    size = max(pc.sizes)
    e224 = evaluate_warped(model, data.heldout, size=size, device=cfg.device)
    own = evaluate_native(model, data.heldout, pc.eval_min_side, device=cfg.device) if model.spp else None
    metrics = {
        "mode": pc.mode, "seed": pc.seed, "epochs": pc.epochs, "sizes": list(pc.sizes),
        "arch": bc.arch, "width_mult": bc.width_mult, "fc_dim": pc.fc_dim,
        "classes": list(data.train.class_names),
        "train_crops": len(data.train), "heldout_crops": len(data.heldout), "heldout_source": data.heldout_source,
        "train_counts": data.train.counts(), "heldout_counts": data.heldout.counts(),
        f"error_{size}": e224["error"], "eval_warped": e224,
        "error_own": None if own is None else own["error"], "eval_own": own,
        "history": hist, "train_seconds": t_train, "crop_seconds": data.seconds,
        "eval_seconds": time.perf_counter() - t0 - t_train,
    }
    log.info("%s: held-out top-1 error %.4f at %d, %s at own size (%d crops)", pc.mode, e224["error"], size,
             "n/a" if own is None else f"{own['error']:.4f}", len(data.heldout))
    meta = {"key": key, "metrics": metrics, "config": config_to_dict(cfg)}
    save_classifier(ckpt, classifier_state(model, arch=bc.arch, width_mult=bc.width_mult,
                                           class_names=data.train.class_names, mode=pc.mode, meta=meta))
    _write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    state_path.unlink(missing_ok=True)
    log.info("wrote %s", ckpt)
    return metrics


def _conv5_side(backbone: torch.nn.Module, side: int) -> int:
    with torch.no_grad():
        return int(backbone(torch.zeros(1, 3, side, side)).shape[-1])


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(values: list[float | None], size: int = 224) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return f"n/a (fixed grid: crops are warped to {size})"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})"


def table(results: dict[str, list[dict]], cfg: Config, command: str) -> str:
    """Markdown section shaped like the paper's Table 2."""
    size = max(cfg.pretrain.sizes)
    any_m = next(iter(results.values()))[0]
    lines = [
        SECTION[0],
        "## SPP classifier pre-training: Table 2 on digits crops",
        "",
        f"Top-1 error (%) on held-out crops ({any_m['heldout_crops']} crops: every non-difficult object of "
        f"{any_m['heldout_source']}, plus {cfg.pretrain.bg_per_image} background crops per image; background "
        f"is an extra class). `@{size}`: crops warped to {size}x{size}; `@own size`: each crop at its own pixel "
        f"size and aspect (shorter sides under {cfg.pretrain.eval_min_side} px enlarged to it), one per forward "
        f"pass. Trunk {any_m['arch']} x{any_m['width_mult']}, fc6/fc7 {any_m['fc_dim']}, "
        f"{any_m['train_crops']} training crops, {cfg.pretrain.epochs} epochs, batch {cfg.pretrain.batch_size}, "
        f"lr {cfg.pretrain.lr} cosine, init {cfg.pretrain.init}. Seeds: "
        f"{', '.join(str(m['seed']) for m in results[next(iter(results))])}. No model selection (last epoch).",
        "",
        (f"Crops: each object crop shows up to {cfg.pretrain.context}x its box (held-out crops "
         f"{(1 + cfg.pretrain.context) / 2:g}x) and the SPP rows pool only the object's own window in it "
         f"(`pretrain.pool_window`); the no-SPP row's fixed grid pools the whole crop."
         if cfg.pretrain.pool_window else
         f"Crops: each object crop is its box enlarged by up to {cfg.pretrain.context}x, pooled whole."),
        "",
        f"| | top-1 err @{size} | top-1 err @own size | epochs | seeds | train s (each) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("nospp", "single", "multi", "random"):  # the paper's row order
        if mode not in results:
            continue
        ms = results[mode]
        lines.append(
            f"| {row_names(cfg.pretrain.sizes)[mode]} | {_fmt([m[f'error_{size}'] for m in ms])} | {_fmt([m['error_own'] for m in ms], size)} "
            f"| {ms[0]['epochs']} | {', '.join(str(m['seed']) for m in ms)} "
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
    _write_text(path, text if text.endswith("\n") else text + "\n")


def _where(device: str) -> str:
    """Where the table was made, for its footer: device, CPU cores, torch version."""
    dev = torch.device(device)
    gpu = f", GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" and torch.cuda.is_available() else ""
    return f"device {dev.type}{gpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_config_args(p)
    p.add_argument("--mode", choices=MODES, help="overrides pretrain.mode")
    p.add_argument("--out", type=Path, help="output folder (default <output_dir>/pretrain)")
    p.add_argument("--all-modes", action="store_true", help="train all four modes and write the Table 2 section")
    p.add_argument("--seeds", type=int, nargs="+", help="with --all-modes: pretrain.seed values (default: the config's)")
    p.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"), help="file for the --all-modes table")
    args = p.parse_args(argv)
    cfg = C.load_cfg_or_exit(args)
    if args.mode:
        cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, mode=args.mode))
    base = args.out or Path(cfg.output_dir) / ("pretrain_modes" if args.all_modes else "pretrain")
    C.setup_logging(base, "log.txt")
    C.setup_torch(cfg)
    argv_full = sys.argv if argv is None else ["tools/train_classifier.py", *argv]
    t0 = time.perf_counter()
    if not args.all_modes:
        data = load_crops(cfg)
        log.info("crops: %d training %s, %d held-out (%.1f s)", len(data.train), data.train.counts(),
                 len(data.heldout), data.seconds)
        run_one(cfg, base, data, argv_full)
        log.info("total %.1f s", time.perf_counter() - t0)
        return 0
    results: dict[str, list[dict]] = {}
    for seed in args.seeds or [cfg.pretrain.seed]:
        cfg_s = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, seed=seed))
        data = load_crops(cfg_s)
        for mode in ("multi", "single", "nospp", "random"):  # the default (multi) first
            cfg_m = dataclasses.replace(cfg_s, pretrain=dataclasses.replace(cfg_s.pretrain, mode=mode))
            results.setdefault(mode, []).append(run_one(cfg_m, base / f"{mode}-s{seed}", data, argv_full))
            section = table(results, cfg, " ".join(["python", *argv_full]))
            if str(args.benchmarks):  # after every run: an interrupted table still shows what finished
                write_section(args.benchmarks, section)
    print(section)
    if str(args.benchmarks):
        log.info("wrote the classifier section of %s", args.benchmarks)
    log.info("total %.1f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
