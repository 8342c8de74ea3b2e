"""The ``scale`` benchmark section: seconds and peak memory per stage of finished runs of one config
made with different numbers of processes, and a projection to Pascal VOC 2007 from the measured
per-image and per-iteration costs, with the arithmetic written out.

    sppnet benchmark --only scale --scale-runs runs/bccd_1p runs/bccd_2p

A run folder is a finished ``sppnet train`` (built from scratch: a stage loaded from an earlier run
counts only its load time), optionally followed by ``sppnet test`` on the same ``output_dir``. It is
read, never run: the section reports what the runs measured (``train_timings.json``,
``train_memory.json``, ``test_<split>/test_timings.json`` and ``eval.json``).

The projection multiplies each stage's measured cost per unit (per training image, per cache entry,
per fine-tuning iteration, per test image) by VOC 2007's count of that unit and divides by the
number of processes: the ideal of sharding by image and of a data-parallel step. It is a projection
for processes of the measured kind with the measured config, not a claim about another trunk or a
GPU; the measured 1-vs-N speed-up on the same machine says how far from ideal the sharding is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

__all__ = ["RunFigures", "ScaleError", "read_run", "section_scale", "VOC07"]

# Pascal VOC 2007 counts (devkit ImageSets/Main) and the spec's fine-tuning schedule (spec §6, code).
VOC07 = {"train images": 5011, "cache entries": 2 * 5011, "iterations": 200000, "test images": 4952}

# the unit each stage's cost is measured in, and VOC 2007's count of it
TRAIN_UNITS = {
    "proposals": "train images",
    "cache": "cache entries",
    "finetune": "iterations",
    "stats": "train images",
    "svm": "train images",
    "bbox": "train images",
}
TEST_UNITS = {"proposals": "test images", "detect": "test images"}
ONE = {"train images": "train image", "cache entries": "cache entry", "iterations": "iteration",
       "test images": "test image"}


class ScaleError(ValueError):
    """A run folder that lacks what the section reads; the message names the file."""


@dataclass
class RunFigures:
    """What one finished run measured.

    Attributes:
        path: the run folder.
        world: processes of the training run (ranks in ``train_memory.json``).
        train_s: training seconds per stage (``total`` included).
        train_peak_mib: peak resident memory per training stage, the largest over the ranks.
        test_s, test_peak_mib: the same for the test run (empty without one).
        counts: the units the stages' costs are measured in (``train images``, ``cache entries``,
            ``iterations``, ``test images``).
    """

    path: Path
    world: int
    train_s: dict[str, float]
    train_peak_mib: dict[str, float]
    test_s: dict[str, float] = field(default_factory=dict)
    test_peak_mib: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def _json(path: Path) -> dict:
    if not path.is_file():
        raise ScaleError(f"{path}: missing (a finished `sppnet train` writes it)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScaleError(f"{path}: unreadable ({e})") from None


def _max_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in per_rank:
        for k, v in d.items():
            out[k] = max(out.get(k, 0.0), float(v))
    return out


def read_run(path: str | Path) -> RunFigures:
    """The figures of one finished run folder (see the module docstring).

    Raises:
        ScaleError: a file the section needs is missing or unreadable (named).
    """
    path = Path(path)
    timings = _json(path / "train_timings.json")
    memory = _json(path / "train_memory.json")
    ranks = memory["ranks"] if "ranks" in memory else [memory]
    if not (path / "resolved_config.yaml").is_file():
        raise ScaleError(f"{path / 'resolved_config.yaml'}: missing (a finished `sppnet train` writes it)")
    cfg = yaml.safe_load((path / "resolved_config.yaml").read_text())
    entries = list((path / "conv5_cache").glob("*.pt"))
    train_split = cfg["data"]["train_split"]
    prop_files = sorted((path / "proposals").glob(f"{train_split}-*.npz"))
    if not prop_files:
        raise ScaleError(f"{path / 'proposals'}: no {train_split}-*.npz proposal file")
    with np.load(prop_files[0], allow_pickle=False) as z:
        n_train = int(z["ids"].shape[0])
    fig = RunFigures(path=path, world=len(ranks), train_s={k: float(v) for k, v in timings.items()},
                     train_peak_mib=_max_over_ranks([r["peak_rss_mib_per_stage"] for r in ranks]),
                     counts={"train images": n_train, "cache entries": len(entries),
                             "iterations": int(cfg["finetune"]["iters"])})
    test = path / f"test_{cfg['data']['test_split']}"
    if (test / "test_timings.json").is_file():
        t = _json(test / "test_timings.json")
        fig.test_s = {k: float(v) for k, v in t["stage_seconds"].items()}
        fig.test_peak_mib = {k: float(v) for k, v in t["peak_rss_mib_per_stage"].items()}
        fig.counts["test images"] = int(_json(test / "eval.json")["images"])
    return fig


def _stage_table(runs: Sequence[RunFigures], phase: str) -> list[str]:
    seconds = [r.train_s if phase == "train" else r.test_s for r in runs]
    peaks = [r.train_peak_mib if phase == "train" else r.test_peak_mib for r in runs]
    stages = [s for s in seconds[0] if s != "total"]
    head = " | ".join(f"{r.world} proc s | peak MiB" for r in runs)
    several = len(runs) > 1
    speed_head = f" speed-up {runs[-1].world} vs {runs[0].world} |" if several else ""
    lines = [f"| {phase} stage | {head} |{speed_head}", "|---" * (2 * len(runs) + 1 + several) + "|"]
    for s in stages + (["total"] if "total" in seconds[0] else []):
        cells = " | ".join(f"{sec.get(s, float('nan')):.1f} | {pk.get(s, max(pk.values(), default=float('nan'))):.0f}"
                           for sec, pk in zip(seconds, peaks))  # total: the largest stage peak
        a, b = seconds[0].get(s), seconds[-1].get(s)
        speed = (f" {a / b:.2f}x |" if a and b else " – |") if several else ""
        lines.append(f"| {s} | {cells} |{speed}")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _projection(base: RunFigures, processes: Sequence[int]) -> tuple[list[str], dict[str, float]]:
    lines = ["| stage | measured cost | VOC 2007 count | " + " | ".join(f"{p} proc" for p in processes) + " |",
             "|---" * (3 + len(processes)) + "|"]
    totals = dict.fromkeys(processes, 0.0)
    ratios: dict[str, float] = {}
    for phase, units, secs in (("train", TRAIN_UNITS, base.train_s), ("test", TEST_UNITS, base.test_s)):
        for stage, unit in units.items():
            if stage not in secs or unit not in base.counts or base.counts[unit] == 0:
                continue
            per = secs[stage] / base.counts[unit]
            n = VOC07[unit]
            cells = []
            for p in processes:
                t = per * n / p
                totals[p] += t
                cells.append(f"{per:.4g} x {n} / {p} = {_duration(t)}")
            ratios[f"{phase}_{stage}_s_per_{unit.replace(' ', '_')}"] = per
            lines.append(f"| {phase} {stage} | {per:.4g} s per {ONE[unit]} "
                         f"({secs[stage]:.1f} s / {base.counts[unit]}) | {n} {unit} | " + " | ".join(cells) + " |")
    lines.append("| total | | | " + " | ".join(_duration(totals[p]) for p in processes) + " |")
    for p in processes:
        ratios[f"voc07_projected_hours_{p}proc"] = totals[p] / 3600
    return lines, ratios


def section_scale(runs: Sequence[str | Path], processes: Sequence[int] = (1, 8, 32)) -> tuple[str, dict[str, float]]:
    """The ``scale`` section from finished run folders of one config (the first with the fewest processes).

    Raises:
        ScaleError: no run folders given, or one lacks a file it needs (named).
    """
    if not runs:
        raise ScaleError("the scale section reads finished run folders: give them with --scale-runs DIR [DIR ...]")
    figs = sorted((read_run(r) for r in runs), key=lambda f: f.world)
    names = ", ".join(f"`{f.path}` ({f.world} process{'es' if f.world > 1 else ''})" for f in figs)
    base = figs[0]
    ratios: dict[str, float] = {}
    for f in figs:
        ratios[f"train_total_s_{f.world}proc"] = f.train_s.get("total", float("nan"))
    parts = [f"Runs: {names}. Seconds and peak resident memory (the largest over the ranks) per stage, "
             f"as each run measured them.", "", *_stage_table(figs, "train")]
    if all(f.test_s for f in figs):
        parts += ["", *_stage_table(figs, "test")]
    proj, r = _projection(base, processes)
    ratios.update(r)
    counts = ", ".join(f"{v} {k}" for k, v in base.counts.items())
    parts += ["", f"Projection to Pascal VOC 2007 ({VOC07['train images']} trainval images with their flipped "
              f"copies, {VOC07['test images']} test images, the spec's {VOC07['iterations']} fine-tuning "
              f"iterations) from the {base.world}-process run's cost per unit ({counts}), divided by the "
              "number of processes (ideal sharding; pre-training is left out: VOC runs start from ImageNet "
              "weights). Same config and the same kind of process as measured: a full-width trunk or a GPU "
              "changes every per-unit cost.", "", *proj]
    return "\n".join(parts), ratios
