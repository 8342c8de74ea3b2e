"""Test a trained SPP-net detector on a VOC-layout split: VOC mAP, COCO figures, timing.

    python tools/test_net.py --config configs/digits_zf5.yaml [--checkpoint runs/.../model.pt]
        [--split test | --held-out] [--set key=value ...] [--compare-rcnn N]

Test-time windows come only from the proposal method run on each image (never from the
annotations). Writes comp4 result files, eval.json, pr_curves.png and timing.json under
``<output_dir>/test_<split>/``, prints the timing table, the per-class table, the COCO figures
and, last, the line ``mAP: 0.xxxxxx``.

``--held-out`` scores the training images that ``train_detector.py`` held out from fine-tuning
(``data.val_split``, or ``data.val_fraction`` of ``data.train_split`` with ``seed``), with the
training run's cached proposals, under ``<output_dir>/test_heldout/``: the place to choose test
settings (``test.*``, ``features.test_scales``) by ``--set`` without looking at the test split.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import _common as C
from detector.config import save_config
from detector.detector import STAGES, CheckpointError, build_detector
from detector.eval import coco_evaluate, evaluate, plot_pr_curves, write_comp4
from detector.data.voc import load_voc_split
from proposals import selective_search
from proposals.imageio import ImageError, read_image

log = logging.getLogger("test_net")


def timing_table(per_image: dict[str, list[float]]) -> str:
    lines = [f"{'stage':<10} {'median s':>9} {'min s':>8} {'max s':>8}", "-" * 38]
    for k, v in per_image.items():
        if v:
            lines.append(f"{k:<10} {statistics.median(v):>9.4f} {min(v):>8.4f} {max(v):>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_config_args(p)
    p.add_argument("--checkpoint", help="model.pt (default: <output_dir>/model.pt)")
    p.add_argument("--split", help="split to score (default: data.test_split)")
    p.add_argument("--held-out", action="store_true",
                   help="score the training images held out from fine-tuning (validation), not a split")
    p.add_argument("--metric", choices=["07", "area"], default="07", help="VOC07 11-point (default) or area AP")
    p.add_argument("--time-proposals", type=int, default=10,
                   help="run selective search live on this many images to time it (the boxes used for "
                        "scoring are the cached ones, made by the same deterministic function)")
    p.add_argument("--compare-rcnn", type=int, default=0, metavar="N",
                   help="also time R-CNN mode against SPP-net on N test images (1 and 5 scales)")
    p.add_argument("--mode", choices=["spp", "rcnn"], default="spp",
                   help="rcnn: score every window by warping it to 227x227 (spec §10), same model")
    args = p.parse_args(argv)
    cfg = C.load_cfg_or_exit(args)
    if args.held_out and args.split:
        p.error("--held-out scores the held-out training images; it takes no --split")
    split = "heldout" if args.held_out else (args.split or cfg.data.test_split)
    out = Path(cfg.output_dir) / (f"test_{split}" + ("_rcnn" if args.mode == "rcnn" else ""))
    C.setup_logging(out, "test_log.txt")
    C.setup_torch(cfg)
    save_config(cfg, out, sys.argv)
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(cfg.output_dir) / "model.pt"
    try:
        det = build_detector(cfg, ckpt)
    except CheckpointError as e:
        sys.exit(f"error: {e}")

    if args.held_out:
        train_recs, _, records, class_names = C.training_records(cfg, raw_boxes=True,
                                                                 class_names=det.class_names)
        if not records:
            sys.exit("error: --held-out: no images are held out (set data.val_split or data.val_fraction > 0)")
        log.info("scoring the %d training images held out from fine-tuning (%s)", len(records),
                 f"data.val_split '{cfg.data.val_split}'" if cfg.data.val_split else
                 f"{cfg.data.val_fraction:.0%} of '{cfg.data.train_split}', seed {cfg.seed}")
        # the training run's proposals (same image list, so the same cache key); when that cache is
        # not here, only the held-out images' proposals are computed
        everything = [(r.image_id, r.path) for r in C.records_with_proposals(train_recs, records).values()]
        trained = C.proposal_cache_path(cfg, cfg.data.train_split, everything, Path(cfg.output_dir))
        if cfg.proposals.method == "file" or trained.is_file():
            props = C.split_proposals(cfg, cfg.data.train_split, everything, Path(cfg.output_dir),
                                      cfg.proposals.train_file)
        else:
            props = C.split_proposals(cfg, f"{cfg.data.train_split}-heldout",
                                      [(r.image_id, r.path) for r in records], Path(cfg.output_dir))
    else:
        records, class_names = load_voc_split(cfg.data.root, split, det.class_names, raw_boxes=True)
        if cfg.data.max_test_images and len(records) > cfg.data.max_test_images:
            log.warning("scoring only the first %d of %d %s images (data.max_test_images)",
                        cfg.data.max_test_images, len(records), split)
            records = records[: cfg.data.max_test_images]
        props = C.split_proposals(cfg, split, [(r.image_id, r.path) for r in records], Path(cfg.output_dir),
                                  cfg.proposals.test_file)

    # ---------------------------------------------------------------- detection
    stage_times: dict[str, list[float]] = {k: [] for k in STAGES}
    stage_times["total"] = []
    detections: dict[str, dict[str, torch.Tensor]] = {}
    n_props = []
    if args.mode == "rcnn":
        from detector.rcnn import detect_rcnn
    for i, rec in enumerate(tqdm(records, desc=f"detect {split}", unit="img")):
        try:
            image = read_image(rec.path)
        except ImageError as e:
            log.error("%s; scored with no detections", e)
            detections[rec.image_id] = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
                                        "labels": torch.zeros(0, dtype=torch.int64)}
            continue
        if i < args.time_proposals and cfg.proposals.method == "selective_search":
            t0 = time.perf_counter()
            selective_search(image, **C.proposal_options(cfg))
            stage_times["proposals"].append(time.perf_counter() - t0)
        boxes = props[rec.image_id]
        n_props.append(len(boxes))
        t0 = time.perf_counter()
        if args.mode == "rcnn":
            dets, timings = detect_rcnn(det, image, boxes)
        else:
            dets = det.detect(image, proposals=boxes)
            timings = det.last_timings
        stage_times["total"].append(time.perf_counter() - t0)
        for k, v in timings.items():
            if k != "proposals":
                stage_times.setdefault(k, []).append(v)
        detections[rec.image_id] = dets
    peak = C.peak_memory_mb()

    # ---------------------------------------------------------------- outputs
    write_comp4(out / "results", split, class_names, detections)
    result = evaluate(records, class_names, detections, metric=args.metric)
    coco = coco_evaluate(records, class_names, detections, out_dir=out)
    plot_pr_curves(result, out / "pr_curves.png")
    timing = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
              for k, v in stage_times.items() if v}
    report = {"split": split, "images": len(records), "mode": args.mode, "scales": list(det.scales),
              "mean_proposals": float(np.mean(n_props)) if n_props else 0.0, "peak_memory_mb": peak,
              "timing_s_per_image": timing, "coco": coco, **result.to_dict()}
    (out / "eval.json").write_text(json.dumps(report, indent=1))

    if args.compare_rcnn:
        from detector.bench.rcnn_compare import compare_rcnn, format_comparison
        n = min(args.compare_rcnn, len(records))
        imgs = [read_image(r.path) for r in records[:n]]
        cmp = compare_rcnn(det, imgs, [torch.as_tensor(props[r.image_id]) for r in records[:n]])
        (out / "compare_rcnn.json").write_text(json.dumps(cmp, indent=1, default=str))
        print(format_comparison(cmp))
        print()

    print(f"{len(records)} {split} images, {report['mean_proposals']:.0f} proposals per image, "
          f"scales {list(det.scales)}, mode {args.mode}, peak memory {peak:.0f} MiB")
    print("seconds per image (proposals timed on the first %d images; total excludes proposals):"
          % len(stage_times["proposals"]))
    print(timing_table(stage_times))
    print()
    print(result.table())
    print(f"COCO (pycocotools): AP {coco['AP']:.4f}  AP50 {coco['AP50']:.4f}  AP75 {coco['AP75']:.4f}")
    print(f"outputs: {out}")
    print(f"mAP: {result.mAP:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
