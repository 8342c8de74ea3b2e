"""Running benchmark sections and rewriting their blocks of BENCHMARKS.md (``tools/benchmark.py``).

Each section returns ``(markdown, ratios)``; :func:`run_benchmarks` yields the ratios as
machine-readable ``name: value`` lines and rewrites the section's own block of the Markdown file
(between ``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->``), leaving every other section
and any hand-written text untouched. A block starts with the machine, the time and the command
that wrote it.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import torch

from detector.artifacts import write_text

__all__ = ["SECTIONS", "GPU_SECTIONS", "RUN_SECTIONS",
           "machine_info", "update_section", "run_section", "run_benchmarks"]

log = logging.getLogger(__name__)

SECTIONS = ("spp", "rcnn", "detect", "selective_search", "memory", "batch", "peers")  # the default run, in this order
GPU_SECTIONS = ("gpu",)  # needs CUDA; runs only when named
RUN_SECTIONS = ("scale", "growth")  # read finished training runs (scale_runs, growth_runs); only when named


def machine_info() -> dict[str, str]:
    """CPU model, cores, torch version, threads of this run and GPU name ("none" without CUDA)."""
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


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the block of section ``name`` in a Markdown file, atomically.

    A missing file is started with a short header.
    """
    path = Path(path)
    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nWritten by `sppnet benchmark`; " \
        "each section is rewritten by its own `--only NAME` run.\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)


def run_section(name: str, *, runs: int = 7, voc_root: str | None = None,
                inputs: str | None = None, device: str = "cuda",
                scale_runs: Sequence[str] = (), growth_runs: Sequence[str] = (),
                peers_voc: str | None = None, peers_images: int = 24) -> tuple[str, dict[str, float]]:
    """Run one section (a name of :data:`SECTIONS`, :data:`GPU_SECTIONS` or :data:`RUN_SECTIONS`).

    Args:
        runs: timed runs per implementation (``spp``), of each call (``batch``).
        voc_root: VOC 2007 folder whose trainval image sizes give the cache disk figure (``memory``).
        inputs: photos + proposals written by :func:`detector.bench.sections.save_inputs` (``gpu``).
        device: the device of the ``gpu`` section ("cuda", "cuda:N"; "cpu" is a smoke run).
        scale_runs: finished run folders of one config with different numbers of processes (``scale``).
        growth_runs: finished run folders of one config on training sets of different sizes (``growth``).
        peers_voc, peers_images: VOC-layout root whose test split's first ``peers_images`` images the
            ``peers`` section runs on (None: VOC-sized photos).
    Returns:
        ``(markdown, ratios)``.
    """
    known = SECTIONS + GPU_SECTIONS + RUN_SECTIONS
    if name not in known:
        raise ValueError(f"unknown benchmark section {name!r}; choose from {', '.join(known)}")
    if name == "scale":
        from detector.bench.scale import section_scale

        return section_scale(scale_runs)
    if name == "growth":
        from detector.bench.growth import section_growth

        return section_growth(growth_runs)
    if name == "peers":
        from detector.bench.peers import section_peers

        return section_peers(voc_root=peers_voc, n_images=peers_images, runs=runs)
    if name == "spp":
        from detector.bench.spp import section_spp

        return section_spp(runs=runs)
    from detector.bench import sections

    if name == "memory":
        return sections.section_memory(voc_root=voc_root)
    if name == "gpu":
        return sections.section_gpu(inputs=inputs, device=device)
    if name == "batch":
        return sections.section_batch(runs=runs)
    return getattr(sections, f"section_{name}")()


def run_benchmarks(
    names: Sequence[str],
    *,
    runs: int = 7,
    threads: int = 0,
    out: str | Path = "BENCHMARKS.md",
    write: bool = True,
    voc_root: str | None = None,
    inputs: str | None = None,
    device: str = "cuda",
    scale_runs: Sequence[str] = (),
    growth_runs: Sequence[str] = (),
    peers_voc: str | None = None,
    peers_images: int = 24,
    argv: Sequence[str] = ("python", "tools/benchmark.py"),
) -> Iterator[str]:
    """Run sections in order; yield each one's ``name: value`` lines as it finishes.

    With ``write``, each section then rewrites its block of ``out`` (:func:`update_section`).
    Importing :mod:`detector` turns on PyTorch's huge-page allocation of large CPU tensors
    (``THP_MEM_ALLOC_ENABLE=1``, see ``detector/__init__.py``), so the blocks time what users run;
    a run with ``THP_MEM_ALLOC_ENABLE=0`` in the environment writes its own block
    ``<name>_no_thp``.

    Args:
        names: sections to run (:data:`SECTIONS`, :data:`GPU_SECTIONS`, :data:`RUN_SECTIONS`).
        runs, voc_root, inputs, device, scale_runs, growth_runs, peers_voc, peers_images: see
            :func:`run_section`.
        threads: torch intra-op threads (0 = torch default).
        argv: the command line, recorded in each block.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    info = machine_info()
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    command = ("" if thp else f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')} ") + " ".join(argv)
    for name in names:
        log.info("section %s ...", name)
        md, ratios = run_section(name, runs=runs, voc_root=voc_root, inputs=inputs, device=device,
                                 scale_runs=scale_runs, growth_runs=growth_runs, peers_voc=peers_voc,
                                 peers_images=peers_images)
        for k, v in ratios.items():
            yield f"{k}: {v:.6g}"
        if write:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            block = name if thp else f"{name}_no_thp"  # a run without huge pages keeps its own block
            head = (f"## {block}\n\nMachine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; "
                    f"torch {info['torch']}, {info['threads']} threads; {stamp}.\n"
                    f"Command: `{command}`\n\n")
            update_section(out, block, head + md)
            log.info("updated section %s of %s", block, out)
