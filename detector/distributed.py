"""torch.distributed for the engine: the same flow on several processes, GPUs or machines.

Launch with PyTorch's own launcher; plain ``python`` runs one process exactly as before::

    torchrun --nproc-per-node 2 tools/train_detector.py --config configs/x.yaml
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT tools/train_detector.py --config configs/x.yaml

:func:`init` joins the process group that torchrun describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, rendezvous): NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``, gloo
on the CPU. It is a no-op when the process was not launched by torchrun (or with one process).

How the stages use it (``detector.engine``): per-image work is split by index (:func:`shard`, rank
``r`` takes items ``r, r + W, r + 2W, ...``); every rank writes its own per-image outputs, atomically,
to the shared ``output_dir``; a stage ends with a :func:`barrier`, and the next stage reads every
image's output. Results that are small (per-image statistics, per-class SVMs) are gathered with
:func:`all_gather`. Only rank 0 writes shared files that are not per image, draws progress bars and
logs to the console; every other rank logs to ``<output_dir>/logs/rank<R>.txt``.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "launched", "current", "shard", "barrier", "all_gather", "broadcast", "finish"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank (GPU index on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0, the process that writes shared files and talks to the user."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world > 1


_SINGLE = DistInfo()


def launched() -> bool:
    """Whether torchrun started this process with more than one process in the job."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> DistInfo:
    """This process's :class:`DistInfo` (rank 0 of 1 outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _SINGLE
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str, timeout_minutes: float = 60.0) -> tuple[DistInfo, str]:
    """Join torchrun's process group (once); returns this rank's info and device.

    Args:
        device: the configured device ("cpu", "cuda", "cuda:N"); with CUDA each rank takes
            ``cuda:LOCAL_RANK``.
        timeout_minutes: how long a collective may wait for a rank that does not arrive (a rank
            that died makes the others fail then; torchrun names the failed rank first).
    Returns:
        (info, device of this rank).
    """
    if not launched():
        return _SINGLE, device
    cuda = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    info = current()
    log.info("rank %d of %d (local rank %d) on %s, backend %s", info.rank, info.world, info.local_rank, device,
             dist.get_backend())
    return info, device


def shard(items: Sequence[T], info: DistInfo | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from index ``rank`` (deterministic)."""
    info = info or current()
    return list(items[info.rank::info.world])


def barrier(what: str = "") -> None:
    """Wait until every rank reaches this point (no-op with one process)."""
    if current().active:
        if what:
            log.debug("barrier: %s", what)
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` with one process."""
    info = current()
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable)."""
    if not current().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def finish() -> None:
    """Leave the process group (at the end of a tool run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
