"""Benchmarks that back the figures in BENCHMARKS.md.

Each section prints machine-readable ``name: value`` lines on stdout and rewrites its own block of
BENCHMARKS.md (between ``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->``), leaving every
other section and any hand-written text untouched.

Sections:
    spp               spp_pool vs one torchvision.ops.roi_pool call per level
    rcnn, detect, selective_search, memory
                      from detector/bench/sections.py
    gpu               (only when named; needs CUDA) detection per image, R-CNN comparison and
                      spp_pool on the GPU: the same code with the model on "cuda"

Usage:
    python tools/benchmark.py --only spp
    python tools/benchmark.py --only spp --runs 9 --threads 1 --no-write
    THP_MEM_ALLOC_ENABLE=1 python tools/benchmark.py --only spp   # huge pages: own block "spp_thp"
    python tools/benchmark.py --save-inputs gpu_inputs/inputs.pt  # here (needs OpenCV contrib), then
    python tools/benchmark.py --only gpu --inputs gpu_inputs/inputs.pt   # on the GPU machine

Timings are wall-clock (time.perf_counter); on a shared machine they are noisy, so each section
reports median, min and max and the load average around the run.

Shape shorthand: R windows, C conv5 channels, H x W conv5 size, B = sum(n*n) bins.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("benchmark")

EXTERNAL_SECTIONS = ("rcnn", "detect", "selective_search", "memory")  # detector/bench/sections.py
ALL_SECTIONS = ("spp",) + EXTERNAL_SECTIONS
GPU_SECTIONS = ("gpu",)  # needs CUDA; not in the default run


# ---------------------------------------------------------------------------------------------- helpers


def machine_info() -> dict[str, str]:
    """CPU model, cores, torch version and threads of this run."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if m:
            model = m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "gpu": gpu}


def _stats(v: list[float]) -> dict[str, float]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def update_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block of section ``name`` in a Markdown file, atomically."""
    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nWritten by `tools/benchmark.py`; " \
        "each section is rewritten by its own `--only NAME` run.\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- spp


def section_spp(runs: int = 7, n_windows: int = 2000, shape: tuple[int, int, int] = (256, 42, 56),
                seed: int = 0) -> tuple[str, dict[str, float]]:
    """spp_pool vs one ``torchvision.ops.roi_pool`` call per level, levels (1, 2, 3, 6), forward only.

    Windows: ``n_windows`` random inclusive cells with uniform corners (a generator seeded with
    ``seed``) on a post-ReLU random map of ``shape`` (conv5 of a 688 x 917 image has 42 x 56 cells).
    One warm-up call each, then ``runs`` interleaved calls of both.
    """
    from detector.spp import spp_pool, spp_pool_roi_pool

    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    fmap = torch.relu(torch.randn(c, h, w, generator=g))  # (C, H, W)
    xs = torch.randint(0, w, (n_windows, 2), generator=g).sort(dim=1).values
    ys = torch.randint(0, h, (n_windows, 2), generator=g).sort(dim=1).values
    windows = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)  # (R, 4)
    levels = (1, 2, 3, 6)
    load_before = _load()
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
        f"{load_before} / {_load()} (a load above the core count means other processes shared the "
        f"CPU; multi-threaded ATen calls suffer most from that).\n\n"
        "| threads | implementation | median ms | min ms | max ms | speed-up (medians) | "
        "CPU time median ms |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\n**Speed-up at 1 thread (wall-clock medians): "
        f"{ratios['spp_pool_vs_roi_pool_speedup']:.1f}x** (target >= 10x); ratio of median process CPU "
        f"times at 1 thread: {ratios['spp_pool_vs_roi_pool_cpu_time_ratio_1thread']:.1f}x."
    )
    return md, ratios


# ---------------------------------------------------------------------------------------------- main


def run_section(name: str, args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """Run one section with the command-line settings that apply to it."""
    if name == "spp":
        return section_spp(runs=args.runs)
    from detector.bench import sections

    if name == "memory":
        return sections.section_memory(voc_root=args.voc_root)
    if name == "gpu":
        return sections.section_gpu(inputs=args.inputs)
    return getattr(sections, f"section_{name}")()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(ALL_SECTIONS),
                   help=f"comma-separated sections to run (default all: {','.join(ALL_SECTIONS)})")
    p.add_argument("--runs", type=int, default=7, help="timed runs per implementation (spp section)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="Markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.add_argument("--voc-root", help="memory section: VOC 2007 folder whose trainval image sizes give the "
                   "conv5 cache disk figure (default: 5011 images of 500x375, documented in the section)")
    p.add_argument("--inputs", help="gpu section: photos + proposals saved by --save-inputs (for a GPU machine "
                   "without OpenCV contrib); default: made here")
    p.add_argument("--save-inputs", metavar="FILE", help="write the timing photos and proposals to FILE and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.save_inputs:
        from detector.bench import sections

        print(f"wrote {sections.save_inputs(args.save_inputs)}")
        return 0
    unknown = [n for n in names if n not in ALL_SECTIONS + GPU_SECTIONS]
    if unknown or not names:
        p.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(ALL_SECTIONS)}")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info()
    # PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set; it
    # removes most page-fault time of fresh outputs (both implementations allocate ~100 MB per call)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    command = ("THP_MEM_ALLOC_ENABLE=1 " if thp else "") + "python " + " ".join(
        ["tools/benchmark.py"] + (argv if argv is not None else sys.argv[1:]))
    for name in names:
        log.info("section %s ...", name)
        md, ratios = run_section(name, args)
        for k, v in ratios.items():
            print(f"{k}: {v:.6g}", flush=True)
        if not args.no_write:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            head = (f"## {name}\n\nMachine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; "
                    f"torch {info['torch']}, {info['threads']} threads; {stamp}.\n"
                    f"Command: `{command}`\n\n")
            block = f"{name}_thp" if thp else name  # a huge-page run keeps its own block
            update_section(args.out, block, head.replace(f"## {name}", f"## {block}", 1) + md)
            log.info("updated section %s of %s", block, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
