"""SPP-net object detection (He, Zhang, Ren, Sun 2014) in PyTorch.

``from detector import SPPDetector`` is resolved lazily so that light modules
(``detector.boxes``, ``detector.data.voc``) import without pulling in the whole pipeline.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["SPPDetector", "build_detector", "__version__"]


def __getattr__(name: str):
    if name in ("SPPDetector", "build_detector"):
        from detector import detector as _d

        return getattr(_d, name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
