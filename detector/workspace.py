"""Per-thread scratch buffers reused across calls, and large CPU buffers on huge pages.

The SPP kernel (:mod:`detector.spp_kernel`: its sparse table, chunk buffers and, for detection, its
output) and the trunk's inference LRN (:class:`detector.backbones.WithinChannelLRN`: the squared map
and its neighbourhood mean) need map-sized buffers on every image. Allocated afresh, a buffer of
tens of MB is page-faulted on every call, which costs several times as much as refilling a kept
one; so, like a cuDNN workspace, each thread keeps its buffers between calls (:func:`scratch`), up to
a size cap per request. :func:`free_workspace` releases them.

:func:`empty_large` advises a fresh CPU buffer onto 2 MiB huge pages and faults them in from one
thread (BENCHMARKS.md, spp notes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading

import torch
from torch import Tensor

__all__ = ["empty_large", "scratch", "free_workspace", "WORKSPACE_CAP_BYTES"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc ``madvise`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_large(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty`` whose pages the kernel backs with 2 MiB huge pages where it can.

    A large CPU tensor is a fresh ``mmap`` on every call, and its first write takes one page fault per
    4 KiB page, which dominates writing a fresh output of ~100 MB (BENCHMARKS.md, spp notes). So, on
    Linux CPU tensors of 4 MiB and more, the 2 MiB-aligned interior of the buffer is advised
    MADV_HUGEPAGE before anything is written (what PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` does for every
    allocation, here only for the kernel's own buffers). Where THP is off or madvise fails, nothing changes.
    """
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    n = t.numel() * t.element_size()
    if t.is_cuda or n < 2 * _HUGE_PAGE:
        return t
    fn = _madvise()
    if fn is not None:
        a = t.data_ptr()
        lo = -(-a // _HUGE_PAGE) * _HUGE_PAGE
        hi = (a + n) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo and fn(lo, hi - lo, _MADV_HUGEPAGE) == 0:  # advice only: a failure leaves 4 KiB pages
            # fault the huge pages in from this thread, one element each (the kernel zeroes each
            # 2 MiB page once): left to a multi-threaded first write, threads faulting the same huge
            # page wait on each other and the write takes about twice as long
            step = _HUGE_PAGE // t.element_size()
            t.view(-1)[(lo - a) // t.element_size()::step].zero_()
    return t


class _Workspace(threading.local):
    """This thread's buffers, keyed by (name, dtype); CPU only (CUDA has its caching allocator)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


# A buffer grows to the largest request up to its cap; a larger request gets a fresh tensor that is
# not kept (so a rare huge input does not pin its memory).
WORKSPACE_CAP_BYTES = 256 << 20
_workspace = _Workspace()


def free_workspace() -> None:
    """Release the scratch buffers this thread keeps between calls (pooling's and the LRN's)."""
    _workspace.buffers.clear()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device,
            cap_bytes: int = WORKSPACE_CAP_BYTES) -> Tensor:
    """A 1-D uninitialised tensor of ``numel`` elements: on CPU a slice of this thread's buffer
    ``name`` (valid until the next request of that name on this thread), elsewhere or above
    ``cap_bytes`` a fresh tensor."""
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes > cap_bytes:
        return torch.empty(numel, dtype=dtype, device=device)  # CUDA: its caching allocator reuses
    key = (name, dtype)
    buf = _workspace.buffers.get(key)
    if buf is None or buf.numel() < numel:
        _workspace.buffers.pop(key, None)  # drop the old one before allocating the larger one
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            buf = empty_large((numel,), torch.empty(0, device=device), dtype)
        _workspace.buffers[key] = buf
    return buf[:numel]
