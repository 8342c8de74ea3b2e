"""SPP-net object detection (He, Zhang, Ren, Sun 2014) in PyTorch.

``from detector import SPPDetector`` is resolved lazily so that light modules
(``detector.boxes``, ``detector.data.voc``) import without pulling in the whole pipeline.
"""
from __future__ import annotations

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
