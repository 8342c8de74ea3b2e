"""The trunk's convolutions at a lower precision for inference: bfloat16 where the hardware has it.

Shape shorthand:
    C: conv5 channels      Hs x Ws: conv5 size at one scale

With fc6/fc7 made cheap (``svd_rank`` and ``fc_precision``), the trunk is the largest cost of a
full-width ZF-5 detection on a CPU (BENCHMARKS.md, ``detect``). ``"bfloat16"`` runs the trunk under
``torch.autocast`` in bfloat16: convolutions take bfloat16 inputs and weights and accumulate in
float32 (oneDNN's kernels on a CPU with AVX512-BF16 or AMX; tensor cores on a GPU); the conv5 maps
come back in bfloat16 and SPP pooling writes their bins as float32 (exactly the values of a float32
copy, at half the pooling bytes), so fc6/fc7, the SVMs and the box regressors are unchanged. The
maps differ from float32 ones by bfloat16's 8-bit mantissa (a relative error of about 0.2-0.3% on
random ZF-5 weights), which is why the option is a measured test-time deviation, not the default.

A CPU without native bfloat16 arithmetic emulates it, slower than float32, so there the trunk stays
float32 with a warning, as ``fc_precision`` does with an option the device cannot run. Checkpoints
store the setting (``params.conv_precision``); the weights stay float32.
"""
from __future__ import annotations

import logging

import torch

__all__ = ["CONV_PRECISIONS", "conv_dtype", "native_bfloat16", "runnable_conv_precision"]

log = logging.getLogger(__name__)

CONV_PRECISIONS = ("float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: AVX512-BF16 or AMX on a CPU (``torch.cpu``'s
    feature checks), ``torch.cuda.is_bf16_supported()`` on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(check()) for check in checks if check is not None)
    return False


def runnable_conv_precision(precision: str, device: torch.device) -> str:
    """The precision the trunk runs at on ``device`` when ``precision`` is asked for: bfloat16 only
    where it is native (:func:`native_bfloat16`), otherwise float32 with a warning saying so."""
    if _checked(precision) == "bfloat16" and not native_bfloat16(device):
        log.warning("conv_precision bfloat16: %s has no native bfloat16 arithmetic (it would be emulated, slower "
                    "than float32); the trunk stays float32", device)
        return "float32"
    return precision


def conv_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` for :func:`detector.pyramid.trunk_pyramid` (None = float32)."""
    return torch.bfloat16 if _checked(precision) == "bfloat16" else None


def _checked(precision: str) -> str:
    if precision not in CONV_PRECISIONS:
        raise ValueError(f"conv_precision must be one of {', '.join(CONV_PRECISIONS)}, got {precision!r}")
    return precision
