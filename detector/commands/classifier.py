"""Pre-train the trunk as an SPP classifier on crops (paper §3 and Table 2).

    sppnet classifier --config digits_zf5 [--set key=value ...] [--device cpu|cuda|auto]
        [--mode single|multi|random|nospp] [--out DIR]
    sppnet classifier --config digits_zf5 --all-modes [--seeds 0 1]
    (in a checkout, the same: python tools/train_classifier.py ...)

Data: ``data.root`` as a VOC-layout folder (object crops + background crops of the training images
not held out, background = class K), an ImageNet-layout folder ``root/train/<class>/*`` and
``root/val/<class>/*`` (random 224 crops of 256-resized images, decoded by ``pretrain.workers``
threads; scored on val at 1 view, 10 views and the full image, top-1 and top-5: the paper's table
columns), or an image folder ``root/<class>/*.jpg``. Held-out crops come
from the images the detector also holds out (``detector.engine.data``); never from the test split.
Nothing is selected on them: training runs a fixed number of epochs and keeps the last one.

Outputs in ``--out`` (default ``<output_dir>/pretrain``): ``classifier.pt`` (see
``detector.classifier``; ``build_backbone(arch, weights=<it>)`` loads its trunk),
``resolved_config.yaml``, ``metrics.json`` and ``log.txt``. A run whose ``classifier.pt`` was made
under the same configuration and image ids is skipped; an interrupted run resumes after its last
epoch (``resume.pt``).

``--all-modes`` trains the four Table 2 rows (no SPP, single-size, multi-size, random-size) for each
``--seeds`` value into ``<output_dir>/pretrain_modes/<mode>-s<seed>`` and writes the table into the
``classifier`` section of BENCHMARKS.md (other sections are kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from detector import distributed
from detector.cli import add_config_args, command_line, config_from_args, run_tool
from detector.engine.pretrain import classifier_crops, pretrain_classifier, table2, views_table
from detector.engine.run import setup_logging, setup_torch
from detector.pretrain import MODES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--mode", choices=MODES, help="overrides pretrain.mode")
    p.add_argument("--out", type=Path, help="output folder (default <output_dir>/pretrain)")
    p.add_argument("--all-modes", action="store_true", help="train all four modes and write the Table 2 section")
    p.add_argument("--seeds", type=int, nargs="+", help="with --all-modes: pretrain.seed values (default: the config's)")
    p.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"), help="file for the --all-modes table")
    args = p.parse_args(argv)
    command = command_line(argv)

    def body() -> None:
        cfg = config_from_args(args)
        if args.mode:
            cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, mode=args.mode))
        out = args.out or Path(cfg.output_dir) / ("pretrain_modes" if args.all_modes else "pretrain")
        info, device = distributed.init(cfg.device)  # under torchrun: DistributedDataParallel
        cfg = dataclasses.replace(cfg, device=device)
        setup_logging(out, "log.txt", rank=info.rank)
        setup_torch(cfg)
        if args.all_modes:
            print(table2(cfg, out, args.seeds or [cfg.pretrain.seed], args.benchmarks or None, " ".join(command)))
        else:
            m = pretrain_classifier(cfg, out, classifier_crops(cfg), command)
            if not info.main:
                return
            if m.get("views"):
                print(views_table(m))
            print(f"classifier: {out / 'classifier.pt'} (held-out top-1 error {m[f'error_{max(cfg.pretrain.sizes)}']:.4f})")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
