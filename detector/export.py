"""Export the detector after proposals: one image and its boxes -> detections, as a program that runs
without this project (TorchScript, ``torch.export``; ONNX where the ops allow).

Shape shorthand:
    R: proposals in one image   S: scales   C: conv5 channels   Hs x Ws: conv5 size at scale s
    D = C*B: pooled width       K: foreground classes           N: detections

What the program holds: everything :meth:`detector.detector.SPPDetector.detect` does once the
proposals are known: pre-processing of a float RGB image in [0, 1], the resize to each test scale,
the trunk, the per-window scale choice and projection (spec §3, §5), SPP (one
``torchvision.ops.roi_pool`` per level), fc6/fc7, the SVMs (plus the softmax term for
``svm+softmax`` models), per-class threshold / NMS / top-k, box regression of the kept boxes and
the second NMS (spec §8-9). It calls the library's own functions for each step
(:func:`detector.pyramid.preprocess_float`, :func:`detector.projection.scale_choice`,
:func:`detector.projection.project_windows`, :func:`detector.postprocess.detections_from_scores`,
:func:`detector.bbox_reg.refine_boxes`), so its detections equal the eager model's
(tests/test_export.py).

What stays outside: **the proposals**. Selective search and EdgeBoxes are OpenCV (``cv2.ximgproc``)
code, not torch operators, so no exporter can record them; compute them with
``proposals.propose(image_uint8_rgb, **det.params.proposal_options)`` (the options the model was
trained with) and pass the boxes in. Image decoding stays outside too.

Signature of every format: ``program(image, boxes) -> (boxes, scores, labels)`` with ``image``
Tensor[3, H, W] float32 RGB in [0, 1] and ``boxes`` Tensor[R, 4] float32 xyxy pixels of that image;
outputs as ``detect()``: float32 [N, 4], float32 [N], int64 [N], by descending score. The score
threshold is fixed when exporting (default: the model's ``params.score_thresh``).

Formats (:data:`FORMATS`):
    torchscript  works. ``torch.jit.script`` of :class:`DetectionProgram`, the trunk inside it traced
                 with ``torch.jit.trace`` (the trunk's channels-last and LRN code is not TorchScript;
                 a trace of convolutions, pools and point-wise ops holds for any image size). Load with
                 ``torch.jit.load(path)`` (no project code needed, only torch and torchvision, whose
                 ``nms``/``roi_pool`` operators it calls); the class names are ``program.class_names``.
    export       refused, with the exporter's message. ``torch.export`` traces everything up to the
                 per-window scores, then stops in the post-processing: greedy NMS is Python control
                 flow on tensor values (``nms_top_per_label`` chooses how many candidates of a class to
                 suppress among from the data, ``if boxes.shape[0] <= m`` and a loop on
                 ``pending.any()``; ``nms_per_label`` loops over ``torch.bincount(labels).tolist()``),
                 and torch.export cannot trace a branch on a value it does not know
                 (``GuardOnDataDependentSymNode: Could not guard on data-dependent expression
                 u3 <= 800``). A rewrite with a fixed loop over the K classes would trace, but would
                 order tied scores differently from the eager code, so the detections could differ.
    onnx         refused for the same reason: the ONNX exporter (``torch.onnx.export(dynamo=True)``)
                 starts from a ``torch.export`` program.

SPP through roi_pool: the eager CPU path pools with the sparse-table kernel
(:mod:`detector.spp_kernel`), the program with ``roi_pool``; both take exact maxima over the same
cells wherever roi_pool's float32 bin edges equal the spec's integer ones, which
:func:`detector.spp._roi_pool_bins_exact` checks for every conv5 side up to
:data:`MAX_EXACT_SIDE`. A model whose levels fail that check is refused at export; a map wider
than that is refused by the program at run time with a message.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.bbox_reg import refine_boxes
from detector.detector import SPPDetector
from detector.postprocess import detections_from_scores
from detector.projection import project_windows, scale_choice
from detector.regions import first_occurrence
from detector.pyramid import hwc_layout, preprocess_float, resized_size
from detector.spp import _roi_pool_bins_exact, _roi_pool_levels

__all__ = ["DetectionProgram", "export_detector", "load_exported", "FORMATS", "MAX_EXACT_SIDE", "ExportError"]

FORMATS = ("torchscript", "export", "onnx")
MAX_EXACT_SIDE = 2048  # conv5 cells: 32768 px at stride 16, beyond any scale of a 10000 px image


_WHY = ("; the post-processing's greedy NMS branches on tensor values, which torch.export cannot trace "
        "(detector/export.py says where); --format torchscript holds the whole program")


class ExportError(RuntimeError):
    """The model cannot be written in the asked format (the reason, often the exporter's, is named)."""


class DetectionProgram(nn.Module):
    """The detector after proposals as one module of plain tensors and library functions that
    TorchScript compiles and ``torch.export`` traces.

    Args:
        det: the eager detector (its weights are copied; it is not changed).
        score_threshold: detections need a score above this (default: ``det.params.score_thresh``).
        trunk: the module run as the trunk (default: a copy of ``det.backbone``; the TorchScript
            export passes a traced copy).
    Forward:
        image (Tensor[3, H, W] float): RGB in [0, 1]. boxes (Tensor[R, 4] float): xyxy pixels.
        Returns (Tensor[N, 4] float32, Tensor[N] float32, Tensor[N] int64): boxes, scores, labels.
    """

    def __init__(self, det: SPPDetector, score_threshold: float | None = None, trunk: nn.Module | None = None):
        super().__init__()
        p = det.params
        levels = [int(n) for n in det.levels]
        if not _roi_pool_bins_exact(tuple(levels), MAX_EXACT_SIDE):
            raise ExportError(f"SPP levels {levels}: torchvision's roi_pool bins differ from the spec's for some "
                              f"conv5 side up to {MAX_EXACT_SIDE}, so the exported program would pool other cells "
                              f"than the eager model (levels 1-6 and 8 are exact)")
        self.trunk = trunk if trunk is not None else copy.deepcopy(det.backbone).eval()
        self.fc6 = copy.deepcopy(det.head.fc6).eval()
        self.fc7 = copy.deepcopy(det.head.fc7).eval()
        self.register_buffer("svm_weight", det.svms.weight.detach().clone())  # (F, K)
        self.register_buffer("svm_bias", det.svms.bias.detach().clone())  # (K,)
        self.svm_scale = float(det.svms.feature_scale)
        self.softmax = p.score == "svm+softmax"
        cls = det.head.cls_score if self.softmax else None
        self.register_buffer("cls_weight", cls.weight.detach().clone() if cls is not None else torch.zeros(0, 0))
        self.register_buffer("cls_bias", cls.bias.detach().clone() if cls is not None else torch.zeros(0))
        self.has_bbox = det.bbox is not None
        self.register_buffer("bbox_weight", det.bbox.weight.detach().clone() if det.bbox is not None
                             else torch.zeros(0, 0))  # (D+1, 4K)
        self.bbox_scale = float(det.bbox.feature_scale) if det.bbox is not None else 1.0
        self.input_format: str = det.backbone.input_format
        self.scales: List[int] = [int(s) for s in p.scales]
        self.max_size = int(p.max_size)
        self.levels: List[int] = levels
        self.stride = int(det.proj.stride)
        self.offset0 = float(det.proj.offset0)
        self.shrink = float(det.proj.shrink)
        self.target_side = float(det.proj.target_side)
        self.nms = float(p.nms)
        self.max_per_class = int(p.max_per_class)
        self.score_threshold = float(p.score_thresh if score_threshold is None else score_threshold)
        self.num_classes = det.num_classes
        self.class_names: List[str] = list(det.class_names)
        self.max_exact_side = MAX_EXACT_SIDE

    def forward(self, image: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h, w = image.shape[1], image.shape[2]
        x = preprocess_float(image.to(torch.float32), self.input_format).unsqueeze(0)  # (1, 3, H, W)
        x = hwc_layout(x)  # (1, 3, H, W) the layout of every single-image pass (detector.pyramid)
        fmaps: List[Tensor] = []
        shorts: List[int] = []
        for s in self.scales:
            hs, ws = resized_size(h, w, s, self.max_size)
            xs = x
            if hs != h or ws != w:
                xs = F.interpolate(x, size=[hs, ws], mode="bilinear", align_corners=False,
                                   antialias=False)  # (1, 3, hs, ws)
            fmaps.append(self.trunk(xs)[0])  # (C, Hs, Ws)
            shorts.append(min(hs, ws))
        dev = fmaps[0].device
        boxes = boxes.to(device=dev, dtype=torch.float32)  # (R, 4)
        b64 = boxes.to(device="cpu", dtype=torch.float64)  # (R, 4) projection arithmetic, as pool_regions
        scale_index = scale_choice(b64, float(min(h, w)), torch.tensor(shorts, dtype=torch.float64),
                                   self.target_side)  # (R,) int64
        nbins = 0
        for n in self.levels:
            nbins += n * n
        keys = torch.zeros((boxes.shape[0], 5), dtype=torch.int64)  # (R, 5) scale index and conv5 window
        keys[:, 0] = scale_index
        for s in range(len(fmaps)):
            fmap = fmaps[s]
            if max(fmap.shape[1], fmap.shape[2]) > self.max_exact_side:
                raise RuntimeError("conv5 map wider than the side up to which roi_pool's bins are checked exact")
            idx = torch.nonzero(scale_index == s).flatten()  # (R_s,)
            keys[idx, 1:] = project_windows(b64[idx], float(min(h, w)), float(shorts[s]), fmap.shape[1], fmap.shape[2],
                                            self.stride, self.offset0, self.shrink)  # (R_s, 4) int64
        # one pooled vector, fc pass and score row per distinct (scale, window), as the eager model
        first, inverse = first_occurrence(keys)  # (U,), (R,)
        ukeys = keys[first]  # (U, 5)
        pooled = torch.zeros((first.shape[0], fmaps[0].shape[0] * nbins), dtype=torch.float32, device=dev)  # (U, D)
        for s in range(len(fmaps)):
            idx = torch.nonzero(ukeys[:, 0] == s).flatten()  # (U_s,)
            pooled[idx.to(dev)] = _roi_pool_levels(fmaps[s].float(), ukeys[idx, 1:].to(dev), self.levels)  # (U_s, D)
        inverse = inverse.to(dev)
        feats = F.relu(self.fc6(pooled))  # (U, F)
        feats = F.relu(self.fc7(feats))  # (U, F)
        scores = torch.addmm(self.svm_bias, feats, self.svm_weight, alpha=self.svm_scale)  # (U, K)
        if self.softmax:
            logp = torch.log_softmax(torch.addmm(self.cls_bias, feats, self.cls_weight.t()), dim=1)  # (U, K + 1)
            scores = scores + logp[:, : self.num_classes]
        scores = scores[inverse]  # (R, K)
        size = [h, w]
        kept = detections_from_scores(boxes, scores, self.score_threshold, self.nms, self.max_per_class, size,
                                      True)
        if not self.has_bbox:
            return kept["boxes"], kept["scores"], kept["labels"]
        lab = kept["labels"]
        rows = kept["window_index"]  # (N,)
        refined = refine_boxes(self.bbox_weight, self.bbox_scale, boxes, pooled, rows, lab, inverse[rows])  # (N, 4)
        n = lab.shape[0]
        sc = torch.full((n, self.num_classes), -math.inf, device=dev, dtype=kept["scores"].dtype)  # (N, K)
        sc[torch.arange(n, device=dev), lab] = kept["scores"]
        out = detections_from_scores(refined, sc, -math.inf, self.nms, self.max_per_class, size, False)
        return out["boxes"], out["scores"], out["labels"]


def _example() -> tuple[Tensor, Tensor]:
    """An example input: a grey 96 x 128 image and two boxes (tracing and export need one)."""
    image = torch.full((3, 96, 128), 0.5)
    boxes = torch.tensor([[8.0, 8.0, 72.0, 64.0], [30.0, 20.0, 120.0, 90.0]])
    return image, boxes


def _trace_trunk(det: SPPDetector) -> torch.jit.ScriptModule:
    trunk = copy.deepcopy(det.backbone).eval()
    x = torch.zeros(1, 3, 96, 128, device=det.device)
    with torch.no_grad():
        return torch.jit.trace(trunk, (x,), check_trace=False)


def export_detector(det: SPPDetector, out: str | Path, fmt: str = "torchscript",
                    score_threshold: float | None = None) -> Path:
    """Write the detector after proposals (module docstring) to ``out`` in ``fmt``.

    Args:
        det: a loaded detector (``SPPDetector.load``); moved to the CPU copy that is exported.
        out: the file to write (``.pt`` for TorchScript, ``.pt2`` for torch.export, ``.onnx``).
        fmt: one of :data:`FORMATS`.
        score_threshold: the fixed score threshold of the program (default: the model's).
    Returns:
        the path written.
    Raises:
        ExportError: an unknown format, fc6/fc7 or the trunk at a lowered precision, levels roi_pool cannot pool
            exactly, or an exporter that
            refuses the program (its first message line is quoted).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if det.fc_precision != "float32":
        raise ExportError(f"fc6/fc7 run at {det.fc_precision}; export the float32 model "
                          "(SPPDetector.load(path, fc_precision='float32'))")
    if det.conv_precision != "float32":
        raise ExportError(f"the trunk runs at {det.conv_precision}; export the float32 model "
                          "(SPPDetector.load(path, conv_precision='float32'))")
    det = copy.deepcopy(det).cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"class_names": list(det.class_names), "signature": "program(image [3,H,W] float RGB 0..1, boxes [R,4] "
            "xyxy) -> (boxes [N,4], scores [N], labels [N] int64)", "proposals": det.params.proposal_options}
    if fmt == "torchscript":
        prog = DetectionProgram(det, score_threshold, trunk=_trace_trunk(det))
        try:
            scripted = torch.jit.script(prog)
        except Exception as e:  # noqa: BLE001 - the compiler's message is the user's answer
            raise ExportError(f"torch.jit.script refused the program: {_first_line(e)}") from e
        tmp = out.with_name(out.name + ".tmp")
        torch.jit.save(scripted, str(tmp), _extra_files={"sppnet.json": json.dumps(meta)})
        tmp.replace(out)
        return out
    prog = DetectionProgram(det, score_threshold).eval()
    image, boxes = _example()
    dims = ({1: torch.export.Dim("height", min=32, max=10000), 2: torch.export.Dim("width", min=32, max=10000)},
            {0: torch.export.Dim("proposals", min=1, max=100000)})
    if fmt == "export":
        try:
            with _quiet_shape_logs():
                ep = torch.export.export(prog, (image, boxes), dynamic_shapes=dims, strict=False)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.export refused the program: {_first_line(e)}{_WHY}") from e
        tmp = out.with_name(out.name + ".tmp")
        torch.export.save(ep, str(tmp), extra_files={"sppnet.json": json.dumps(meta)})
        tmp.replace(out)
        return out
    # ONNX: the exporter starts from torch.export's program, so its refusal is the reason
    try:
        with _quiet_shape_logs():
            torch.export.export(prog, (image, boxes), dynamic_shapes=dims, strict=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export needs a torch.export program first, and torch.export refused it: "
                          f"{_first_line(e)}{_WHY}") from e
    try:
        onnx_prog = torch.onnx.export(prog, (image, boxes), dynamo=True, dynamic_shapes=dims,
                                      input_names=["image", "boxes"], output_names=["boxes", "scores", "labels"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.onnx.export refused the program: {_first_line(e)}") from e
    onnx_prog.save(str(out))
    return out


@contextlib.contextmanager
def _quiet_shape_logs():
    """torch.export logs pages of graph at WARNING when it meets a data-dependent branch; the
    ExportError that follows quotes the line that matters."""
    import io

    lg = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    """The exception's type and first line (torch.export's messages run to pages of graph)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_exported(path: str | Path):
    """Load a TorchScript (``.pt``) or torch.export (``.pt2``) program written by :func:`export_detector`;
    returns a callable ``(image, boxes) -> (boxes, scores, labels)``."""
    path = Path(path)
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path))
