"""SPP-net object detection (He, Zhang, Ren, Sun 2014) in PyTorch.

``from detector import SPPDetector`` is resolved lazily so that light modules
(``detector.boxes``, ``detector.data.voc``) import without pulling in the whole pipeline.
"""
from __future__ import annotations

import os as _os

# PyTorch's CPU allocator backs every buffer of 2 MB and more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE=1 (pytorch/pytorch#115990): a fresh conv map, pooled matrix or cache tensor
# then takes one page fault per 2 MB instead of 512. On the CPU that is 19 ms of the bfloat16 and
# 49 ms of the float32 full-width ZF-5 trunk pass at 688 px (BENCHMARKS.md, "huge pages"). PyTorch
# reads the variable once, at its first large allocation, so it is set here, on import, unless the
# user has set it: THP_MEM_ALLOC_ENABLE=0 keeps PyTorch's default. Where the kernel has THP off,
# or the process allocated large tensors before importing detector, nothing changes.
HUGE_PAGES_DEFAULTED = "THP_MEM_ALLOC_ENABLE" not in _os.environ
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
__all__ = ["SPPDetector", "DetectParams", "build_detector", "__version__"]


def __getattr__(name: str):
    if name in ("SPPDetector", "DetectParams"):
        from detector import detector as _d

        return getattr(_d, name)
    if name == "build_detector":
        from detector.engine.evaluate import build_detector

        return build_detector
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
