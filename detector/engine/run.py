"""A run of the engine: its output folder, logging, seeds, and the stages it loads or builds.

A stage is one keyed step of a flow (:class:`Stage`): it names its inputs (the outputs of earlier
stages), computes a key of everything that affects its output (its settings and its inputs'
identities), and either loads a valid output for that key or builds it. What a stage returns is
an :class:`Output`: its value and its *identity*, the key plus a digest of the output's content
where one is cheap to read (zip CRCs), which the stages downstream put in their own keys. So a
changed setting, or an input that was rebuilt into other bytes, rebuilds everything downstream;
a stage whose key is unchanged is loaded, not recomputed.

Randomness. Every stage that draws random numbers from torch's or numpy's global generators seeds
them itself at its start (:meth:`Run.seed`), so its result does not depend on which stages were
loaded and which were built before it in the same process: a rerun after a kill gives the result
of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Sequence, TypeVar

import numpy as np
import torch

from detector import distributed
from detector.artifacts import digest
from detector.config import Config, ConfigError, save_config

__all__ = ["Run", "Stage", "Output", "StopAfter", "setup_logging", "setup_torch", "resolve_device", "peak_memory_mb",
           "reset_stage_peak", "stage_peak_mb"]

log = logging.getLogger("sppnet")

T = TypeVar("T")


@dataclass(frozen=True)
class Output(Generic[T]):
    """A stage's value and its identity (what downstream keys are made of)."""

    value: T
    identity: str


class StopAfter(Exception):
    """Raised by :meth:`Run.stage` after the stage named by ``stop_after`` (its output is kept)."""


class Stage(Generic[T]):
    """One keyed step. Subclasses set ``name``, and implement :meth:`settings`, :meth:`load` and
    :meth:`build` (and :meth:`identity` when their output's content can be digested cheaply).

    Args:
        inputs: the outputs of earlier stages this one is made from.
    """

    name: str = ""

    def __init__(self, *inputs: Output) -> None:
        self.inputs = inputs

    def settings(self) -> Any:
        """The JSON-able settings that change this stage's output (config sections, ids)."""
        return None

    @property
    def key(self) -> str:
        """Digest of the stage name, its settings and its inputs' identities."""
        if not hasattr(self, "_key"):
            self._key = digest(self.name, self.settings(), [i.identity for i in self.inputs])
        return self._key

    def load(self) -> T | None:
        """The output made under :attr:`key`, checked, or None when there is none (or it is stale
        or damaged)."""
        return None

    def build(self) -> T:
        """Compute (and store) the output."""
        raise NotImplementedError

    def identity(self, value: T) -> str:
        """The output's identity; by default the key (outputs that are a function of the key)."""
        return self.key


def setup_logging(out_dir: Path | None = None, name: str = "log.txt", rank: int = 0) -> None:
    """INFO logging to stderr and to ``out_dir/name`` when given; in a distributed job only rank 0
    does that, every other rank logs to ``out_dir/logs/rank<R>.txt``."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if rank:
        fmt = f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
        errors = logging.StreamHandler(sys.stderr)  # a failing rank says so on the console too
        errors.setLevel(logging.ERROR)
        handlers: list[logging.Handler] = [errors]
        if out_dir is not None:
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(out_dir / "logs" / f"rank{rank}.txt"))
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(out_dir / name))
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


def resolve_device(name: str) -> str:
    """``device`` of the config as torch takes it: "auto" is CUDA when available, else the CPU.

    Raises:
        ConfigError: a CUDA device asked for on a machine without one.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for, but torch sees no CUDA device here (use cpu or auto)")
    return name


def setup_torch(cfg: Config) -> None:
    """torch's intra-op threads (``num_threads``, 0 = torch's default) and the global seeds."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)


# environment variables that choose the kernels of torch (ATen, oneDNN), MKL, OpenBLAS and OpenCV
NUMERIC_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                    "MKL_CBWR", "OPENBLAS_CORETYPE", "OPENCV_CPU_DISABLE", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# the instruction-set extensions whose kernels the libraries above choose between at run time
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx_vnni", "amx_tile")


def numeric_environment() -> dict[str, str]:
    """What can change floating-point results between machines: library versions, the CPU, its
    instruction-set extensions, the kernels torch and OpenCV dispatch to, thread counts and the
    environment variables that override those choices.

    RELIABILITY.md measures which stage each of them changes first.
    """
    import platform

    import cv2

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:  # the first CPU's model name and flags
            for ln in f:
                if ln.startswith("model name") and not model:
                    model = ln.split(":", 1)[1].strip()
                elif ln.startswith("flags"):
                    flags = set(ln.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cpu = model or platform.processor() or "unknown"
    env = {k: os.environ[k] for k in NUMERIC_ENV_VARS if k in os.environ}
    return {"torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
            "cpu": cpu, "cpu_simd": " ".join(f for f in SIMD_FLAGS if f in flags) or "unknown",
            "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "opencv_cpu_features": cv2.getCPUFeaturesLine(),
            "torch_threads": str(torch.get_num_threads()), "python": platform.python_version(),
            "env": " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(none set)"}


# The largest high-water mark read before a reset: the process's own peak survives the per-stage
# resets, which also lower what getrusage (and so /usr/bin/time) reports for this process.
_PEAK_BEFORE_RESETS_KB = 0


def _vm_hwm_kb() -> int | None:
    """``VmHWM`` of this process in kB, or None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_stage_peak() -> bool:
    """Start a new peak-memory window for this process: Linux resets the ``VmHWM`` high-water mark
    when ``5`` is written to ``/proc/self/clear_refs``. Returns False where that is not possible
    (another OS, a restricted /proc): :func:`stage_peak_mb` then reports the process's peak so far.

    The kernel's reset also lowers the process's ``ru_maxrss``, which ``/usr/bin/time -v`` reports:
    the peak before the reset is kept here, and :func:`peak_memory_mb` includes it."""
    global _PEAK_BEFORE_RESETS_KB
    _PEAK_BEFORE_RESETS_KB = max(_PEAK_BEFORE_RESETS_KB, _vm_hwm_kb() or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stage_peak_mb() -> float:
    """This process's peak resident memory since :func:`reset_stage_peak`, in MiB (``VmHWM``); the
    process's peak so far where /proc is not there."""
    hwm = _vm_hwm_kb()
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb() -> float:
    """Peak resident memory of this process (across the per-stage resets of :func:`reset_stage_peak`)
    and of its finished children, in MiB."""
    own = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _PEAK_BEFORE_RESETS_KB, _vm_hwm_kb() or 0)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


class Run:
    """The context of one ``train`` or ``evaluate`` call.

    Opening a run creates ``out_dir``, sends the log there (``log_name``), sets the torch thread
    count and seeds, and writes the resolved config with the command line.

    Args:
        cfg: the resolved config.
        out_dir: where outputs go (default ``cfg.output_dir``).
        log_name: the log file's name in ``out_dir``.
        stop_after: a stage name; :meth:`stage` raises :class:`StopAfter` once it has run.
        argv: the command line to record (default ``sys.argv``).
    """

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, log_name: str = "log.txt",
                 stop_after: str | None = None, argv: Sequence[str] | None = None) -> None:
        self.dist, device = distributed.init(resolve_device(cfg.device))
        self.cfg = cfg = dataclasses.replace(cfg, device=device)
        self.out = Path(out_dir or cfg.output_dir)
        self.stop_after = stop_after
        self.timings: dict[str, float] = {}
        # each stage's peak resident memory of this process (MiB), its own where Linux lets the
        # high-water mark be reset (reset_stage_peak), else the process's peak up to that stage
        self.peak_rss_mb: dict[str, float] = {}
        self.identities: dict[str, str] = {}  # stage -> identity (its settings, inputs and content)
        setup_logging(self.out, log_name, rank=self.dist.rank)
        setup_torch(cfg)
        log.info("device %s, %d torch threads%s", cfg.device, torch.get_num_threads(),
                 f"; rank {self.dist.rank} of {self.dist.world}" if self.dist.active else "")
        if self.dist.main:
            save_config(cfg, self.out, list(argv) if argv is not None else sys.argv)

    def seed(self, offset: int = 0) -> None:
        """Seed torch's and numpy's global generators with ``cfg.seed + offset``."""
        torch.manual_seed(self.cfg.seed + offset)
        np.random.seed(self.cfg.seed + offset)

    def write_fingerprints(self, name: str = "fingerprints.json") -> Path:
        """Write each finished stage's identity and the numeric environment to ``out/name``.

        Two runs of one config on two machines can be compared file to file: the first stage whose
        identity differs is where their results part (every later identity differs with it).
        """
        from detector.artifacts import write_json

        if not self.dist.main:
            return self.out / name
        return write_json(self.out / name, {"stages": self.identities, "environment": numeric_environment(),
                                            "world_size": self.dist.world})

    def stage(self, stage: Stage[T]) -> Output[T]:
        """Load ``stage``'s output for its key, or build it; log which and how long it took.

        In a distributed job every rank takes part: the output is loaded only when every rank can
        load it, otherwise every rank builds (a stage's build splits its work across the ranks and
        ends once every rank's share is written). A failure is logged with the rank and the stage.
        """
        t0 = time.perf_counter()
        reset_stage_peak()
        try:
            value = stage.load()
            reused = all(distributed.all_gather(value is not None))
            if not reused:
                log.info("stage %s: building (key %s)", stage.name, stage.key)
                value = stage.build()
            out = Output(value, stage.identity(value))
        except StopAfter:
            raise
        except BaseException as e:
            if self.dist.active:
                log.error("rank %d of %d failed in stage %s: %s: %s", self.dist.rank, self.dist.world, stage.name,
                          type(e).__name__, e)
            raise
        self.identities[stage.name] = out.identity
        self.timings[stage.name] = time.perf_counter() - t0
        self.peak_rss_mb[stage.name] = stage_peak_mb()
        log.info("stage %s: %s in %.1f s, peak memory %.0f MiB", stage.name, "loaded" if reused else "built",
                 self.timings[stage.name], self.peak_rss_mb[stage.name])
        if self.stop_after == stage.name:
            raise StopAfter(stage.name)
        return out

