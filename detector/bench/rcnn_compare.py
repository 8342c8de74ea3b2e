"""SPP-net vs R-CNN mode timing on one model, like with like (spec §10-11), and its paper-shaped table.

Shape shorthand (one alphabet for the whole project):
    R: proposals in one image      D = C * B: pooled width      F: fc7 width

Timing follows spec §10: "conv time" is the full-image conv at 1 or 5 scales (SPP) or crop + conv
of all windows (R-CNN, :mod:`detector.rcnn`); "fc time" is pooling + fc6/fc7 for all windows;
proposals are excluded.

:func:`run_rcnn_comparison` is the whole of ``tools/compare_rcnn.py``: it picks the model (a
checkpoint or a random full-width ZF-5) and the images (a split's first N or bundled VOC-sized
photos), makes the proposals, times both modes and writes the JSON.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from detector.boxes import as_boxes
from detector.rcnn import StageTimer, default_batch_size, rcnn_pooled_features

if TYPE_CHECKING:  # pragma: no cover
    from detector.detector import SPPDetector

__all__ = ["compare_rcnn", "format_comparison", "RcnnComparison", "run_rcnn_comparison"]

log = logging.getLogger(__name__)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def _scale_label(scales: Sequence[int]) -> str:
    return f"{len(scales)}-sc" if len(scales) > 1 else f"1-sc ({scales[0]})"


@torch.inference_mode()
def compare_rcnn(
    det: "SPPDetector",
    images: Sequence[np.ndarray],
    proposals: Sequence[torch.Tensor | np.ndarray],
    scale_sets: Sequence[Sequence[int]] = ((688,), (480, 576, 688, 864, 1200)),
    batch_size: int | None = None,
    warmup: bool = True,
    progress: bool = False,
    svd_ranks: Sequence[int] = (),
) -> dict[str, Any]:
    """SPP-net vs R-CNN mode, per image, like with like (spec §10 timing definitions).

    For every image and scale set: SPP conv (one backbone pass per scale), pool (projection + SPP)
    and fc (fc6/fc7 of all windows). R-CNN: crop, conv (per 227x227 window in batches), pool
    (whole-map SPP of each crop) and fc. Proposals are given (their time excluded). A warm-up
    (SPP on the first image at every scale set, R-CNN on one batch) runs first and is not timed.

    Args:
        det: the model (a trained checkpoint or :func:`detector.bench.random_model.random_detector`).
        images: uint8 RGB arrays [H, W, 3].
        proposals: per image Tensor[R_i, 4] xyxy.
        scale_sets: SPP scale sets to time (paper: 688 and the 5 scales).
        batch_size: R-CNN windows per conv batch.
        svd_ranks: also time fc6/fc7 compressed by truncated SVD at these ranks
            (:meth:`FCHead.compress_svd`), on the same pooled features in both modes, so the conv
            passes are not repeated; reported under ``svd``.
    Returns:
        dict with ``images``, ``proposals`` (R per image), ``threads``, ``device``, ``image_sizes``;
        ``spp`` = {label: {"conv"|"pool"|"fc"|"conv_time"|"fc_time"|"total": stats}} per scale set;
        ``rcnn`` = {"crop"|"conv"|"pool"|"fc"|"conv_time"|"fc_time"|"total": stats}; and
        ``speedup`` = {label: {"conv": x, "overall": x}} from the medians. conv_time = conv (SPP) or
        crop + conv (R-CNN); fc_time = pool + fc; total = conv_time + fc_time. Stats are dicts of
        median / min / max / values, in seconds. ``svd`` = {rank: {"spp": {label: stats as above with
        "fc" the compressed head's}, "rcnn": {...}, "speedup": {label: {"overall": x}}}} when ``svd_ranks``.
    """
    from detector.regions import pool_regions

    if len(images) != len(proposals):
        raise ValueError(f"compare_rcnn: {len(images)} images but {len(proposals)} proposal sets")
    if not images:
        raise ValueError("compare_rcnn: no images")
    boxes_list = [as_boxes(p, f"proposals[{i}]").to(det.device) for i, p in enumerate(proposals)]
    bs = int(batch_size or default_batch_size(det.device))
    labels = [_scale_label(s) for s in scale_sets]
    svd_heads = {int(r): det.head.compress_svd(int(r)).to(det.device).eval() for r in svd_ranks}
    svd_t: dict[int, dict[str, list[float]]] = {r: {lab: [] for lab in labels + ["rcnn"]} for r in svd_heads}

    def time_svd(key: str, pooled: torch.Tensor) -> None:
        for r, head in svd_heads.items():
            t_svd: dict[str, float] = {}
            with StageTimer(t_svd, det.device)("fc"):
                head.features(pooled)  # (R, F)
            svd_t[r][key].append(t_svd["fc"])

    if warmup:
        for scales in scale_sets:
            pyr = det.compute_pyramid(images[0], scales)
            det.fc_features(pool_regions(pyr, boxes_list[0][:bs], det.levels, det.proj))
        warm = rcnn_pooled_features(det, images[0], boxes_list[0][:bs], bs)  # (bs, D)
        det.fc_features(warm)
        for head in svd_heads.values():
            head.features(warm)
    spp_t: dict[str, dict[str, list[float]]] = {lab: {"conv": [], "pool": [], "fc": []} for lab in labels}
    rc_t: dict[str, list[float]] = {"crop": [], "conv": [], "pool": [], "fc": []}
    it = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="compare R-CNN", unit="img")
    for i in it:
        img, boxes = images[i], boxes_list[i]
        for lab, scales in zip(labels, scale_sets):
            t: dict[str, float] = {}
            tm = StageTimer(t, det.device)
            with tm("conv"):
                pyr = det.compute_pyramid(img, scales)
            with tm("pool"):
                pooled = pool_regions(pyr, boxes, det.levels, det.proj)  # (R, D)
            with tm("fc"):
                det.fc_features(pooled)  # (R, F)
            time_svd(lab, pooled)
            del pyr, pooled
            for k, v in t.items():
                spp_t[lab][k].append(v)
        t = {}
        pooled = rcnn_pooled_features(det, img, boxes, bs, t)  # (R, D)
        tm = StageTimer(t, det.device)
        with tm("fc"):
            det.fc_features(pooled)  # (R, F)
        time_svd("rcnn", pooled)
        del pooled
        for k in rc_t:
            rc_t[k].append(t.get(k, 0.0))

    def derived(d: dict[str, list[float]], rcnn: bool, fc_only: list[float] | None = None) -> dict[str, Any]:
        """Stats of every stage plus conv_time, fc_time and total; ``fc_only`` replaces d["fc"]
        (the SVD rows: same conv and pool times, another fc)."""
        if fc_only is not None:
            d = {**d, "fc": fc_only}
        n = len(d["conv"])
        conv = [d["conv"][j] + (d["crop"][j] if rcnn else 0.0) for j in range(n)]
        fc = [d["pool"][j] + d["fc"][j] for j in range(n)]
        out = {k: _stats(v) for k, v in d.items()}
        out["conv_time"] = _stats(conv)
        out["fc_time"] = _stats(fc)
        out["total"] = _stats([a + b for a, b in zip(conv, fc)])
        return out

    spp = {lab: derived(v, False) for lab, v in spp_t.items()}
    rcnn = derived(rc_t, True)
    speedup = {
        lab: {
            "conv": rcnn["conv_time"]["median"] / spp[lab]["conv_time"]["median"],
            "overall": rcnn["total"]["median"] / spp[lab]["total"]["median"],
        }
        for lab in labels
    }
    svd: dict[int, dict[str, Any]] = {}
    for r, per in svd_t.items():
        sp = {lab: derived(spp_t[lab], False, per[lab]) for lab in labels}
        rc = derived(rc_t, True, per["rcnn"])
        svd[r] = {"spp": sp, "rcnn": rc,
                  "speedup": {lab: {"overall": rc["total"]["median"] / sp[lab]["total"]["median"]} for lab in labels}}
    return {
        "svd": svd,
        "images": len(images),
        "proposals": [int(b.shape[0]) for b in boxes_list],
        "image_sizes": [list(im.shape[:2]) for im in images],
        "threads": torch.get_num_threads(),
        "device": str(det.device),
        "batch_size": bs,
        "scale_sets": [list(s) for s in scale_sets],
        "spp": spp,
        "rcnn": rcnn,
        "speedup": speedup,
    }


def format_comparison(cmp: dict[str, Any]) -> str:
    """Markdown table shaped like the paper's (spec §11): SPP columns, then R-CNN; medians with
    [min-max] in seconds per image; speedups = R-CNN median / SPP median."""
    labels = list(cmp["spp"])
    head = "| seconds per image (median [min-max]) | " + " | ".join(f"SPP {lab}" for lab in labels) + " | R-CNN |"
    sep = "|---" * (len(labels) + 2) + "|"

    def cell(s: dict[str, Any]) -> str:
        return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"

    rows = [head, sep]
    spec = [("conv time", "conv_time"), ("  of which crop (R-CNN)", "crop"), ("fc time (pool + fc6/fc7)", "fc_time"),
            ("  of which pool", "pool"), ("total (conv + fc)", "total")]
    for name, key in spec:
        spp_cells = [cell(cmp["spp"][lab][key]) if key in cmp["spp"][lab] else "–" for lab in labels]
        rows.append(f"| {name} | " + " | ".join(spp_cells) + f" | {cell(cmp['rcnn'][key])} |")
    rows.append("| speedup, conv only | " + " | ".join(f"{cmp['speedup'][lab]['conv']:.1f}x" for lab in labels) + " | – |")
    rows.append("| speedup, overall | " + " | ".join(f"{cmp['speedup'][lab]['overall']:.1f}x" for lab in labels) + " | – |")
    for r, sv in cmp.get("svd", {}).items():
        rows.append(f"| fc time, fc6/fc7 SVD rank {r} (pool + fc) | "
                    + " | ".join(cell(sv["spp"][lab]["fc_time"]) for lab in labels) + f" | {cell(sv['rcnn']['fc_time'])} |")
        rows.append(f"| total, SVD rank {r} | "
                    + " | ".join(cell(sv["spp"][lab]["total"]) for lab in labels) + f" | {cell(sv['rcnn']['total'])} |")
        rows.append(f"| speedup, overall, SVD rank {r} | "
                    + " | ".join(f"{sv['speedup'][lab]['overall']:.1f}x" for lab in labels) + " | – |")
    n_props = cmp["proposals"]
    foot = (f"{cmp['images']} images, {statistics.median(n_props):.0f} proposals per image (median), "
            f"{cmp['threads']} threads, device {cmp['device']}, R-CNN batch {cmp['batch_size']}; proposals excluded.")
    return "\n".join(rows) + "\n\n" + foot


@dataclass
class RcnnComparison:
    """What :func:`run_rcnn_comparison` measured.

    Attributes:
        model: the model in words (checkpoint or random ZF-5, width, SVD rank).
        data: :func:`compare_rcnn`'s dict plus ``model``, ``selective_search_boxes`` (per image),
            ``image_names``, ``command`` and ``cpu_count``: what the JSON file holds.
    """

    model: str
    data: dict[str, Any]

    def text(self) -> str:
        """The printed report: the model, the paper-shaped table, then ``name: value`` speedup lines."""
        lines = [f"model: {self.model}", format_comparison(self.data)]
        for lab, sp in self.data["speedup"].items():
            key = lab.split(" ")[0].replace("-", "_")
            lines.append(f"rcnn_conv_speedup_{key}: {sp['conv']:.2f}")
            lines.append(f"rcnn_overall_speedup_{key}: {sp['overall']:.2f}")
        return "\n".join(lines)


def run_rcnn_comparison(
    *,
    checkpoint: str | Path | None = None,
    width_mult: float = 1.0,
    fc_dim: int = 4096,
    data_root: str | Path | None = None,
    split: str = "test",
    num_images: int = 3,
    n_proposals: int = 2000,
    ss_mode: str = "fast+",
    threads: int = 2,
    batch_size: int = 0,
    scale_sets: Sequence[Sequence[int]] = ((688,), (480, 576, 688, 864, 1200)),
    svd_rank: int = 0,
    device: str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    command: str = "",
) -> RcnnComparison:
    """SPP-net vs R-CNN mode timing on a checkpoint or a random ZF-5, on a split or bundled photos.

    Both modes use the same model and the same proposals per image; proposals are excluded from
    the times. Proposals: selective search on the image (``ss_mode``), padded with random boxes up
    to ``n_proposals`` when it returns fewer (the count is logged and kept).

    Args:
        checkpoint: ``model.pt``; None: a random ZF-5 of ``width_mult`` with fc6/fc7 of ``fc_dim``
            and random SVMs (timing does not depend on the weights).
        data_root: VOC-layout folder whose ``split``'s first ``num_images`` images are timed;
            None: ``num_images`` VOC-sized (500x375) real photos bundled with scikit-image / -learn.
        threads: torch intra-op threads (0 = torch default).
        batch_size: R-CNN windows per conv batch (0 = the device default).
        scale_sets: SPP scale sets to time (paper: 688 and the 5 scales).
        svd_rank: compress fc6/fc7 to this rank (0 = off).
        seed: torch and numpy seed, and the seed of the padding boxes (plus the image index).
        out: write the comparison as JSON here (atomically).
        command: the command line, kept in the JSON.
    Raises:
        ValueError: ``num_images`` < 1. CheckpointError / VOCDataError / ImageError: inputs that
            cannot be used (named).
    """
    from detector.bench import inputs
    from detector.bench.random_model import random_detector
    from detector.detector import SPPDetector

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    if checkpoint is None:
        det = random_detector(width_mult=width_mult, fc_dim=fc_dim, seed=seed, device=device)
        model = f"random ZF-5 width {width_mult}, fc {fc_dim}"
    else:
        det = SPPDetector.load(checkpoint, device=device)
        model = f"{checkpoint} ({det.arch}, width {det.width_mult})"
    if svd_rank > 0:
        det.compress_fc(svd_rank)
        model += f", fc SVD rank {svd_rank}"
    if data_root:
        from detector.data.voc import load_voc_split
        from proposals.imageio import read_image

        records = load_voc_split(data_root, split)[0][:num_images]
        images = [(r.image_id, read_image(r.path)) for r in records]
    else:
        images = inputs.voc_sized_photos(num_images)
    props, n_ss = [], []
    for i, (name, im) in enumerate(images):
        boxes, k = inputs.proposals_for(im, n_proposals, ss_mode, seed=seed + i)
        props.append(boxes)
        n_ss.append(k)
        log.info("%s %dx%d: %d selective-search boxes, %d random boxes added", name, im.shape[1], im.shape[0],
                 k, boxes.shape[0] - k)
    cmp = compare_rcnn(det, [im for _, im in images], props, scale_sets=scale_sets,
                       batch_size=batch_size or None, progress=True)
    cmp.update(model=model, selective_search_boxes=n_ss, image_names=[n for n, _ in images], command=command,
               cpu_count=os.cpu_count())
    if out:
        from detector.artifacts import write_text

        write_text(out, json.dumps(cmp, indent=1, default=str))
    return RcnnComparison(model=model, data=cmp)
