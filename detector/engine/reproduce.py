"""``reproduce_voc07``: the paper's VOC 2007 detection experiment in one call (paper Table 6).

    VOCdevkit/VOC2007 + trunk weights [+ R-CNN's selective-search .mat files]
      -> train (config voc2007_zf5) -> test at 1 scale (688) and at 5 scales
      -> SPP-net vs R-CNN timing on the same model -> Table 6-shaped rows beside the paper's

Each step is the library's own (:func:`detector.engine.train`, :func:`detector.engine.evaluate`,
:func:`detector.bench.rcnn_compare.compare_rcnn`), so every stage is cached and resumable: a rerun
after a kill continues where it stopped, and a rerun after it finished only prints the table.
Outputs under the output folder: the training run, ``test_test/`` (1 scale) and ``5scale/test_test/``
(5 scales) with their devkit comp4 files and ``eval.json``, ``compare_rcnn.json``, and ``table6.md``.

The paper's figures (spec §11: [P1 Table 6], ZF-5, "ftfc7 bb" row, GPU times of 100 random VOC
images, proposals excluded) are printed beside the measured ones. The measured times are of the
device the run used; the R-CNN column is this model run in R-CNN mode (every window warped to
227 x 227 through the whole trunk, spec §10), whose mAP the table does not measure (hours on VOC):
it shows R-CNN's published mAP only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from detector.artifacts import write_json, write_text
from detector.config import ConfigError, load_config
from detector.data.voc import VOCDataError
from detector.engine.data import test_records
from detector.engine.evaluate import build_detector, evaluate
from detector.engine.proposals import ProposalsStage
from detector.engine.run import resolve_device
from detector.engine.train import train

__all__ = ["reproduce_voc07", "Table6", "PAPER_TABLE6", "RCNN_FILES", "SCALES_1", "SCALES_5"]

log = logging.getLogger(__name__)

SCALES_1 = (688,)  # spec §9: the 1-scale test
SCALES_5 = (480, 576, 688, 864, 1200)  # spec §9: the 5-scale test
RCNN_FILES = {"trainval": "voc_2007_trainval.mat", "test": "voc_2007_test.mat"}  # R-CNN's selective_search_data
# spec §11, [P1 Table 6] (ZF-5; R-CNN = AlexNet, its mAP as published, times measured by the SPP authors)
PAPER_TABLE6 = {
    "SPP 1-sc": {"mAP": 58.0, "conv": 0.053, "fc": 0.089, "total": 0.142, "speedup": 64.0},
    "SPP 5-sc": {"mAP": 59.2, "conv": 0.293, "fc": 0.089, "total": 0.382, "speedup": 24.0},
    "R-CNN": {"mAP": 58.5, "conv": 8.96, "fc": 0.07, "total": 9.03, "speedup": None},
}


@dataclass
class Table6:
    """What :func:`reproduce_voc07` measured.

    Attributes:
        measured: {"SPP 1-sc" | "SPP 5-sc" | "R-CNN": {"mAP" (percent, None for R-CNN), "conv",
            "fc", "total" (median seconds per image), "speedup" (R-CNN total / SPP total)}}.
        device: where the times were measured; images: how many images were timed.
        out_dir: the run's folder (``table6.md`` is there).
    """

    measured: dict[str, dict[str, float | None]]
    device: str
    images: int
    out_dir: Path
    scales: tuple[tuple[int, ...], tuple[int, ...]] = (SCALES_1, SCALES_5)

    def text(self) -> str:
        """The table: each measured figure beside the paper's."""
        cols = list(PAPER_TABLE6)

        def cell(v: float | None, what: str) -> str:
            if v is None:
                return "–"
            return f"{v:.1f}" if what == "mAP" else (f"{v:.0f}x" if what == "speedup" else f"{v:.3f} s")

        head = " | ".join(f"{c} measured | {c} paper" for c in cols)
        lines = [f"VOC 2007 test, Table 6 shape (paper: ZF-5, GPU, 100 images; measured: {self.device}, "
                 f"{self.images} images; proposals excluded). Measured scales: 1-sc {list(self.scales[0])}, "
                 f"5-sc {list(self.scales[1])}.", "",
                 f"| | {head} |", "|---" * (2 * len(cols) + 1) + "|"]
        for what, name in (("mAP", "mAP (ftfc7 bb)"), ("conv", "conv time"), ("fc", "fc time"),
                           ("total", "total"), ("speedup", "speedup vs R-CNN")):
            cells = " | ".join(f"{cell(self.measured[c][what], what)} | {cell(PAPER_TABLE6[c][what], what)}"
                               for c in cols)
            lines.append(f"| {name} | {cells} |")
        lines += ["", "R-CNN measured = this model in R-CNN mode (spec §10); its mAP is not measured."]
        return "\n".join(lines)


def _voc2007(devkit: str | Path) -> Path:
    """The VOC2007 folder of a VOCdevkit (or that folder itself), checked for what the run reads."""
    root = Path(devkit).expanduser()
    if (root / "VOC2007").is_dir():
        root = root / "VOC2007"
    for need in ("Annotations", "JPEGImages", "ImageSets/Main/trainval.txt", "ImageSets/Main/test.txt"):
        if not (root / need).exists():
            raise VOCDataError(f"{root / need}: missing (expected VOCdevkit/VOC2007 with Annotations/, "
                               f"JPEGImages/ and ImageSets/Main/trainval.txt and test.txt)")
    return root


def _link_proposals(src: Path, dst: Path) -> None:
    """Make ``src``'s cached test proposals visible to a second evaluation folder (no recompute)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.npz"):
        target = dst / f.name
        if not target.exists():
            try:
                os.link(f, target)
            except OSError:
                import shutil

                shutil.copy2(f, target)


def reproduce_voc07(
    devkit: str | Path,
    weights: str,
    *,
    rcnn_proposals: str | Path | None = None,
    config: str | Path = "voc2007_zf5",
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    scales_1: Sequence[int] = SCALES_1,
    scales_5: Sequence[int] = SCALES_5,
    compare_images: int = 100,
    argv: Sequence[str] | None = None,
) -> Table6:
    """Train on VOC 2007 trainval and test at 1 and 5 scales with the R-CNN timing comparison.

    Args:
        devkit: the VOCdevkit folder (or its VOC2007 folder).
        weights: the trunk's weights file (``backbone.weights``; either key style; its fc6/fc7 are
            used when it holds them; its declared input format is used).
        rcnn_proposals: a folder with R-CNN's ``voc_2007_trainval.mat`` and ``voc_2007_test.mat``;
            None = OpenCV selective search as the config says.
        config: the config (default the shipped ``voc2007_zf5``).
        overrides: ``key=value`` settings applied after the ones this function sets.
        output_dir: default the config's.
        scales_1, scales_5: the two test scale sets (the paper's by default).
        compare_images: test images timed in SPP-net and R-CNN mode (the paper: 100).
    Returns:
        :class:`Table6` (also written as ``table6.md`` and ``table6.json`` in the output folder).
    Raises:
        VOCDataError / ConfigError / WeightsError / FileNotFoundError: inputs that cannot be used, named,
            before any training.
    """
    from detector.bench.rcnn_compare import compare_rcnn
    from proposals.imageio import read_image

    root = _voc2007(devkit)
    if weights in ("none", "") or not (weights == "imagenet" or Path(weights).expanduser().is_file()):
        raise FileNotFoundError(f"trunk weights file not found: {weights} (the paper starts from an ImageNet net)")
    sets = [f"data.root={root}", f"backbone.weights={weights}", "data.train_split=trainval", "data.test_split=test"]
    if rcnn_proposals is not None:
        files = {s: Path(rcnn_proposals) / n for s, n in RCNN_FILES.items()}
        for f in files.values():
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (R-CNN's selective_search_data file for VOC 2007)")
        sets += ["proposals.method=file", f"proposals.train_file={files['trainval']}",
                 f"proposals.test_file={files['test']}"]
    if output_dir is not None:
        sets.append(f"output_dir={output_dir}")
    sets.append(f"features.test_scales=[{','.join(str(int(s)) for s in scales_1)}]")
    cfg = load_config(config, [*sets, *overrides])
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    if list(cfg.features.test_scales) != list(scales_1):
        raise ConfigError("overrides: features.test_scales is set by the runbook (scales_1 / scales_5)")
    out = Path(cfg.output_dir)

    checkpoint = train(cfg, argv=argv)
    log.info("testing at 1 scale %s", list(scales_1))
    one = evaluate(cfg, checkpoint=checkpoint, argv=argv)
    cfg5 = dataclasses.replace(cfg, output_dir=str(out / "5scale"),
                               features=dataclasses.replace(cfg.features, test_scales=tuple(int(s) for s in scales_5)))
    _link_proposals(out / "proposals", out / "5scale" / "proposals")
    log.info("testing at %d scales %s", len(scales_5), list(scales_5))
    five = evaluate(cfg5, checkpoint=checkpoint, argv=argv)
    if one is None or five is None:  # ranks other than 0 of a distributed job
        return Table6({}, cfg.device, 0, out)

    det = build_detector(cfg, checkpoint)
    records, _ = test_records(cfg, cfg.data.test_split, det.class_names)
    stage = ProposalsStage(cfg, cfg.data.test_split, records, out, cfg.proposals.test_file)
    boxes = stage.load() or stage.build()  # the 1-scale test's cached file, or R-CNN's .mat read again
    n = min(int(compare_images), len(records))
    log.info("timing SPP-net (1 and %d scales) and R-CNN mode on %d test images", len(scales_5), n)
    cmp = compare_rcnn(det, [read_image(r.path) for r in records[:n]],
                       [torch.as_tensor(boxes[r.image_id], dtype=torch.float32) for r in records[:n]],
                       scale_sets=(tuple(scales_1), tuple(scales_5)), progress=True)
    write_json(out / "compare_rcnn.json", json.loads(json.dumps(cmp, default=str)))
    labels = list(cmp["spp"])
    measured: dict[str, dict[str, float | None]] = {}
    for name, lab, rep in (("SPP 1-sc", labels[0], one), ("SPP 5-sc", labels[1], five)):
        t = cmp["spp"][lab]
        measured[name] = {"mAP": 100.0 * rep.mAP, "conv": t["conv_time"]["median"], "fc": t["fc_time"]["median"],
                          "total": t["total"]["median"], "speedup": cmp["speedup"][lab]["overall"]}
    r = cmp["rcnn"]
    measured["R-CNN"] = {"mAP": None, "conv": r["conv_time"]["median"], "fc": r["fc_time"]["median"],
                         "total": r["total"]["median"], "speedup": None}
    table = Table6(measured, str(det.device) + (f" ({torch.get_num_threads()} threads)" if det.device.type == "cpu"
                                                 else ""), n, out,
                   (tuple(int(x) for x in scales_1), tuple(int(x) for x in scales_5)))
    write_text(out / "table6.md", table.text() + "\n")
    write_json(out / "table6.json", {"measured": measured, "paper": PAPER_TABLE6, "device": table.device, "images": n})
    return table
