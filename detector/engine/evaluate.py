"""``evaluate(cfg, ...)``: a trained detector scored on a split, as two keyed stages.

    proposals -> detect -> score

``detect`` runs the detector on every image with the split's proposals and keeps the detections
and per-stage seconds in shards of :data:`SHARD` images (``<out>/detect/<key>/``): a killed run
resumes from the shards already written, and a rerun with the same model, settings and images
reuses them. ``score`` writes the devkit comp4 files, ``eval.json`` (VOC AP per class, mAP, COCO
AP/AP50/AP75, timing, peak memory), ``pr_curves.png`` and the error analysis (``errors.json``,
``errors.png``, ``confusion.png``, ``false_positives.png``: :mod:`detector.eval.errors`) under
``<output_dir>/test_<split>/``, and
returns an :class:`EvalReport` whose :meth:`EvalReport.text` is what ``tools/test_net.py`` prints.

``held_out=True`` scores the training images that training held out from fine-tuning
(:mod:`detector.engine.data`), with the training run's cached proposals: the place to choose test
settings without looking at the test split.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm import tqdm

from detector import distributed
from detector.artifacts import (
    content_id,
    load_keyed,
    remove_stale_temps,
    save_keyed,
    write_json,
)
from detector.checkpoint import CheckpointError
from detector.config import Config
from detector.data.voc import ImageRecord, VOCDataError
from detector.detector import STAGES, SPPDetector
from detector.engine.data import category_ids, test_records, training_data
from detector.engine.proposals import ProposalsStage, mean_count, proposal_options
from detector.engine.run import Output, Run, Stage, peak_memory_mb
from detector.eval import EvalResult, coco_evaluate, plot_pr_curves, write_comp4
from detector.eval.errors import ErrorReport, analyze_errors, false_positive_gallery, write_error_report
from detector.eval import evaluate as voc_evaluate
from proposals import propose
from proposals.imageio import ImageError, decode_image, read_image

__all__ = ["evaluate", "score", "build_detector", "EvalReport", "timing_table", "SHARD"]

log = logging.getLogger(__name__)

SHARD = 16  # images per detection shard (the unit of resumption)


def build_detector(cfg: Config, checkpoint: str | Path, device: str | None = None) -> SPPDetector:
    """Load ``checkpoint`` with the config's test settings (``test.*``, ``features.test_scales`` and
    ``max_size``; ``test.target_side`` when set). The proposal settings stay the checkpoint's.

    Raises:
        CheckpointError: the file cannot be loaded, or a setting does not fit this model (named).
    """
    det = SPPDetector.load(checkpoint, device=device or cfg.device, scales=cfg.features.test_scales,
                           svd_rank=cfg.test.svd_rank, fc_precision=cfg.test.fc_precision,
                           conv_precision=cfg.test.conv_precision)
    t = cfg.test
    try:
        det.params = dataclasses.replace(
            det.params, nms=t.nms, max_per_class=t.max_per_class, score_thresh=t.score_thresh, score=t.score,
            max_size=cfg.features.max_size, target_side=t.target_side or det.params.target_side)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: test settings: {e}") from None
    return det


def timing_table(per_image: dict[str, list[float]]) -> str:
    """Median, min and max seconds per image of each stage."""
    lines = [f"{'stage':<10} {'median s':>9} {'min s':>8} {'max s':>8}", "-" * 38]
    for k, v in per_image.items():
        if v:
            lines.append(f"{k:<10} {statistics.median(v):>9.4f} {min(v):>8.4f} {max(v):>8.4f}")
    return "\n".join(lines)


class DetectStage(Stage[dict]):
    """Detections of every image of a split: ``{"dets": {id: {boxes, scores, labels}}, "times":
    {id: {stage: seconds}}, "n_props": {id: R}, "n_distinct": {id: windows fc ran on}, "failed": [ids]}``."""

    name = "detect"

    def __init__(self, det: SPPDetector, checkpoint: Path, records: Sequence[ImageRecord], proposals: Output[dict],
                 out_dir: Path, mode: Literal["spp", "rcnn"], time_proposals: int, proposal_opts: dict) -> None:
        super().__init__(proposals)
        self.det, self.checkpoint, self.records, self.mode = det, Path(checkpoint), list(records), mode
        self.time_proposals, self.proposal_opts = time_proposals, proposal_opts
        self.out_dir = Path(out_dir)

    def settings(self) -> object:
        d = self.det
        return [content_id(self.checkpoint), d.params.to_dict(), d.svd_rank, d.fc_precision, d.conv_precision,
                d.device.type, self.mode, [r.image_id for r in self.records]]

    @property
    def folder(self) -> Path:
        return self.out_dir / "detect" / self.key

    def _shards(self) -> list[list[ImageRecord]]:
        return [self.records[i:i + SHARD] for i in range(0, len(self.records), SHARD)]

    def _shard_path(self, n: int) -> Path:
        return self.folder / f"shard_{n:06d}.pt"

    def load(self) -> dict | None:
        shards = self._shards()
        got = [load_keyed(self._shard_path(n), self.key) for n in range(len(shards))]
        return None if any(g is None for g in got) else _merge(got)

    def build(self) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        props = self.inputs[0].value
        shards = self._shards()
        done = {n: load_keyed(self._shard_path(n), self.key) for n in range(len(shards))}
        done = {n: s for n, s in done.items() if s is not None}
        if done:
            log.info("detection resumes: %d of %d shards already done", len(done), len(shards))
        if self.mode == "rcnn":
            from detector.rcnn import detect_rcnn
        info = distributed.current()
        bar = tqdm(total=len(self.records), initial=sum(len(s["ids"]) for s in done.values()), unit="img",
                   desc="detect", disable=not info.main)
        i0 = 0
        for n, shard in enumerate(shards):
            if n in done or n % info.world != info.rank:  # done, or another rank's shard
                i0 += len(shard)
                continue
            out: dict[str, Any] = {"ids": [r.image_id for r in shard], "dets": {}, "times": {}, "n_props": {},
                                   "n_distinct": {}, "failed": [], "warnings": []}
            for rec in shard:
                try:
                    image, warning = decode_image(rec.path)
                    if warning:
                        log.warning("%s", warning)
                        out["warnings"].append(warning)
                except ImageError as e:
                    log.error("%s; scored with no detections", e)
                    out["dets"][rec.image_id] = _empty()
                    out["failed"].append(rec.image_id)
                    i0 += 1
                    bar.update(1)
                    continue
                times: dict[str, float] = {}
                if i0 < self.time_proposals:
                    t0 = time.perf_counter()
                    propose(image, **self.proposal_opts)
                    times["proposals"] = time.perf_counter() - t0
                boxes = props[rec.image_id]
                t0 = time.perf_counter()
                if self.mode == "rcnn":
                    dets, stage_times = detect_rcnn(self.det, image, boxes)
                    out["n_distinct"][rec.image_id] = len(boxes)
                else:
                    dets = self.det.detect(image, proposals=boxes)
                    stage_times = self.det.last_timings
                    out["n_distinct"][rec.image_id] = self.det.last_counts["distinct"]
                times["total"] = time.perf_counter() - t0
                times.update({k: v for k, v in stage_times.items() if k != "proposals"})
                out["dets"][rec.image_id] = dets
                out["times"][rec.image_id] = times
                out["n_props"][rec.image_id] = len(boxes)
                i0 += 1
                bar.update(1)
            save_keyed(self._shard_path(n), self.key, out)
            done[n] = out
        bar.close()
        distributed.barrier("detection shards written")
        if info.active:
            done.update({n: load_keyed(self._shard_path(n), self.key) for n in range(len(shards)) if n not in done})
            missing = [n for n, s in done.items() if s is None]
            if missing:
                raise RuntimeError(f"{self.folder}: detection shards {missing[:5]} are missing after every rank "
                                   f"finished (is output_dir on a filesystem every rank shares?)")
        return _merge([done[n] for n in range(len(shards))])


def _empty() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}


def _merge(shards: list[dict]) -> dict:
    out: dict[str, Any] = {"dets": {}, "times": {}, "n_props": {}, "n_distinct": {}, "failed": [], "warnings": []}
    for s in shards:
        for k in ("dets", "times", "n_props", "n_distinct"):
            out[k].update(s[k])
        out["failed"] += list(s["failed"])
        out["warnings"] += list(s.get("warnings", []))
    return out


@dataclass
class EvalReport:
    """What :func:`evaluate` measured and wrote.

    Attributes:
        split: the split's name ("heldout" for the held-out images).
        result: VOC AP per class and mAP (:class:`detector.eval.EvalResult`).
        coco: COCO AP, AP50, AP75 (pycocotools).
        timing: seconds per image of each stage: {stage: {median, min, max, n}}.
        out_dir: where the files went.
        report: the dict written as ``eval.json``.
        comparison: the R-CNN comparison text (``compare_rcnn`` > 0), else "".
        errors: the false positives by cause and the AP each costs (``errors.json``,
            ``errors.png``, ``confusion.png``, ``false_positives.png``; :mod:`detector.eval.errors`).
    """

    split: str
    result: EvalResult
    coco: dict[str, float]
    timing: dict[str, dict[str, float]]
    out_dir: Path
    report: dict
    per_image: dict[str, list[float]] = field(repr=False, default_factory=dict)
    comparison: str = ""
    errors: ErrorReport | None = field(repr=False, default=None)

    @property
    def mAP(self) -> float:
        return self.result.mAP

    def text(self) -> str:
        """The printed report, ending with the line ``mAP: 0.xxxxxx``."""
        r = self.report
        lines = []
        if self.comparison:
            lines += [self.comparison, ""]
        lines += [
            f"{r['images']} {self.split} images, {r['mean_proposals']:.0f} proposals per image "
            f"({r['mean_distinct_windows']:.0f} distinct conv5 windows: fc ran on "
            f"{100 * r['mean_distinct_windows'] / max(r['mean_proposals'], 1e-9):.1f}% of them), "
            f"scales {r['scales']}, mode {r['mode']}, peak memory {r['peak_memory_mb']:.0f} MiB"
            + (f"; {len(r['failed_images'])} unreadable image(s) scored with no detections" if r['failed_images'] else "")
            + (f"; {len(r['image_warnings'])} image(s) decoded with a warning (see eval.json)"
               if r['image_warnings'] else ""),
            f"seconds per image (proposals timed on the first {len(self.per_image.get('proposals', []))} images; "
            f"total excludes proposals):",
            timing_table(self.per_image),
            "",
            self.result.table(),
            f"COCO (pycocotools): AP {self.coco['AP']:.4f}  AP50 {self.coco['AP50']:.4f}  AP75 {self.coco['AP75']:.4f}",
            *([] if self.errors is None else [
                "", self.errors.text(),
                "(errors.json, errors.png, confusion.png; false_positives.png: the worst ones)"]),
            f"outputs: {self.out_dir}",
            f"mAP: {self.result.mAP:.6f}",
        ]
        return "\n".join(lines)


def evaluate(
    cfg: Config,
    split: str | None = None,
    *,
    held_out: bool = False,
    checkpoint: str | Path | None = None,
    metric: Literal["07", "area"] = "07",
    mode: Literal["spp", "rcnn"] = "spp",
    time_proposals: int = 10,
    compare_rcnn: int = 0,
    argv: Sequence[str] | None = None,
) -> EvalReport | None:
    """Score a trained detector on a split (default ``data.test_split``) or on the held-out images.

    Args:
        cfg: the config (data, test settings, output folder).
        split: split to score; not with ``held_out``.
        held_out: score the training images held out from fine-tuning.
        checkpoint: ``model.pt`` (default ``<output_dir>/model.pt``).
        metric: "07" (VOC 2007 11-point) or "area" (VOC 2010+).
        mode: "spp", or "rcnn" (every window warped to 227x227, spec §10, same model).
        time_proposals: run the proposal method live on this many images to time it (the boxes
            scored are the cached ones, made by the same deterministic function).
        compare_rcnn: also time R-CNN mode against SPP-net on this many images.
    Returns:
        :class:`EvalReport` (None on the ranks other than 0 of a distributed job: each detects its
        share of the images and rank 0 scores them all).
    Raises:
        ValueError: ``split`` with ``held_out``, or no held-out images. CheckpointError /
            VOCDataError / ProposalFileError: inputs that cannot be used (named).
    """
    if held_out and split:
        raise ValueError("held_out scores the held-out training images; it takes no split")
    name = "heldout" if held_out else (split or cfg.data.test_split)
    out = Path(cfg.output_dir) / (f"test_{name}" + ("_rcnn" if mode == "rcnn" else ""))
    run = Run(cfg, out_dir=out, log_name="test_log.txt", argv=argv)
    cfg = run.cfg  # with the device resolved
    ckpt = Path(checkpoint) if checkpoint else Path(cfg.output_dir) / "model.pt"
    det = build_detector(cfg, ckpt)
    records, props = _records_and_proposals(cfg, run, det, name, held_out)
    opts = det.params.proposal_options or proposal_options(cfg.proposals)
    timed = time_proposals if cfg.proposals.method != "file" else 0
    detected = run.stage(DetectStage(det, ckpt, records, props, out, mode, timed, opts)).value
    if not run.dist.main:
        return None  # rank 0 scores and writes the report
    # COCO data: results keep the json's own category ids (and records their image ids)
    cats = category_ids(cfg, (cfg.data.val_split or cfg.data.train_split) if held_out else name, det.class_names)
    report = score(det, records, props.value, detected, out, name, metric, mode, ckpt, category_ids=cats)
    write_json(out / "test_timings.json", {"stage_seconds": run.timings, "peak_rss_mib_per_stage": run.peak_rss_mb,
                                           "world_size": run.dist.world})
    if compare_rcnn:
        from detector.bench.rcnn_compare import compare_rcnn as compare
        from detector.bench.rcnn_compare import format_comparison

        n = min(compare_rcnn, len(records))
        cmp = compare(det, [read_image(r.path) for r in records[:n]],
                      [torch.as_tensor(props.value[r.image_id]) for r in records[:n]])
        write_json(out / "compare_rcnn.json", json.loads(json.dumps(cmp, default=str)))
        report.comparison = format_comparison(cmp)
    return report


def _records_and_proposals(cfg: Config, run: Run, det: SPPDetector, name: str, held_out: bool
                           ) -> tuple[list[ImageRecord], Output[dict]]:
    """The images to score and their proposals (stage ``proposals``)."""
    root = Path(cfg.output_dir)
    if not held_out:
        records, n_all = test_records(cfg, name, det.class_names)
        if len(records) < n_all:
            log.warning("scoring only the first %d of %d %s images (data.max_test_images)", len(records), n_all, name)
        return records, run.stage(ProposalsStage(cfg, name, records, root, cfg.proposals.test_file))
    data = training_data(cfg, raw_boxes=True, class_names=det.class_names)
    records = data.held_out
    if not records:
        raise VOCDataError("--held-out: no images are held out (set data.val_split or data.val_fraction > 0)")
    log.info("scoring the %d training images held out from fine-tuning (%s)", len(records),
             f"data.val_split '{cfg.data.val_split}'" if cfg.data.val_split else
             f"{cfg.data.val_fraction:.0%} of '{cfg.data.train_split}', seed {cfg.seed}")
    trained = ProposalsStage(cfg, cfg.data.train_split, data.with_proposals(), root, cfg.proposals.train_file)
    if cfg.proposals.method != "file" and not trained.path.is_file():
        # the training run's proposals are not here: compute only the held-out images'
        trained = ProposalsStage(cfg, f"{cfg.data.train_split}-heldout", records, root)
    return records, run.stage(trained)


def score(det: SPPDetector, records: Sequence[ImageRecord], props: dict, detected: dict, out: Path, name: str,
          metric: Literal["07", "area"], mode: str, checkpoint: Path,
          category_ids: Sequence[int] | None = None) -> EvalReport:
    """Stage ``score``: comp4 files, VOC AP (devkit semantics), COCO AP, PR curves, timing and
    ``eval.json`` of the detections of ``records``. ``category_ids``: the COCO data set's own id of
    each class, kept in ``coco_dets.json`` (None: 1..K)."""
    dets = {r.image_id: detected["dets"][r.image_id] for r in records}
    class_names = det.class_names
    write_comp4(out / "results", name, class_names, dets)
    result = voc_evaluate(records, class_names, dets, metric=metric)
    coco = coco_evaluate(records, class_names, dets, out_dir=out, category_ids=category_ids)
    plot_pr_curves(result, out / "pr_curves.png")
    errors = analyze_errors(records, class_names, dets, metric=metric,
                            proposals={r.image_id: props[r.image_id] for r in records})
    write_error_report(errors, out, {"split": name, "checkpoint": str(checkpoint)})
    false_positive_gallery(records, class_names, errors, out / "false_positives.png")
    per_image: dict[str, list[float]] = {k: [] for k in (*STAGES, "total")}
    for r in records:
        for k, v in detected["times"].get(r.image_id, {}).items():
            per_image.setdefault(k, []).append(v)
    timing = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
              for k, v in per_image.items() if v}
    report = {"split": name, "images": len(records), "mode": mode, "scales": list(det.params.scales),
              "mean_proposals": mean_count({r.image_id: props[r.image_id] for r in records}),
              "mean_distinct_windows": statistics.mean([detected["n_distinct"][r.image_id] for r in records
                                                        if r.image_id in detected["n_distinct"]] or [0]),
              "fc_precision": det.params.fc_precision, "conv_precision": det.conv_precision,
              "peak_memory_mb": peak_memory_mb(), "failed_images": detected["failed"],
              "image_warnings": detected["warnings"], "timing_s_per_image": timing,
              "coco": coco, "checkpoint": str(checkpoint), **result.to_dict()}
    write_json(out / "eval.json", report)
    return EvalReport(split=name, result=result, coco=coco, timing=timing, out_dir=out, report=report,
                      per_image=per_image, errors=errors)
