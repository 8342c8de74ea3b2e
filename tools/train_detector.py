"""Train an SPP-net detector on a VOC-layout data set from a YAML config.

    python tools/train_detector.py --config configs/digits_zf5.yaml [--set key=value ...]

Stages, each skipped when its output is valid for the current configuration and resumed after an
interruption: proposals -> (classifier pre-training) -> conv5 cache -> fine-tuning of fc6/fc7 ->
feature statistics -> SVMs with hard-negative mining -> box regressors -> model.pt.
Everything is written under ``output_dir``; the resolved config is saved next to it.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

import _common as C
from detector.backbones import TrunkPrefix, build_backbone
from detector.cache import Conv5Cache, weights_hash
from detector.config import save_config
from detector.detector import SPPDetector
from detector.head import FCHead
from detector.regions import Conv5Pyramid, ProjectionParams
from detector.spp import spp_out_dim
from detector.training import (
    TrainItem, feature_norm_scales, finetune_head, finetune_head_and_tail, make_items, train_box_regressors, train_svms,
)

log = logging.getLogger("train_detector")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_config_args(p)
    p.add_argument("--stop-after", choices=["proposals", "pretrain", "cache", "finetune", "svm", "bbox"],
                   help="stop after this stage (its output is kept)")
    args = p.parse_args(argv)
    cfg = C.load_cfg_or_exit(args)
    if cfg.test.score not in SPPDetector.SCORES:  # checked before hours of training, not after
        sys.exit(f"config error: test.score must be one of {SPPDetector.SCORES}, got {cfg.test.score!r}")
    if not cfg.test.target_side >= 0:
        sys.exit(f"config error: test.target_side must be >= 0 px (0 = features.target_side), got {cfg.test.target_side!r}")
    out = Path(cfg.output_dir)
    C.setup_logging(out, "train_log.txt")
    C.setup_torch(cfg)
    save_config(cfg, out, sys.argv)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage_done(name: str, t0: float) -> bool:
        timings[name] = time.perf_counter() - t0
        log.info("stage %s: %.1f s", name, timings[name])
        return args.stop_after == name

    # ---------------------------------------------------------------- data
    dc = cfg.data
    train_recs, ft_recs, val_recs, class_names = C.training_records(cfg)
    K = len(class_names)
    log.info("%d classes; %d training images (%d for fine-tuning, %d held out for validation)",
             K, len(train_recs), len(ft_recs), len(val_recs))
    all_recs = C.records_with_proposals(train_recs, val_recs)

    # ---------------------------------------------------------------- proposals
    t0 = time.perf_counter()
    props = C.split_proposals(cfg, dc.train_split, [(r.image_id, r.path) for r in all_recs.values()], out,
                              cfg.proposals.train_file)
    n_props = [len(props[i]) for i in all_recs]
    log.info("proposals: %.0f per image on average", sum(n_props) / max(1, len(n_props)))
    if stage_done("proposals", t0):
        return 0

    # ---------------------------------------------------------------- backbone (+ pre-training)
    t0 = time.perf_counter()
    bc = cfg.backbone
    weights = bc.weights
    if cfg.pretrain.enabled and weights == "none":
        pre_dir = out / "pretrain"
        cmd = [sys.executable, str(Path(__file__).with_name("train_classifier.py")), "--config",
               str(out / "resolved_config.yaml"), "--out", str(pre_dir)]
        log.info("pre-training the backbone as a multi-size SPP classifier: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        weights = str(pre_dir / "classifier.pt")
    backbone = build_backbone(bc.arch, width_mult=bc.width_mult, weights=weights).eval()
    proj = ProjectionParams.of(backbone, cfg.features.target_side)
    if stage_done("pretrain", t0):
        return 0

    # ---------------------------------------------------------------- conv5 cache
    t0 = time.perf_counter()
    fc = cfg.features
    ftc = cfg.finetune
    n_tail = ftc.conv_layers
    if not (isinstance(n_tail, int) and 0 <= n_tail <= backbone.tail_units):
        sys.exit(f"config error: finetune.conv_layers must be in 0..{backbone.tail_units} for backbone "
                 f"'{bc.arch}', got {n_tail!r}")
    cache_dir = Path(fc.cache_dir) if fc.cache_dir else out / "conv5_cache"
    # with conv fine-tuning the cache holds the maps before the tuned units (the tail runs on them)
    cache = Conv5Cache(cache_dir, key={"prefix_of_tail": n_tail} if n_tail else None,
                       backbone=TrunkPrefix(backbone, n_tail) if n_tail else backbone,
                       scales=fc.train_scales, max_size=fc.max_size, device=cfg.device)
    ft_items = make_items(ft_recs, props, flips=dc.use_flipped)
    val_items = make_items(val_recs, props, flips=False)
    svm_items = make_items(train_recs, props, flips=False)
    needed = {(it.record.image_id, it.flipped): it.record.path for it in ft_items + val_items + svm_items}
    cache.build([(i, f, pth) for (i, f), pth in needed.items()], progress=True)
    log.info("conv5 cache: %d entries, %.1f MB on disk (%s)", len(needed), cache.disk_bytes() / 2**20, cache_dir)
    if stage_done("cache", t0):
        return 0

    def load_cached(item: TrainItem) -> Conv5Pyramid:
        fmaps, sizes = cache.get(item.record.image_id, item.flipped)
        return Conv5Pyramid(fmaps=fmaps, scaled_sizes=sizes, image_size=(item.record.height, item.record.width))

    def load_pyramid(item: TrainItem) -> Conv5Pyramid:
        """conv5 maps of a training item: cached, or the (tuned) tail run on the cached prefix."""
        pyr = load_cached(item)
        if n_tail:
            with torch.inference_mode():
                pyr.fmaps = [backbone.forward_tail(f.to(cfg.device).float().unsqueeze(0), n_tail)[0]
                             for f in pyr.fmaps]  # (C, Hs, Ws) each
        return pyr

    # ---------------------------------------------------------------- fine-tuning
    t0 = time.perf_counter()
    D = spp_out_dim(backbone.out_channels, fc.levels)
    base_key = C.digest(cache.key, class_names, [r.image_id for r in train_recs], n_props, fc.levels,
                        fc.target_side)
    ft_key = C.digest(base_key, ftc, cfg.head, [r.image_id for r in val_recs], dc.use_flipped)
    ft_path = out / "finetune" / "head.pt"
    done = C.load_if_valid(ft_path, ft_key)
    if done is None:
        head = FCHead(D, fc_dim=cfg.head.fc_dim, num_classes=K, dropout=cfg.head.dropout)
        if cfg.pretrain.enabled and bc.weights == "none":
            _init_fc_from_classifier(head, Path(weights), class_names)
        state_path = out / "finetune" / "resume.pt"
        resume = C.load_if_valid(state_path, ft_key)
        if n_tail:
            log.info("fine-tuning the last %d conv unit(s) of the trunk with fc6/fc7 (finetune.conv_layers)",
                     n_tail)
            head, hist = finetune_head_and_tail(
                head, backbone, n_tail, ft_items, val_items, load_cached, fc.levels, proj, K,
                iters=ftc.iters, lr=ftc.lr, lr_steps=ftc.lr_steps, tail_lr_mult=ftc.conv_lr_mult,
                momentum=ftc.momentum, weight_decay=ftc.weight_decay, batch_size=ftc.batch_size,
                images_per_batch=ftc.images_per_batch, fg_fraction=ftc.fg_fraction, fg_iou=ftc.fg_iou,
                bg_low=ftc.bg_iou_low, bg_high=ftc.bg_iou_high, random_scale=ftc.random_scale,
                val_every=ftc.val_every, val_batches=ftc.val_batches, seed=ftc.seed,
                resume_state=None if resume is None else resume["state"],
                save_state=lambda st: C.atomic_save({"key": ft_key, "state": st}, state_path),
                device=cfg.device,
            )
        else:
            head, hist = finetune_head(
                head, ft_items, val_items, load_pyramid, fc.levels, proj, K,
                iters=ftc.iters, lr=ftc.lr, lr_steps=ftc.lr_steps, momentum=ftc.momentum,
                weight_decay=ftc.weight_decay, batch_size=ftc.batch_size, fg_fraction=ftc.fg_fraction,
                fg_iou=ftc.fg_iou, bg_low=ftc.bg_iou_low, bg_high=ftc.bg_iou_high, random_scale=ftc.random_scale,
                val_every=ftc.val_every, val_batches=ftc.val_batches, chunk_iters=ftc.chunk_iters,
                chunk_images=ftc.chunk_images, seed=ftc.seed,
                resume_state=None if resume is None else resume["state"],
                save_state=lambda st: C.atomic_save({"key": ft_key, "state": st}, state_path),
                device=cfg.device,
            )
        tail_state = torch.nn.ModuleList(backbone.tail_modules(n_tail)).state_dict() if n_tail else None
        C.atomic_save({"key": ft_key, "head": head.state_dict(), "tail": tail_state, "history": hist}, ft_path)
        state_path.unlink(missing_ok=True)
        done = C.load_if_valid(ft_path, ft_key)
        log.info("fine-tuning: best validation error %s at iteration %s", hist.get("best_val_error"),
                 hist.get("best_iter"))
    head = FCHead(D, fc_dim=cfg.head.fc_dim, num_classes=K, dropout=cfg.head.dropout)
    head.load_state_dict(done["head"])
    head.eval()
    if n_tail:  # the tuned conv units replace the pre-trained ones (model.pt saves them)
        torch.nn.ModuleList(backbone.tail_modules(n_tail)).load_state_dict(done["tail"])
    if stage_done("finetune", t0):
        return 0

    # ---------------------------------------------------------------- feature statistics + SVMs
    t0 = time.perf_counter()
    sc = cfg.svm
    svm_items_used = svm_items[: sc.max_images] if sc.max_images else svm_items
    svm_key = C.digest(ft_key, sc)
    svm_path = out / "svm" / "svm.pt"
    done_svm = C.load_if_valid(svm_path, svm_key)
    if done_svm is None:
        fscale, pscale = feature_norm_scales(head, svm_items_used, load_pyramid, fc.levels, proj,
                                             target_norm=sc.feature_norm, max_images=sc.stats_images,
                                             max_rois=sc.stats_rois, seed=cfg.seed, device=cfg.device)
        log.info("feature scales: fc7 x%.4f, pool5 x%.4f (mean norm -> %.0f)", fscale, pscale, sc.feature_norm)
        W, b, stats = train_svms(head, svm_items_used, load_pyramid, fc.levels, proj, K, fscale, C=sc.C,
                                 pos_weight=sc.pos_weight, bias=sc.bias, neg_iou=sc.neg_iou,
                                 hard_thresh=sc.hard_thresh, evict_thresh=sc.evict_thresh,
                                 retrain_every=sc.retrain_every, max_hard_per_image=sc.max_hard_per_image,
                                 class_names=class_names, device=cfg.device)
        C.atomic_save({"key": svm_key, "W": W, "b": b, "feature_scale": fscale, "pool_scale": pscale,
                       "stats": stats}, svm_path)
        done_svm = C.load_if_valid(svm_path, svm_key)
    if stage_done("svm", t0):
        return 0

    # ---------------------------------------------------------------- box regression
    t0 = time.perf_counter()
    br = cfg.bbox_reg
    bbox_weight = None
    if br.enabled:
        bb_key = C.digest(svm_key, br)
        bb_path = out / "bbox" / "bbox.pt"
        done_bb = C.load_if_valid(bb_path, bb_key)
        if done_bb is None:
            w = train_box_regressors(svm_items_used, load_pyramid, fc.levels, proj, K, done_svm["pool_scale"],
                                     lam=br.lam, min_iou=br.min_iou, whiten_eps=br.whiten_eps,
                                     max_per_class=br.max_per_class, seed=cfg.seed)
            C.atomic_save({"key": bb_key, "weight": w}, bb_path)
            done_bb = C.load_if_valid(bb_path, bb_key)
        bbox_weight = done_bb["weight"]
    if stage_done("bbox", t0):
        return 0

    # ---------------------------------------------------------------- model.pt
    det = SPPDetector(
        backbone=backbone, head=head, svm_weight=done_svm["W"], svm_bias=done_svm["b"],
        feature_scale=done_svm["feature_scale"], bbox_weight=bbox_weight, pool_scale=done_svm["pool_scale"],
        class_names=class_names, scales=fc.test_scales, levels=fc.levels, max_size=fc.max_size,
        target_side=fc.target_side,
        nms=cfg.test.nms, max_per_class=cfg.test.max_per_class, score_thresh=cfg.test.score_thresh,
        score=cfg.test.score,
        svd_rank=cfg.test.svd_rank, proposal_options=C.proposal_options(cfg), arch=bc.arch, width_mult=bc.width_mult,
        meta={"config": C.config_to_dict(cfg), "stage_seconds": timings},
    )
    path = det.save(out / "model.pt")
    total = time.perf_counter() - t_start
    (out / "train_timings.json").write_text(json.dumps({**timings, "total": total}, indent=1))
    log.info("wrote %s (training took %.1f s this run; stage seconds %s)", path, total,
             {k: round(v, 1) for k, v in timings.items()})
    print(f"checkpoint: {path}")
    return 0


def _init_fc_from_classifier(head: FCHead, ckpt: Path, class_names: tuple[str, ...]) -> None:
    """Start fc6/fc7 from the pre-trained classifier when their shapes match (spec §6: fc6/fc7 are
    copied from the pre-trained net). Its (K+1)-way classifier is copied too when it was trained on
    the same classes (crops of the same training split); otherwise that layer starts afresh."""
    st = torch.load(ckpt, map_location="cpu", weights_only=True)
    fc = st.get("fc", {}) if isinstance(st, dict) else {}
    own = head.state_dict()
    prefixes = ("fc6", "fc7") + (("cls_score",) if tuple(st.get("class_names", ())) == tuple(class_names) else ())
    copied = [k for k, v in fc.items() if k in own and own[k].shape == v.shape and k.startswith(prefixes)]
    own.update({k: fc[k] for k in copied})
    head.load_state_dict(own)
    log.info("fc layers initialised from %s: %s", ckpt, ", ".join(copied) if copied else "none matched (random init)")


if __name__ == "__main__":
    sys.exit(main())
