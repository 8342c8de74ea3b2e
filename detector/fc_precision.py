"""fc6/fc7 at a lower precision for inference: int8 on the CPU, float16 on CUDA.

Shape shorthand:
    R: windows in one image      D: pooled SPP width (12800 for ZF-5)      F: fc6/fc7 width (4096)

On a CPU the dense fc6/fc7 of 2000 windows are the largest cost of a detection (2 x R x (D F + F F)
multiply-adds, about 2.0 s at full width on 2 cores, against 0.42 s for the conv trunk). Two test-time
options make them cheaper and compose:

- ``svd_rank`` (:meth:`detector.head.FCHead.compress_svd`): fewer multiply-adds;
- ``fc_precision`` (this module): cheaper multiply-adds.

``"int8"``: dynamic quantisation (``torch.ao.quantization.quantize_dynamic``, the fbgemm/x86 kernels):
each weight matrix is stored as int8 with one scale per output row (per-channel), and each call
quantises its input [R, in] with one scale and zero point taken from that input's range, multiplies in
int8 with int32 accumulation, and returns float32. The input range is the whole [R, in] batch's, so a
window's fc7 depends (slightly) on the other windows of its image; the result is deterministic for
the same proposals. CPU only: on CUDA the layers stay float32 (with a warning).

``"float16"``: fc6/fc7 weights and inputs in half precision on CUDA (tensor cores), fc7 returned as
float32 for the SVMs. On a CPU the layers stay float32 (with a warning): CPU half matmuls are slower
than float32 ones.

``"auto"``: int8 on the CPU, float32 on a GPU (float16's mAP change has not been measured on a GPU
here). ``"float32"``: unchanged (the spec's arithmetic). A lowered head is for inference only: checkpoints
hold the float32 layers and the precision as a setting (``params.fc_precision``), which
:meth:`detector.detector.SPPDetector.load` applies, like ``svd_rank``.
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from detector.head import FCHead, LowRankLinear

__all__ = ["FC_PRECISIONS", "lower_fc_precision", "runnable_precision"]

log = logging.getLogger(__name__)

FC_PRECISIONS = ("float32", "int8", "float16", "auto")


def runnable_precision(precision: str, device: torch.device) -> str:
    """The precision fc6/fc7 run at on ``device`` when ``precision`` is asked for: ``"auto"`` is int8
    on the CPU and float32 elsewhere; int8 needs the CPU and float16 a GPU, otherwise float32 with a
    warning saying so."""
    if precision not in FC_PRECISIONS:
        raise ValueError(f"fc_precision must be one of {', '.join(FC_PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "int8" if device.type == "cpu" else "float32"
    if precision == "int8" and device.type != "cpu":
        log.warning("fc_precision int8 (dynamic quantisation) runs on the CPU only; fc6/fc7 stay float32 on %s",
                    device)
        return "float32"
    if precision == "float16" and device.type == "cpu":
        log.warning("fc_precision float16 is for CUDA (CPU half matmuls are slower than float32); fc6/fc7 "
                    "stay float32 on the CPU")
        return "float32"
    return precision


def _fc_linears(head: FCHead) -> dict[str, nn.Linear]:
    """fc6/fc7's Linear layers by module name: the layer itself, or its two SVD factors."""
    out = {}
    for name in ("fc6", "fc7"):
        layer = getattr(head, name)
        parts = {f"{name}.down": layer.down, f"{name}.up": layer.up} if isinstance(layer, LowRankLinear) else {name: layer}
        for key, lin in parts.items():
            if type(lin) is not nn.Linear or lin.weight.dtype != torch.float32:
                raise ValueError(f"{key} is already at a lower precision ({type(lin).__name__})")
        out.update(parts)
    return out


@torch.no_grad()
def lower_fc_precision(head: FCHead, precision: str) -> FCHead:
    """A copy of ``head`` whose fc6/fc7 (dense or SVD factors) run at ``precision``; ``cls_score``
    stays float32. This head is not modified; the copy is in ``eval()`` mode.

    Args:
        head: a float32 head (on the CPU for ``"int8"``).
        precision: one of :data:`FC_PRECISIONS` (see the module docstring).
    Returns:
        FCHead: ``features(x)`` takes Tensor[R, D] float32 and returns Tensor[R, F] (float32 for int8,
        float16 for float16).
    """
    if precision not in FC_PRECISIONS or precision == "auto":
        raise ValueError(f"fc_precision must be one of float32, int8, float16 here, got {precision!r} "
                         "(runnable_precision resolves 'auto' for a device)")
    linears = _fc_linears(head)
    new = copy.deepcopy(head).eval()
    if precision == "float32":
        return new
    if precision == "float16":
        for name in ("fc6", "fc7"):
            getattr(new, name).half()
        return new
    if any(lin.weight.device.type != "cpu" for lin in linears.values()):
        raise ValueError("fc_precision int8 quantises on the CPU; move the head to the CPU first")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch marks torch.ao.quantization and its quantised-tensor constructors as deprecated in
        # favour of torchao; they still build the fbgemm dynamic int8 Linear this option is about,
        # and the warnings would only repeat at every load
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        new = quantize_dynamic(new, qconfig_spec={name: per_channel_dynamic_qconfig for name in linears},
                               dtype=torch.qint8)
    log.info("fc6/fc7 quantised to int8 (dynamic, per-channel weights): %s", ", ".join(linears))
    return new.eval()
