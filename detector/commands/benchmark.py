"""Benchmarks that back the figures in BENCHMARKS.md.

Each section prints machine-readable ``name: value`` lines on stdout and rewrites its own block of
BENCHMARKS.md (between ``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->``), leaving every
other section and any hand-written text untouched.

Sections (``detector.bench.runner`` runs them and rewrites the blocks):
    spp               spp_pool vs one torchvision.ops.roi_pool call per level (detector/bench/spp.py)
    rcnn, detect, selective_search, memory
                      from detector/bench/sections.py
    gpu               (only when named; needs CUDA) detection per image, R-CNN comparison and
                      spp_pool on the GPU: the same code with the model on ``--device`` (cuda)
    scale             (only when named) seconds and peak memory per stage of finished runs of one
                      config with 1 and N processes (--scale-runs), and a VOC 2007 projection
                      (detector/bench/scale.py)
    growth            (only when named) peak memory per stage of finished runs of one config on
                      training sets of different sizes (--growth-runs; detector/bench/growth.py)

Usage (in a checkout, ``python tools/benchmark.py`` is the same command):
    sppnet benchmark --only spp
    sppnet benchmark --only spp --runs 9 --threads 1 --no-write
    THP_MEM_ALLOC_ENABLE=0 sppnet benchmark --only spp   # without huge pages: own block "spp_no_thp"
    sppnet benchmark --save-inputs gpu_inputs/inputs.pt  # here (needs OpenCV contrib), then
    sppnet benchmark --only gpu --inputs gpu_inputs/inputs.pt [--device cuda:1]   # on the GPU machine
    sppnet benchmark --only scale --scale-runs runs/bccd_1p runs/bccd_2p
    sppnet benchmark --only growth --growth-runs runs/d300 runs/d1000 runs/d3000

Timings are wall-clock (time.perf_counter); on a shared machine they are noisy, so each section
reports median, min and max and the load average around the run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from detector.bench.runner import GPU_SECTIONS, RUN_SECTIONS, SECTIONS, run_benchmarks
from detector.bench.sections import save_inputs
from detector.cli import add_device_arg, command_line, run_tool
from detector.engine.run import resolve_device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--runs", type=int, default=7, help="timed runs per implementation (spp section)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="Markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.add_argument("--voc-root", help="memory section: VOC 2007 folder whose trainval image sizes give the "
                   "conv5 cache disk figure (default: 5011 images of 500x375, documented in the section)")
    p.add_argument("--inputs", help="gpu section: photos + proposals saved by --save-inputs (for a GPU machine "
                   "without OpenCV contrib); default: made here")
    p.add_argument("--scale-runs", nargs="+", default=[], metavar="DIR", help="scale section: finished runs")
    p.add_argument("--growth-runs", nargs="+", default=[], metavar="DIR",
                   help="growth section: finished runs of one config on training sets of different sizes")
    p.add_argument("--peers-voc", metavar="ROOT", help="peers section: a VOC-layout data set whose test split's "
                   "images it runs on (default: VOC-sized photos)")
    p.add_argument("--peers-images", type=int, default=24, metavar="N",
                   help="peers section: the first N images of that split (0 = all; default 24)")
    p.add_argument("--save-inputs", metavar="FILE", help="write the timing photos and proposals to FILE and exit")
    add_device_arg(p, "cuda", "gpu section's device (the other sections time the CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not args.save_inputs:
        unknown = [n for n in names if n not in SECTIONS + GPU_SECTIONS + RUN_SECTIONS]
        if unknown or not names:
            p.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        if args.runs < 1:
            p.error("--runs must be >= 1")
        if args.peers_images < 0:
            p.error("--peers-images must be >= 0 (0 = the whole split)")
        if "peers" in names and args.peers_voc and not (Path(args.peers_voc) / "ImageSets" / "Main" / "test.txt").is_file():
            p.error(f"--peers-voc {args.peers_voc}: no ImageSets/Main/test.txt there (a VOC-layout data set)")
        device = resolve_device(args.device) if args.device == "auto" else args.device
        if "gpu" in names and device.startswith("cuda") and not torch.cuda.is_available():
            p.error("--only gpu: no CUDA device is visible to torch")
        if "gpu" in names and not device.startswith("cuda") and not args.no_write:
            p.error(f"--only gpu on {device} is a smoke run: add --no-write")

    def body() -> None:
        if args.save_inputs:
            print(f"wrote {save_inputs(args.save_inputs)}")
            return
        for line in run_benchmarks(names, runs=args.runs, threads=args.threads, out=args.out,
                                   write=not args.no_write, voc_root=args.voc_root, inputs=args.inputs,
                                   device=device, scale_runs=args.scale_runs, growth_runs=args.growth_runs,
                                   peers_voc=args.peers_voc, peers_images=args.peers_images,
                                   argv=command_line(argv)):
            print(line, flush=True)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
