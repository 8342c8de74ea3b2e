"""Benchmark sections of tools/benchmark.py beyond ``spp`` (:mod:`detector.bench.spp`): R-CNN mode,
detection vs torchvision detectors, selective search, memory, ``detect_batch`` vs the per-image
loop, and the same figures on a GPU. Each
section function returns ``(markdown, ratios)`` where ``ratios`` maps machine-readable names to
numbers (printed as ``name: value`` lines).

Shape shorthand: R proposals in one image, C conv5 channels, Hs x Ws conv5 size at scale s.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from detector.bench import inputs as TI
from detector.bench.random_model import random_detector
from detector.bench.rcnn_compare import compare_rcnn, format_comparison
from detector.regions import pool_regions

FIVE_SCALES = (480, 576, 688, 864, 1200)


def _stats(v: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _inputs(n_images: int, n_props: int, seed: int = 0) -> tuple[list[tuple[str, np.ndarray]], list[torch.Tensor], list[int]]:
    photos = TI.voc_sized_photos(n_images)
    props, n_ss = [], []
    for i, (_, im) in enumerate(photos):
        b, k = TI.proposals_for(im, n_props, "fast+", seed=seed + i)  # the project default mode
        props.append(b)
        n_ss.append(k)
    return photos, props, n_ss


# ---------------------------------------------------------------------------------------------- rcnn


def section_rcnn(n_images: int = 2, n_props: int = 2000, width_mult: float = 1.0,
                 svd_ranks: Sequence[int] = (512,)) -> tuple[str, dict[str, float]]:
    """SPP-net (1 and 5 scales) vs R-CNN mode with one random ZF-5 (spec §10-11); fc6/fc7 also timed
    compressed to ``svd_ranks`` in both modes (on a CPU the dense 4096-wide fc6/fc7 costs more than
    SPP-net's conv)."""
    det = random_detector(width_mult=width_mult, fc_dim=4096, seed=0)
    photos, props, n_ss = _inputs(n_images, n_props)
    cmp = compare_rcnn(det, [im for _, im in photos], props, scale_sets=((688,), FIVE_SCALES), progress=True,
                       svd_ranks=svd_ranks)
    ratios = {}
    for lab, sp in cmp["speedup"].items():
        key = lab.split(" ")[0].replace("-", "_")
        ratios[f"rcnn_conv_speedup_{key}"] = sp["conv"]
        ratios[f"rcnn_overall_speedup_{key}"] = sp["overall"]
        for r, sv in cmp["svd"].items():
            ratios[f"rcnn_overall_speedup_svd{r}_{key}"] = sv["speedup"][lab]["overall"]
    md = (f"Random full-width ZF-5 (width {width_mult}) with fc6/fc7 4096 and 20 random SVMs (timing does not "
          f"depend on weights); {n_images} real photos resized to 500x375 ({', '.join(n for n, _ in photos)}); "
          f"{n_props} proposals per image (selective search 'fast+' gave {n_ss}, padded with random boxes). "
          f"Paper targets (same ZF-5 on a 2014 GPU): conv 270x / 49x, overall 102x / 38x.\n\n"
          + format_comparison(cmp))
    return md, ratios


# ---------------------------------------------------------------------------------------------- detect


def _sync(dev: torch.device | None) -> None:
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn: Callable[[], Any], reps: int, dev: torch.device | None = None) -> list[float]:
    """Wall seconds of ``reps`` calls; on CUDA synchronised before and after each call."""
    out = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def _calibrated_svms(det: Any, pooled: torch.Tensor, fraction: float) -> torch.nn.Module:
    """A copy of ``det``'s SVMs whose biases are shifted so that ``fraction`` of ``pooled``'s windows
    score above the detector's threshold in every class (a trained model's share; a random model's
    near-zero scores all pass it, the worst case for NMS and box regression)."""
    import copy

    sc = det.svm_scores(det.fc_features(pooled))  # (R, K)
    q = torch.quantile(sc.double(), 1.0 - fraction, dim=0).float()  # (K,)
    svms = copy.deepcopy(det.svms)
    svms.bias = svms.bias + (det.params.score_thresh - q)
    return svms


@torch.inference_mode()
def section_detect(n_images: int = 3, n_props: int = 2000, svd_ranks: Sequence[int] = (1024, 512, 256),
                   int8_svd_ranks: Sequence[int] = (512, 256),
                   light_trunks: Sequence[str] = ("resnet18", "mobilenet_v3"), ab_rounds: int = 5,
                   pass_fraction: float = 0.10) -> tuple[str, dict[str, float]]:
    """SPP-net detection per image (1 scale 688, proposals excluded) with its stage breakdown, for
    each fc option (dense, SVD ranks, int8 alone and after the SVD), the bfloat16 trunk (dense, and
    with the fastest fc option, whose stage breakdown is given too) and the light trunks (random
    weights, with the fastest fc option), vs torchvision Faster R-CNN
    models with random weights on the same images; and the fraction of windows that share their
    conv5 cells with an earlier window (scored once).

    The headline ratio is an A/B: the fastest option, the same model with its SVM biases shifted so
    that ``pass_fraction`` of the (window, class) pairs pass the score threshold (as trained models
    do, instead of the random model's all), and ``fasterrcnn_mobilenet_v3_large_fpn``, alternating
    image by image for ``ab_rounds`` rounds, so that the machine's drift hits all three alike."""
    import torchvision

    from detector.fc_precision import lower_fc_precision
    from detector.head import LowRankLinear

    photos, props, n_ss = _inputs(n_images, n_props)
    det = random_detector(width_mult=1.0, fc_dim=4096, seed=0)
    rows: list[tuple[str, dict[str, float]]] = []
    stages: dict[str, dict[str, list[float]]] = {}  # option tag -> stage -> seconds per image

    def run_spp(d, tag: str) -> list[float]:
        d.detect(photos[0][1], proposals=props[0])  # warm-up
        times = []
        for (_, im), b in zip(photos, props):
            t0 = time.perf_counter()
            d.detect(im, proposals=b)
            times.append(time.perf_counter() - t0)
            for k, v in d.last_timings.items():
                stages.setdefault(tag, {}).setdefault(k, []).append(v)
        return times

    def option(rank: int, int8: bool, arch: str = "zf5", bf16: bool = False):
        if not rank and not int8 and arch == "zf5" and not bf16:
            return det
        d = random_detector(width_mult=1.0, fc_dim=4096, seed=0, arch=arch)
        if rank:
            # timing does not depend on the weights: random rank-r factors of the shapes compress_svd
            # makes (a float64 SVD of the 4096x12800 fc6 would take about a minute per rank on 2 cores)
            d.head.fc6 = LowRankLinear(d.head.in_dim, d.head.fc_dim, rank).eval()
            d.head.fc7 = LowRankLinear(d.head.fc_dim, d.head.fc_dim, rank).eval()
        if int8:
            d.head = lower_fc_precision(d.head, "int8")
        if bf16:
            d.lower_conv("bfloat16")  # float32 with a warning where bfloat16 is not native
        return d

    ratios: dict[str, float] = {}
    fast = int8_svd_ranks[-1]
    options = ([(0, False, "zf5", False)] + [(r, False, "zf5", False) for r in svd_ranks] + [(0, True, "zf5", False)]
               + [(r, True, "zf5", False) for r in int8_svd_ranks]
               + [(0, False, "zf5", True), (fast, True, "zf5", True)]
               + [(fast, True, a, False) for a in light_trunks])
    trunk_names = {"zf5": "ZF-5", "resnet18": "ResNet-18 C4 trunk", "mobilenet_v3": "MobileNetV3-Large trunk"}
    conv_runs = {}
    best = f"svd{fast}_int8_bf16conv"
    fastest = None
    for rank, int8, arch, bf16 in options:
        d = option(rank, int8, arch, bf16)
        tag = "_".join(([] if arch == "zf5" else [arch]) + ([f"svd{rank}"] if rank else [])
                       + (["int8"] if int8 else []) + (["bf16conv"] if bf16 else [])) or "dense"
        if tag == best:
            fastest = d
        s = _stats(run_spp(d, tag))
        what = " + ".join(([f"SVD rank {rank}"] if rank else []) + (["int8"] if int8 else [])) or "dense float32"
        trunk = trunk_names[arch] + (f", trunk {d.conv_precision}" if bf16 else "")
        rows.append((f"SPP-net {trunk}, 1 scale (688), fc6/fc7 4096 {what}", s))
        ratios[f"detect_spp_{tag}_s_per_image"] = s["median"]
        conv_runs[tag] = d.conv_precision
    ratios["detect_spp_s_per_image"] = ratios["detect_spp_dense_s_per_image"]
    spp = rows[0][1]
    # windows scored once: all proposals, and the selective-search ones alone (the rest are random
    # padding, which rarely shares cells)
    shared = []
    for (_, im), b, k in zip(photos, props, n_ss):
        for boxes in (b, b[:k]):
            det.detect(im, proposals=boxes)
            shared.append(1.0 - det.last_counts["distinct"] / max(det.last_counts["windows"], 1))
    ratios["detect_shared_window_fraction"] = statistics.mean(shared[0::2])
    ratios["detect_shared_window_fraction_ss_only"] = statistics.mean(shared[1::2])
    # per-class NMS + top-k of one image's candidates (every window x class above -1.5: the random
    # SVMs pass them all, the worst case): the project's path vs torchvision's batched_nms
    from torchvision.ops import batched_nms

    from detector.postprocess import nms_per_label, nms_top_per_label, topk_per_class

    sc = det.svm_scores(det.fc_features(pool_regions(det.compute_pyramid(photos[0][1]), props[0], det.levels,
                                                     det.proj)))  # (R, K)
    win, lab = torch.nonzero(sc > det.params.score_thresh, as_tuple=True)
    cb, cs = props[0][win].float(), sc[win, lab].float()
    kpc = det.params.max_per_class

    def nms_topk(keep_fn):  # keep_fn(boxes, scores, labels, iou) -> kept indices by score
        def run(b, s_):
            kp = keep_fn(b, s_, lab, det.params.nms)
            return kp[topk_per_class(lab[kp], kpc)]
        return run

    nms_impls = (
        (f"best {8 * kpc} candidates per class first, then wider (`nms_top_per_label`, the project's)",
         nms_topk(lambda b, s_, l, t: nms_top_per_label(b, s_, l, t, kpc))),
        ("all candidates, per-class slices (`nms_per_label`)", nms_topk(nms_per_label)),
        ("all candidates, `torchvision.ops.batched_nms`", nms_topk(batched_nms)),
    )
    nms_rows = []
    for name, fn in nms_impls:
        fn(cb, cs)  # warm-up
        nms_rows.append((name, _stats(_time(lambda: fn(cb, cs), 9))))
    # windows that project onto the same conv5 cells get equal scores, and torchvision's kernel orders
    # ties unstably: the results are compared on the scores' ranks (ties broken by index)
    ranks = torch.empty_like(cs)
    ranks[torch.argsort(cs, stable=True)] = torch.arange(cs.shape[0], dtype=cs.dtype)
    outs = [fn(cb, ranks).tolist() for _, fn in nms_impls]
    same = all(o == outs[0] for o in outs)
    n_tied = int(cs.shape[0] - torch.unique(torch.stack([cs, lab.to(cs.dtype)], 1), dim=0).shape[0])
    ratios["nms_batched_over_project"] = nms_rows[2][1]["median"] / nms_rows[0][1]["median"]
    ims = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for _, im in photos]  # (3, H, W) each
    peers = {}
    for name in ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn"):
        torch.manual_seed(0)
        model = peers[name] = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None).eval()
        model([ims[0]])  # warm-up
        times = [t for im in ims for t in _time(lambda: model([im]), 1)]
        s = _stats(times)
        rows.append((f"torchvision {name} (random weights, default transform: min_size 800)", s))
        ratios[f"detect_{name}_over_spp"] = s["median"] / spp["median"]
    # the headline A/B: fastest option (all pairs pass / a trained model's share) against the peer;
    # the two arms are the same model with its SVMs swapped
    svms = {"all": fastest.svms,
            "calibrated": _calibrated_svms(fastest, pool_regions(fastest.compute_pyramid(photos[0][1]), props[0],
                                                                 fastest.levels, fastest.proj), pass_fraction)}

    def spp_arm(arm: str, im, b):
        def run():
            fastest.svms = svms[arm]
            fastest.detect(im, proposals=b)
        return run

    spp_arm("calibrated", photos[0][1], props[0])()  # warm-up
    peer = peers["fasterrcnn_mobilenet_v3_large_fpn"]
    ab: dict[str, list[float]] = {"all": [], "calibrated": [], "peer": []}
    ab_stages: dict[str, list[float]] = {}
    turn = 0
    for _ in range(ab_rounds):
        for (_, im), b, t in zip(photos, props, ims):
            runs = [("all", spp_arm("all", im, b)), ("calibrated", spp_arm("calibrated", im, b)),
                    ("peer", lambda: peer([t]))]
            turn += 1
            for k, fn in runs[turn % 3:] + runs[:turn % 3]:  # each model goes first, second and third in turn
                ab[k] += _time(fn, 1)
                if k == "calibrated":
                    for st, v in fastest.last_timings.items():
                        ab_stages.setdefault(st, []).append(v)
    fastest.svms = svms["calibrated"]
    passed = [float((fastest.svm_scores(fastest.fc_features(pool_regions(fastest.compute_pyramid(im), b, fastest.levels,
                                                                         fastest.proj))) > fastest.params.score_thresh)
                     .float().mean()) for (_, im), b in zip(photos, props)]
    fastest.svms = svms["all"]
    ab_s = {k: _stats(v) for k, v in ab.items()}
    ratios["detect_ab_peer_over_fastest"] = ab_s["peer"]["median"] / ab_s["all"]["median"]
    ratios["detect_ab_peer_over_fastest_calibrated"] = ab_s["peer"]["median"] / ab_s["calibrated"]["median"]
    ratios["detect_ab_fastest_s_per_image"] = ab_s["all"]["median"]
    ratios["detect_ab_fastest_calibrated_s_per_image"] = ab_s["calibrated"]["median"]
    ratios["detect_ab_peer_s_per_image"] = ab_s["peer"]["median"]
    lines = ["| model | seconds per image, median [min-max] |", "|---|---|"]
    lines += [f"| {n} | {_fmt(s)} |" for n, s in rows]
    lines += ["", f"Headline A/B, the fastest option against the peer, alternating image by image (the order of the "
              f"three rotating) for {ab_rounds} rounds ({len(ab['peer'])} images each), seconds per image:", "",
              "| model | seconds per image, median [min-max] | peer / model |", "|---|---|---|",
              f"| SPP-net, trunk {conv_runs[best]}, SVD rank {fast} + int8, random SVMs (every window-class pair "
              f"passes the score threshold: the worst case for NMS and box regression) | {_fmt(ab_s['all'])} | "
              f"{ratios['detect_ab_peer_over_fastest']:.2f}x |",
              f"| the same, SVM biases shifted so that {100 * pass_fraction:.0f}% of the pairs pass (measured here: "
              f"{100 * statistics.mean(passed):.1f}%; trained models: digits 11%, BCCD 6%) | {_fmt(ab_s['calibrated'])} | "
              f"{ratios['detect_ab_peer_over_fastest_calibrated']:.2f}x |",
              f"| torchvision fasterrcnn_mobilenet_v3_large_fpn (random weights, min_size 800) | {_fmt(ab_s['peer'])} | 1.00x |",
              "", "Stages of the calibrated row, median seconds per image: "
              + ", ".join(f"{k} {statistics.median(v):.4f}" for k, v in ab_stages.items() if k != "proposals") + "."]
    lines += ["", f"SPP-net stage breakdown (full-width ZF-5, 688), seconds per image: dense float32, and SVD rank "
              f"{fast} + int8 fc with the trunk at {conv_runs[best]}:", "",
              "| stage | dense float32, median [min-max] | fastest option, median [min-max] |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(_stats(v), 4)} | {_fmt(_stats(stages[best][k]), 4)} |"
              for k, v in stages["dense"].items() if k != "proposals"]
    lines += ["", f"Per-class NMS and top {kpc} of the first image's {cb.shape[0]} (window, class) candidates "
              f"({det.num_classes} classes, IoU {det.params.nms}; {n_tied} candidates tie with another of their class), "
              f"9 calls each; same detections in the same order with ties broken by index: "
              f"{'yes' if same else 'NO'}:", "", "| implementation | ms, median [min-max] |", "|---|---|"]
    lines += [f"| {n} | {_fmt({k: v * 1000 for k, v in s.items()}, 1)} |" for n, s in nms_rows]
    md = (f"{n_images} photos resized to 500x375, {n_props} proposals per image (given, so proposal time is "
          f"excluded), random weights everywhere, {torch.get_num_threads()} threads. Windows that project onto "
          f"the same conv5 cells as an earlier window (pooled and scored once): "
          f"{100 * ratios['detect_shared_window_fraction']:.1f}% of the {n_props} given, "
          f"{100 * ratios['detect_shared_window_fraction_ss_only']:.1f}% of the selective-search boxes alone "
          f"({', '.join(map(str, n_ss))} per image).\n\n" + "\n".join(lines))
    return md, ratios


# ---------------------------------------------------------------------------------------------- selective search


def section_selective_search(n_images: int = 3) -> tuple[str, dict[str, float]]:
    """Selective search per 500x375 image, fast mode and the project's default mode."""
    from detector.config import ProposalConfig
    from proposals import selective_search

    default = ProposalConfig()
    photos = TI.voc_sized_photos(n_images)
    # the paper's "fast", the project's default (config) and the library's default "fast+"; "quality" is
    # left out (minutes per image)
    modes = list(dict.fromkeys(["fast", default.mode, "fast+"]))
    # one thread (a proposal worker process of training) and the torch threads (the detector's own call)
    thread_counts = list(dict.fromkeys([1, torch.get_num_threads()]))
    lines = ["| mode | threads | seconds per image, median [min-max] | boxes per image (median) |", "|---|---|---|---|"]
    ratios = {}
    for mode in modes:
        for threads in thread_counts:
            times, counts = [], []
            for _, im in photos:
                t0 = time.perf_counter()
                b = selective_search(im, mode=mode, min_size=default.min_size,
                                     max_boxes=default.max_boxes or None, threads=threads)
                times.append(time.perf_counter() - t0)
                counts.append(len(b))
            s = _stats(times)
            tag = " (project default, config proposals.mode)" if mode == default.mode else ""
            lines.append(f"| {mode}{tag} | {threads} | {_fmt(s)} | {statistics.median(counts):.0f} |")
            suffix = "" if threads == 1 else f"_{threads}_threads"
            ratios[f"selective_search_{mode.replace('+', '_plus')}{suffix}_s_per_image"] = s["median"]
    md = (f"{n_images} photos resized to 500x375, min_size {default.min_size}, max_boxes {default.max_boxes}; "
          "OpenCV's search split over the given threads (the same boxes for any count).\n\n")
    return md + "\n".join(lines), ratios


# ---------------------------------------------------------------------------------------------- memory

_PEAK_SNIPPET = r"""
import json, resource, sys, time, torch
torch.set_num_threads({threads})
from detector.bench import inputs as TI
from detector.bench.random_model import random_boxes, random_detector
det = random_detector(width_mult=1.0, fc_dim=4096, seed=0, scales={scales})
photos = TI.voc_sized_photos(1)
im = photos[0][1]
boxes = random_boxes(im.shape[0], im.shape[1], {n_props}, torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
det.detect(im, proposals=boxes)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"base_kb": base, "peak_kb": peak}}))
"""


def _peak_detect_memory(scales: Sequence[int], n_props: int) -> dict[str, float]:
    code = _PEAK_SNIPPET.format(threads=torch.get_num_threads(), scales=tuple(scales), n_props=n_props)
    # run from the checkout that holds this package, so the child imports the same ``detector``
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[2]), check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return {"base_mb": d["base_kb"] / 1024, "peak_mb": d["peak_kb"] / 1024}


def conv5_cache_bytes(height: int, width: int, scales: Sequence[int], channels: int = 256,
                      max_size: int = 0, bytes_per_value: int = 2) -> int:
    """Bytes of one image's conv5 cache (float16 by default) at the given scales.

    Uses the project's resize rule (:func:`detector.pyramid.resized_size`) and ZF-5 geometry
    (:func:`detector.backbones.conv5_size`).
    """
    from detector.backbones import conv5_size
    from detector.pyramid import resized_size

    total = 0
    for s in scales:
        hs, ws = resized_size(height, width, s, max_size)
        total += channels * conv5_size("zf5", hs) * conv5_size("zf5", ws) * bytes_per_value
    return total


def section_memory(voc_root: str | None = None, n_props: int = 2000) -> tuple[str, dict[str, float]]:
    """Peak memory of detection; conv5 cache per image (float16, 5 scales); VOC07 trainval disk."""
    # the VOC folder first: a bad voc_root fails before minutes of timing
    if voc_root:
        from detector.data.voc import load_voc_split

        recs, _ = load_voc_split(voc_root, "trainval", log_summary=False)
        sizes = [(r.height, r.width) for r in recs]
        source = f"image sizes read from {voc_root} trainval ({len(sizes)} images)"
    else:
        sizes = [(375, 500)] * 5011
        source = ("assumed: 5011 images, each 500x375 or 375x500 (VOC 2007's typical size: the longer side is "
                  "500 for almost all images; transposed sizes give the same cache size)")
    ratios: dict[str, float] = {}
    lines = ["| quantity | value |", "|---|---|"]
    for scales in ((688,), FIVE_SCALES):
        m = _peak_detect_memory(scales, n_props)
        tag = "1scale" if len(scales) == 1 else "5scale"
        lines.append(f"| peak RSS of one detection, {len(scales)} scale(s), full ZF-5, fc 4096, {n_props} proposals "
                     f"(process after model build: {m['base_mb']:.0f} MiB) | {m['peak_mb']:.0f} MiB |")
        ratios[f"detect_peak_rss_mb_{tag}"] = m["peak_mb"]
    per_img = conv5_cache_bytes(375, 500, FIVE_SCALES)
    lines.append(f"| conv5 cache of one 500x375 image, 5 scales, float16, C=256 | {per_img / 2**20:.2f} MiB |")
    ratios["conv5_cache_mb_per_image_5scale_fp16"] = per_img / 2**20
    cache = {}
    memo: dict[tuple[int, int], int] = {}
    for hw in sizes:
        key = (min(hw), max(hw))
        if key not in memo:
            memo[key] = conv5_cache_bytes(key[0], key[1], FIVE_SCALES)
        cache[hw] = memo[key]
    total = sum(memo[(min(hw), max(hw))] for hw in sizes)
    lines.append(f"| VOC 2007 trainval conv5 cache, 5 scales, float16 | {total / 2**30:.1f} GiB |")
    lines.append(f"| ... with flipped copies | {2 * total / 2**30:.1f} GiB |")
    ratios["voc07_trainval_cache_gb_5scale_fp16"] = total / 2**30
    ratios["voc07_trainval_cache_gb_5scale_fp16_flips"] = 2 * total / 2**30
    return f"Cache sizes: {source}.\n\n" + "\n".join(lines), ratios


# ---------------------------------------------------------------------------------------------- batch


def section_batch(n_images: int = 12, runs: int = 3, threads: int = 2, batch_size: int = 4, workers: int = 1,
                  width_mult: float = 1.0, fc_dim: int = 4096, size: tuple[int, int] = TI.VOC_SIZE
                  ) -> tuple[str, dict[str, float]]:
    """Throughput of ``detect_batch`` against the per-image loop ``[detect(im) for im in images]``,
    proposals included (selective search with the model's options): random full-width ZF-5 (fc
    4096, 20 classes, 1 scale 688) on ``n_images`` VOC-sized photos, ``threads`` torch threads.
    Each run times the whole list; the figure is images per second, median [min-max] of ``runs``
    runs of each, alternated (loop, batch, loop, ...) so load changes hit both."""
    photos = [im for _, im in TI.voc_sized_photos(n_images, size=size)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        det = random_detector(width_mult=width_mult, fc_dim=fc_dim, seed=0)
        det.detect(photos[0])  # warm-up (allocator, kernels); not timed
        loop_t, batch_t, load = [], [], []
        stages: dict[str, dict[str, list[float]]] = {"loop": {}, "batch": {}}
        same = True
        for _ in range(runs):
            load.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            ref, tl = [], {}
            for im in photos:
                ref.append(det.detect(im))
                for k, v in det.last_timings.items():
                    tl[k] = tl.get(k, 0.0) + v
            loop_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = det.detect_batch(photos, batch_size=batch_size, workers=workers)
            batch_t.append(time.perf_counter() - t0)
            for name, tim in (("loop", tl), ("batch", det.last_timings)):
                for k, v in tim.items():
                    stages[name].setdefault(k, []).append(v)
            same &= all(torch.equal(a[k], b[k]) for a, b in zip(ref, got) for k in a)
        load.append(os.getloadavg()[0])
    finally:
        torch.set_num_threads(before)
    ips_loop = _stats([n_images / t for t in loop_t])
    ips_batch = _stats([n_images / t for t in batch_t])
    batched = [v for v in det._batch_exact.values()]
    trunk = ("batches of the same size went through the trunk together (their conv5 equals single passes here)"
             if batched and all(batched) else "the trunk ran one image at a time (a batch's conv5 differed from "
             "single passes in the last bits on this machine, so detect_batch fell back)")
    ratios = {"batch_images_per_s": ips_batch["median"], "loop_images_per_s": ips_loop["median"],
              "batch_over_loop_throughput": ips_batch["median"] / ips_loop["median"],
              "batch_equals_loop": float(same)}
    lines = ["| call | images per second, median [min-max] | seconds for the list, median |", "|---|---|---|",
             f"| loop: `[det.detect(im) for im in images]` | {_fmt(ips_loop)} | {statistics.median(loop_t):.1f} |",
             f"| `det.detect_batch(images, batch_size={batch_size}, workers={workers})` | {_fmt(ips_batch)} | "
             f"{statistics.median(batch_t):.1f} |",
             "", "Seconds per stage summed over the list (median of runs; for the batch, `proposals` is the time "
             "the main process waited for the worker, `conv` the trunk's batched passes):", "",
             "| stage | loop | batch |", "|---|---|---|"]
    lines += [f"| {k} | {statistics.median(stages['loop'][k]):.2f} | {statistics.median(stages['batch'].get(k, [0.0])):.2f} |"
              for k in stages["loop"]]
    md = (f"{n_images} photos of {size[1]}x{size[0]} (`voc_sized_photos`), proposals by selective search inside each call "
          f"(the model's options: {det.params.proposal_options.get('mode', '?')}, at most "
          f"{det.params.proposal_options.get('max_boxes', '?')} boxes), random ZF-5 (width {width_mult:g}) with fc6/fc7 "
          f"{fc_dim} and 20 classes at one scale ({det.params.scales[0]}), {threads} torch threads, {runs} runs of each call "
          f"alternated; load average {min(load):.1f}-{max(load):.1f} during the runs. Same detections in every "
          f"run: {'yes' if same else 'NO'}; {trunk}.\n\n" + "\n".join(lines))
    return md, ratios


# ---------------------------------------------------------------------------------------------- gpu


def save_inputs(path: str | Path, n_images: int = 3, n_props: int = 2000) -> Path:
    """Write the timing photos and their proposals to ``path`` (for a machine without OpenCV contrib).

    The file holds plain tensors and strings only, so it loads with ``weights_only=True``.
    """
    photos, props, n_ss = _inputs(n_images, n_props)
    data = {"names": [n for n, _ in photos], "images": [torch.from_numpy(im.copy()) for _, im in photos],
            "proposals": props, "n_selective_search": n_ss}
    from detector.artifacts import save_torch

    return save_torch(path, data)


def _load_inputs(path: str | Path | None, n_images: int, n_props: int
                 ) -> tuple[list[tuple[str, np.ndarray]], list[torch.Tensor], list[int]]:
    if path:
        d = torch.load(path, weights_only=True)
        photos = [(n, im.numpy()) for n, im in zip(d["names"], d["images"])]
        return photos[:n_images], list(d["proposals"])[:n_images], list(d["n_selective_search"])[:n_images]
    return _inputs(n_images, n_props)


@torch.inference_mode()
def section_gpu(inputs: str | None = None, n_images: int = 3, n_props: int = 2000, reps: int = 10,
                device: str = "cuda") -> tuple[str, dict[str, float]]:
    """The detection figures on a CUDA device: 1-scale detection per image (target <= 0.03 s) with its
    stage breakdown and SVD ranks, SPP-net vs R-CNN mode at 1 and 5 scales, and spp_pool vs the
    roi_pool composition. Same code path as on CPU, the model and inputs moved to ``cuda``."""
    from detector.head import LowRankLinear
    from detector.spp import spp_pool, spp_pool_roi_pool

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark section gpu: no CUDA device is visible to torch")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev} (smoke run)"
    photos, props, n_ss = _load_inputs(inputs, n_images, n_props)
    ratios: dict[str, float] = {}
    lines = [f"Device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
             f"{len(photos)} photos of {photos[0][1].shape[1]}x{photos[0][1].shape[0]} "
             f"({', '.join(n for n, _ in photos)}), {props[0].shape[0]} proposals each (selective search "
             f"'fast+' gave {n_ss}, padded with random boxes), given (proposal time excluded); random "
             f"full-width ZF-5 with fc6/fc7 4096 and 20 classes (timing does not depend on weights); float32. "
             f"Each figure: {reps} timed calls per image after 3 warm-up calls, median [min-max] over all "
             f"calls, CUDA synchronised before and after each call.", ""]
    rows: list[tuple[str, dict[str, float]]] = []
    stages: dict[str, list[float]] = {}

    def run(d, label: str, keep_stages: bool = False) -> dict[str, float]:
        for _ in range(3):
            d.detect(photos[0][1], proposals=props[0])
        times = []
        for (_, im), b in zip(photos, props):
            for _ in range(reps):
                times += _time(lambda: d.detect(im, proposals=b), 1, dev)
                if keep_stages:
                    for k, v in d.last_timings.items():
                        stages.setdefault(k, []).append(v)
        s = _stats(times)
        rows.append((label, s))
        return s

    det = random_detector(width_mult=1.0, fc_dim=4096, seed=0, device=dev)
    s = run(det, "SPP-net ZF-5, 1 scale (688), fc 4096", keep_stages=True)
    ratios["gpu_detect_spp_s_per_image"] = s["median"]
    det5 = random_detector(width_mult=1.0, fc_dim=4096, seed=0, scales=FIVE_SCALES, device=dev)
    s = run(det5, "SPP-net ZF-5, 5 scales (480-1200), fc 4096")
    ratios["gpu_detect_spp_5scale_s_per_image"] = s["median"]
    d = random_detector(width_mult=1.0, fc_dim=4096, seed=0, device=dev)
    d.head.fc6 = LowRankLinear(d.head.in_dim, d.head.fc_dim, 512).to(dev).eval()
    d.head.fc7 = LowRankLinear(d.head.fc_dim, d.head.fc_dim, 512).to(dev).eval()
    s = run(d, "SPP-net ZF-5, 1 scale, fc6/fc7 SVD rank 512")
    ratios["gpu_detect_spp_svd512_s_per_image"] = s["median"]
    lines += ["| model | seconds per image, median [min-max] |", "|---|---|"]
    lines += [f"| {n} | {_fmt(x, 4)} |" for n, x in rows]
    lines += ["", "Stage breakdown of the 1-scale run (each stage synchronised), seconds per image:", "",
              "| stage | median [min-max] |", "|---|---|"]
    lines += [f"| {k} | {_fmt(_stats(v), 4)} |" for k, v in stages.items()]
    cmp = compare_rcnn(det, [im for _, im in photos], props, scale_sets=((688,), FIVE_SCALES))
    for lab, sp in cmp["speedup"].items():
        key = lab.split(" ")[0].replace("-", "_")
        ratios[f"gpu_rcnn_conv_speedup_{key}"] = sp["conv"]
        ratios[f"gpu_rcnn_overall_speedup_{key}"] = sp["overall"]
    lines += ["", "SPP-net vs R-CNN mode on the same GPU (tools/test_net.py --compare-rcnn's code, "
              f"R-CNN conv batches of {cmp['batch_size']} windows). Paper (same ZF-5, 2014 GPU): conv 270x / 49x, "
              "overall 102x / 38x.", "", format_comparison(cmp)]
    # spp_pool vs roi_pool composition on the GPU
    g = torch.Generator().manual_seed(0)
    fmap = torch.relu(torch.randn(256, 42, 56, generator=g)).to(dev)  # (C, H, W)
    xs = torch.randint(0, 56, (2000, 2), generator=g).sort(dim=1).values
    ys = torch.randint(0, 42, (2000, 2), generator=g).sort(dim=1).values
    win = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1).to(dev)  # (R, 4)
    from detector.spp_kernel import SparseTableSPP

    levels = (1, 2, 3, 6)
    fns = {
        "spp_pool (the library call; on CUDA float32 it calls the roi_pool composition)": lambda: spp_pool(fmap, win),
        "sparse table (spp_pool's CPU algorithm, run on the GPU)": lambda: SparseTableSPP.apply(fmap, win, levels),
        "roi_pool x 4 + cat": lambda: spp_pool_roi_pool(fmap, win),
    }
    outs = [f() for f in fns.values()]
    equal = all(torch.equal(outs[0], o) for o in outs[1:])
    st = {k: _stats(_time(f, 20, dev)) for k, f in fns.items()}
    keys = list(fns)
    ratios["gpu_spp_pool_vs_roi_pool_speedup"] = st[keys[2]]["median"] / st[keys[0]]["median"]
    ratios["gpu_sparse_table_vs_roi_pool_speedup"] = st[keys[2]]["median"] / st[keys[1]]["median"]
    ratios["gpu_spp_pool_equals_roi_pool"] = float(equal)
    lines += ["", f"SPP of 2000 random windows on a [256, 42, 56] map on the GPU, 20 synchronised calls each; "
              f"outputs identical: {'yes' if equal else 'NO'}:", "",
              "| implementation | ms, median [min-max] |", "|---|---|"]
    lines += [f"| {k} | {v['median'] * 1e3:.2f} [{v['min'] * 1e3:.2f}-{v['max'] * 1e3:.2f}] |" for k, v in st.items()]
    return "\n".join(lines), ratios
