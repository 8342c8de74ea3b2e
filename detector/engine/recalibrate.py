"""Stage ``bnstats``: the pre-trained trunk's BatchNorm statistics re-estimated on whole images.

Runs between ``pretrain`` and ``cache`` when ``pretrain.bn_images`` > 0 (trunks with BatchNorm
pre-trained on crops, :mod:`detector.bn_stats`). It writes ``<output_dir>/pretrain/trunk_bn.pt``:
the classifier checkpoint of the pre-training stage with the trunk's running means and variances
replaced (fc6/fc7 and every other entry unchanged), so every later stage loads it in its place.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from detector import distributed
from detector.artifacts import load_keyed, load_torch, save_keyed
from detector.backbones import build_backbone
from detector.bn_stats import recalibrate_batchnorm
from detector.config import Config
from detector.engine.data import TrainingData
from detector.engine.run import Output, Stage
from proposals.imageio import read_image

__all__ = ["BatchNormStage"]

log = logging.getLogger(__name__)


class BatchNormStage(Stage[str]):
    """The weights file with re-estimated BatchNorm statistics; value: its path (what
    ``build_backbone(weights=...)`` takes).

    Args:
        cfg: ``pretrain.bn_images`` (the first that many fine-tuning images, never the held-out
            ones), ``features.train_scales`` and ``max_size``, ``backbone``.
        data: the training images.
        weights: the pre-training stage's output (a classifier checkpoint).
        out_dir: the run folder.
    """

    name = "bnstats"

    def __init__(self, cfg: Config, data: TrainingData, weights: Output[str], out_dir: Path) -> None:
        super().__init__(weights)
        self.cfg = cfg
        self.records = list(data.finetune)[: cfg.pretrain.bn_images]
        self.path = Path(out_dir) / "pretrain" / "trunk_bn.pt"

    def settings(self) -> object:
        fc = self.cfg.features
        return [[r.image_id for r in self.records], list(fc.train_scales), fc.max_size, self.cfg.backbone]

    def load(self) -> str | None:
        return None if load_keyed(self.path, self.key) is None else str(self.path)

    def build(self) -> str:
        cfg, src = self.cfg, self.inputs[0].value
        if distributed.current().main:  # one pass over a few images: rank 0 writes, the others wait
            bc = cfg.backbone
            net = build_backbone(bc.arch, width_mult=bc.width_mult, weights=src,
                                 input_format=bc.input_format).to(cfg.device).eval()
            images = (read_image(r.path) for r in tqdm(self.records, desc="BatchNorm statistics", unit="img"))
            passes = recalibrate_batchnorm(net, images, cfg.features.train_scales, cfg.features.max_size,
                                           device=cfg.device)
            ckpt = {k: v for k, v in load_torch(src).items() if k != "key"}
            ckpt["backbone"] = {k: v.cpu() for k, v in net.state_dict().items()}
            save_keyed(self.path, self.key, ckpt)
            log.info("BatchNorm statistics of %s re-estimated on %d whole images at scales %s (%d passes) -> %s",
                     src, len(self.records), list(cfg.features.train_scales), passes, self.path)
        distributed.barrier("BatchNorm statistics written")
        return str(self.path)
