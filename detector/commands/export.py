"""sppnet export: write the detector after proposals (image + boxes -> detections) as a program.

    sppnet export --checkpoint runs/digits_zf5/model.pt --out model_program.pt [--format torchscript]
        [--threshold T]

The program takes an image (Tensor[3, H, W] float32 RGB in [0, 1]) and its proposals (Tensor[R, 4]
float32 xyxy pixels) and returns (boxes [N, 4], scores [N], labels [N] int64): pre-processing,
the trunk at every test scale, scale choice, projection, SPP, fc6/fc7, SVMs, NMS and box
regression. What stays outside: the proposals. Selective search (OpenCV) is not a torch operator;
compute the boxes with proposals.propose(image, **options), the options being stored in the
program file (sppnet.json) and in the checkpoint.

Formats: torchscript (works; torch.jit.load(FILE)(image, boxes), class names in
program.class_names). export (torch.export) and onnx are refused with the exporter's reason: greedy
NMS decides from tensor values how far to loop, which torch.export cannot trace, and the ONNX
exporter starts from a torch.export program.
"""
from __future__ import annotations

import argparse
import sys

from detector.cli import run_tool
from detector.export import FORMATS, ExportError, export_detector


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sppnet export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by training")
    p.add_argument("--out", required=True, help="file to write (.pt for torchscript)")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="default: torchscript")
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold fixed in the program (default: the model's test threshold)")
    p.add_argument("--device", default="cpu", help="where the model is loaded to export it (the program is "
                   "written for the CPU; torch.jit.load(..., map_location=...) moves it)")
    args = p.parse_args(argv)

    def body() -> int:
        from detector import SPPDetector

        # the program runs a float32 trunk and fc6/fc7 (at the stored svd_rank) whatever
        # test.fc_precision and test.conv_precision say
        det = SPPDetector.load(args.checkpoint, device=args.device, fc_precision="float32", conv_precision="float32")
        try:
            out = export_detector(det, args.out, args.format, score_threshold=args.threshold)
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out} ({args.format}): program(image [3,H,W] float RGB in [0,1], boxes [R,4] xyxy) -> "
              f"(boxes, scores, labels); proposals stay outside: proposals.propose(image, "
              f"**{det.params.proposal_options})")
        return 0

    return run_tool(body)
