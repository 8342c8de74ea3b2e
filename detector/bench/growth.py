"""The ``growth`` benchmark section: peak memory per stage of finished runs of one config on
training sets of different sizes, so that a stage whose memory grows with the data set shows.

    sppnet benchmark --only growth --growth-runs runs/d300 runs/d1000 runs/d3000

The runs are read, never run (``train_memory.json``, ``train_timings.json``, the proposal file's
image count; see :func:`detector.bench.scale.read_run`). A stage's peak is its own where Linux lets
the high-water mark be reset per stage (``detector.engine.run.reset_stage_peak``): what the process
held during that stage, the model and the stages' shared state included. Each stage's growth is
given per 1000 training images, from the smallest run to the largest, so a stage with flat memory
reads near 0 whatever the sizes measured.
"""
from __future__ import annotations

from typing import Sequence

from detector.bench.scale import ScaleError, read_run

__all__ = ["section_growth"]


def section_growth(runs: Sequence[str]) -> tuple[str, dict[str, float]]:
    """The ``growth`` section from finished run folders of one config (any order).

    Raises:
        ScaleError: fewer than two run folders, or one lacks a file it needs (named).
    """
    if len(runs) < 2:
        raise ScaleError("the growth section compares finished runs on training sets of different sizes: "
                         "give two or more with --growth-runs DIR DIR ...")
    figs = sorted((read_run(r) for r in runs), key=lambda f: f.counts["train images"])
    sizes = [f.counts["train images"] for f in figs]
    if sizes[0] == sizes[-1]:
        raise ScaleError(f"the growth runs all have {sizes[0]} training images; the section compares sizes")
    stages = [s for s in figs[-1].train_peak_mib if s != "model"]
    head = " | ".join(f"{n} images MiB" for n in sizes)
    lines = [f"| stage | {head} | growth per 1000 images | seconds at {sizes[-1]} |",
             "|---" * (len(sizes) + 3) + "|"]
    ratios: dict[str, float] = {}
    span = (sizes[-1] - sizes[0]) / 1000.0
    for s in stages:
        peaks = [f.train_peak_mib.get(s, float("nan")) for f in figs]
        slope = (peaks[-1] - peaks[0]) / span
        ratios[f"growth_{s}_mib_per_1000_images"] = slope
        ratios[f"peak_{s}_mib_{sizes[-1]}_images"] = peaks[-1]
        lines.append(f"| {s} | " + " | ".join(f"{p:.0f}" for p in peaks)
                     + f" | {slope:+.0f} MiB | {figs[-1].train_s.get(s, float('nan')):.0f} |")
    names = ", ".join(f"`{f.path}` ({n} training images)" for f, n in zip(figs, sizes))
    text = "\n".join([f"Runs: {names}. Peak resident memory of each training stage (MiB), and its growth "
                      f"per 1000 training images from {sizes[0]} to {sizes[-1]}.", "", *lines])
    return text, ratios
