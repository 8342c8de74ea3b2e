"""The paper's VOC 2007 detection experiment in one command (paper Table 6): train, test at 1 and 5
scales, time SPP-net against R-CNN mode on the same model, and print the measured rows beside the
paper's.

    sppnet reproduce-voc07 --devkit data/VOCdevkit --weights weights/zf5_imagenet.pt \\
        [--rcnn-proposals data/selective_search_data] [--config voc2007_zf5] [--set key=value ...]
    (in a checkout, the same: python tools/reproduce_voc07.py ...)

``--rcnn-proposals`` is a folder with R-CNN's ``voc_2007_trainval.mat`` and ``voc_2007_test.mat``
(the paper's boxes); without it, OpenCV selective search as the config says. Every step is cached
and resumable (``detector.engine.reproduce``); the table is also written to
``<output_dir>/table6.md``. Under ``torchrun`` every step is split across the processes.
"""
from __future__ import annotations

import argparse
import sys

from detector import distributed
from detector.cli import add_device_arg, command_line, run_tool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devkit", required=True, help="VOCdevkit folder (or its VOC2007 folder)")
    p.add_argument("--weights", required=True, help="the trunk's weights file (conv1..conv5 or features.N keys)")
    p.add_argument("--rcnn-proposals", help="folder with R-CNN's voc_2007_trainval.mat and voc_2007_test.mat")
    p.add_argument("--config", default="voc2007_zf5", help="config file or shipped name (default voc2007_zf5)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides, e.g. output_dir=runs/voc07 finetune.iters=100000")
    p.add_argument("--scales-1", type=int, nargs="+", default=[688], help="the 1-scale test (paper: 688)")
    p.add_argument("--scales-5", type=int, nargs="+", default=[480, 576, 688, 864, 1200],
                   help="the multi-scale test (paper: 480 576 688 864 1200)")
    p.add_argument("--compare-images", type=int, default=100, help="test images timed in both modes (paper: 100)")
    add_device_arg(p, None)
    args = p.parse_args(argv)

    def body() -> None:
        from detector.engine.reproduce import reproduce_voc07

        table = reproduce_voc07(args.devkit, args.weights, rcnn_proposals=args.rcnn_proposals, config=args.config,
                                overrides=[*args.overrides, *([f"device={args.device}"] if args.device else [])],
                                scales_1=args.scales_1, scales_5=args.scales_5, compare_images=args.compare_images,
                                argv=command_line(argv))
        if distributed.current().main:
            print(table.text())
            print(f"outputs: {table.out_dir}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
