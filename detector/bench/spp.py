"""Benchmark section ``spp``: :func:`detector.spp.spp_pool` vs one ``torchvision.ops.roi_pool`` call
per pyramid level, on the CPU, at one thread and at torch's thread count.

Shape shorthand (one alphabet for the whole project):
    R: windows      C: conv5 channels      H x W: conv5 size      B = sum(n*n): SPP bins
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

__all__ = ["section_spp"]


def _stats(v: list[float]) -> dict[str, float]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def _load_average() -> str:
    """The 1/5/15-minute load averages as ``"a/b/c"`` ("n/a" where the OS has none)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def section_spp(runs: int = 7, n_windows: int = 2000, shape: tuple[int, int, int] = (256, 42, 56),
                seed: int = 0) -> tuple[str, dict[str, float]]:
    """spp_pool vs one ``torchvision.ops.roi_pool`` call per level, levels (1, 2, 3, 6), forward only.

    Windows: ``n_windows`` random inclusive cells with uniform corners (a generator seeded with
    ``seed``) on a post-ReLU random map of ``shape`` (conv5 of a 688 x 917 image has 42 x 56 cells).
    One warm-up call each, then ``runs`` interleaved calls of both.

    Returns:
        ``(markdown, ratios)``: the section's Markdown body and its ``name: value`` figures.
    """
    from detector.spp import spp_pool, spp_pool_roi_pool

    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    fmap = torch.relu(torch.randn(c, h, w, generator=g))  # (C, H, W)
    xs = torch.randint(0, w, (n_windows, 2), generator=g).sort(dim=1).values
    ys = torch.randint(0, h, (n_windows, 2), generator=g).sort(dim=1).values
    windows = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)  # (R, 4)
    levels = (1, 2, 3, 6)
    load_before = _load_average()
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "spp_pool": lambda: spp_pool(fmap, windows, levels),
        "roi_pool": lambda: spp_pool_roi_pool(fmap, windows, levels),
    }
    outs = {k: f() for k, f in fns.items()}  # warm-up (and the equality check)
    equal = torch.equal(outs["spp_pool"], outs["roi_pool"])
    del outs
    default_threads = torch.get_num_threads()
    # one thread first (roi_pool's CPU kernel is a serial loop, so this compares the algorithms),
    # then torch's thread count if it differs (what a user gets)
    thread_counts = [1] + ([default_threads] if default_threads > 1 else [])
    ratios: dict[str, float] = {}
    rows = []
    for nt in thread_counts:
        torch.set_num_threads(nt)
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for _ in range(runs):
                for k, f in fns.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    f()
                    times[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        st = {k: _stats(v) for k, v in times.items()}
        speedup = st["roi_pool"]["median"] / st["spp_pool"]["median"]
        cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
        tag = f"_{nt}thread" + ("s" if nt > 1 else "")
        for k in fns:
            for q in ("median", "min", "max"):
                ratios[f"{k}_{q}_s{tag}"] = st[k][q]
            ratios[f"{k}_cpu_median_s{tag}"] = cpu_med[k]
        ratios[f"spp_pool_vs_roi_pool_speedup{tag}"] = speedup
        # process CPU time: less sensitive to other processes than wall-clock time on a shared
        # machine (at 1 thread it is the work done; with more threads it adds up every thread)
        ratios[f"spp_pool_vs_roi_pool_cpu_time_ratio{tag}"] = cpu_med["roi_pool"] / cpu_med["spp_pool"]
        for name, key in (("`spp_pool` (sparse table, one call)", "spp_pool"),
                          ("`roi_pool` x 4 levels + cat", "roi_pool")):
            s = st[key]
            rows.append(f"| {nt} | {name} | {s['median'] * 1e3:.1f} | {s['min'] * 1e3:.1f} | "
                        f"{s['max'] * 1e3:.1f} | {speedup:.1f}x | {cpu_med[key] * 1e3:.1f} |")
    torch.set_num_threads(default_threads)
    ratios["spp_pool_vs_roi_pool_speedup"] = ratios["spp_pool_vs_roi_pool_speedup_1thread"]
    ratios["spp_pool_equals_roi_pool"] = float(equal)
    md = (
        f"{n_windows} random windows (uniform corners, seed {seed}) on a post-ReLU [{c}, {h}, {w}] "
        f"float32 map, levels {levels}, forward only, {runs} interleaved runs per thread setting after "
        f"one warm-up. Outputs identical: {'yes' if equal else 'NO'}. Load average before/after: "
        f"{load_before} / {_load_average()} (a load above the core count means other processes shared the "
        f"CPU; multi-threaded ATen calls suffer most from that).\n\n"
        "| threads | implementation | median ms | min ms | max ms | speed-up (medians) | "
        "CPU time median ms |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\n**Speed-up at 1 thread (wall-clock medians): "
        f"{ratios['spp_pool_vs_roi_pool_speedup']:.1f}x** (target >= 10x); ratio of median process CPU "
        f"times at 1 thread: {ratios['spp_pool_vs_roi_pool_cpu_time_ratio_1thread']:.1f}x."
    )
    return md, ratios
