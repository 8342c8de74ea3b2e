"""``train(cfg)``: the SPP-net detector's training flow, as a chain of keyed stages.

    proposals -> pretrain [-> bnstats] -> cache -> finetune -> stats -> svm -> bbox -> model

=========  ====================================================================  ===================
stage      what it makes (spec section)                                         where it lives
=========  ====================================================================  ===================
proposals  windows of every training image (§9)                                 proposals/<split>-<key>.npz
pretrain   the trunk's weights: as configured, or a multi-size SPP classifier    pretrain/classifier.pt
           trained on crops (§1, paper §3)
bnstats    only with pretrain.bn_images: the trunk's BatchNorm statistics       pretrain/trunk_bn.pt
           re-estimated on whole training images (detector.bn_stats)
cache      conv5 maps of every training image at every training scale (§2)      conv5_cache/
finetune   fc6/fc7 (+ optionally the trunk's last conv units) on windows (§6)   finetune/head.pt
stats      fc7 and pool5 feature scales (mean L2 norm 20, §7-8)                 stats/stats.pt
svm        per-class linear SVMs with hard-negative mining (§7)                 svm/svm.pt
bbox       per-class ridge box regressors (§8), from samples spilled to disk    bbox/bbox.pt
           per image (removed once fitted; a rerun resumes from them)           bbox/samples-<key>/
model      the detector checkpoint                                              model.pt
=========  ====================================================================  ===================

Each stage's key digests its settings and its inputs' identities (``detector.engine.run``); a
stage whose output is valid for its key is loaded, otherwise built (fine-tuning and pre-training
resume inside the stage from their resume files). ``stop_after`` ends the flow after a stage.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from detector import distributed
from detector.artifacts import content_id, digest, load_keyed, save_keyed, tensor_digest
from detector.backbones import TrunkPrefix, build_backbone, resolve_input_format, weights_input_format
from detector.bbox_reg import BoxRegressor
from detector.bbox_train import train_box_regressors
from detector.cache import Conv5Cache
from detector.checkpoint import CheckpointError, load_detector
from detector.config import Config, config_to_dict
from detector.detector import DetectParams, SPPDetector
from detector.engine.data import TrainingData, training_data
from detector.engine.pretrain import PretrainStage
from detector.engine.proposals import ProposalsStage, mean_count, proposal_options
from detector.engine.recalibrate import BatchNormStage
from detector.engine.run import Output, Run, Stage, StopAfter, peak_memory_mb
from detector.feature_stats import feature_norm_scales
from detector.finetune import CachedWindows, TunedTailWindows, finetune
from detector.head import FCHead
from detector.regions import Conv5Pyramid, ProjectionParams
from detector.spp import spp_out_dim
from detector.svm import LinearSVMs, train_svms
from detector.train_items import TrainItem, make_items

__all__ = ["train", "TRAIN_STAGES", "detect_params"]

log = logging.getLogger(__name__)

TRAIN_STAGES = ("proposals", "pretrain", "bnstats", "cache", "finetune", "stats", "svm", "bbox", "model")


def detect_params(cfg: Config) -> DetectParams:
    """The test-time settings of ``cfg`` (``test.*``, ``features.test_scales`` / ``max_size`` /
    ``target_side``, ``proposals.*``)."""
    t = cfg.test
    return DetectParams(scales=tuple(cfg.features.test_scales), max_size=cfg.features.max_size,
                        target_side=t.target_side or cfg.features.target_side, nms=t.nms,
                        max_per_class=t.max_per_class, score_thresh=t.score_thresh, score=t.score,
                        svd_rank=t.svd_rank, fc_precision=t.fc_precision, conv_precision=t.conv_precision,
                        proposal_options=proposal_options(cfg.proposals))


class Trunk:
    """The backbone from the pre-trained weights, with the fine-tuned tail once it exists; and
    the callables that give a training item's conv5 maps from the cache."""

    def __init__(self, cfg: Config, weights: str, cache: Conv5Cache | None = None) -> None:
        bc = cfg.backbone
        self.cfg, self.n_tail, self.cache = cfg, cfg.finetune.conv_layers, cache
        self.net = build_backbone(bc.arch, width_mult=bc.width_mult, weights=weights,
                                  input_format=bc.input_format).eval()
        self.proj = ProjectionParams.of(self.net, cfg.features.target_side)

    def load_tail(self, state: dict | None) -> None:
        """Put the fine-tuned conv units (``finetune.conv_layers``) into the trunk."""
        if self.n_tail and state is not None:
            torch.nn.ModuleList(self.net.tail_modules(self.n_tail)).load_state_dict(state)

    def cached(self, item: TrainItem) -> Conv5Pyramid:
        """The item's cached maps (before the tail when conv layers are fine-tuned)."""
        assert self.cache is not None
        got = self.cache.get(item.record.image_id, item.flipped)
        if got is None:
            raise RuntimeError(f"conv5 cache: no valid entry for image '{item.record.image_id}' "
                               f"({self.cache.path(item.record.image_id, item.flipped)}); rerun to rebuild it")
        fmaps, sizes = got
        return Conv5Pyramid(fmaps=fmaps, scaled_sizes=sizes, image_size=(item.record.height, item.record.width))

    def pyramid(self, item: TrainItem) -> Conv5Pyramid:
        """The item's conv5 maps: cached, or the (tuned) tail run on the cached prefix."""
        pyr = self.cached(item)
        if self.n_tail:
            with torch.inference_mode():
                pyr.fmaps = [self.net.forward_tail(f.to(self.cfg.device).float().unsqueeze(0), self.n_tail)[0]
                             for f in pyr.fmaps]  # S x (C, Hs, Ws)
        return pyr


class Conv5CacheStage(Stage[Conv5Cache]):
    """conv5 maps (or, with ``finetune.conv_layers``, the maps before the tuned units) of every
    training item at every training scale."""

    name = "cache"

    def __init__(self, cfg: Config, weights: Output[str], items: Sequence[TrainItem], out_dir: Path) -> None:
        super().__init__(weights)
        fc, n_tail = cfg.features, cfg.finetune.conv_layers
        trunk = build_backbone(cfg.backbone.arch, width_mult=cfg.backbone.width_mult, weights=weights.value,
                               input_format=cfg.backbone.input_format).eval()
        folder = Path(fc.cache_dir) if fc.cache_dir else Path(out_dir) / "conv5_cache"
        self.cache = Conv5Cache(folder, key={"prefix_of_tail": n_tail} if n_tail else None,
                                backbone=TrunkPrefix(trunk, n_tail) if n_tail else trunk,
                                scales=fc.train_scales, max_size=fc.max_size, device=cfg.device)
        needed = {it.key: it.record.path for it in items}
        self.entries = [(i, f, p) for (i, f), p in needed.items()]

    def settings(self) -> object:
        return [self.cache.key, [e[:2] for e in self.entries]]

    def build(self) -> Conv5Cache:
        info = distributed.current()
        self.cache.build(distributed.shard(self.entries), progress=info.main)  # each rank its images
        distributed.barrier("conv5 cache entries written")
        log.info("conv5 cache: %d entries, %.1f MB on disk (%s)", len(self.entries),
                 self.cache.disk_bytes() / 2**20, self.cache.root)
        return self.cache

    def identity(self, value: Conv5Cache) -> str:
        return digest(self.key, value.content_id(self.entries))


class FinetuneStage(Stage[dict]):
    """fc6/fc7 and the (K+1)-way classifier fine-tuned on windows (spec §6), with the trunk's last
    ``finetune.conv_layers`` units when set. Value: ``{"head", "tail", "history"}`` state dicts."""

    name = "finetune"

    def __init__(self, run: Run, data: TrainingData, proposals: Output[dict], weights: Output[str],
                 cache: Output[Conv5Cache]) -> None:
        super().__init__(proposals, weights, cache)
        self.run, self.cfg, self.data = run, run.cfg, data
        self.path = run.out / "finetune" / "head.pt"
        self.resume_path = run.out / "finetune" / "resume.pt"

    def settings(self) -> object:
        c, d = self.cfg, self.data
        return [d.class_names, [r.image_id for r in d.finetune], [r.image_id for r in d.held_out],
                c.data.use_flipped, c.features.levels, c.features.target_side, c.finetune, c.head,
                self.fc_from_weights()]

    def fc_from_weights(self) -> bool:
        """Whether the trunk's weights file brings fc layers (:func:`weights_fc_layers`)."""
        return bool(weights_fc_layers(self.inputs[1].value))

    def load(self) -> dict | None:
        return load_keyed(self.path, self.key)

    def build(self) -> dict:
        cfg, (props, weights, cache) = self.cfg, (i.value for i in self.inputs)
        ftc, K = cfg.finetune, len(self.data.class_names)
        self.run.seed()  # dropout draws and the head's init do not depend on the stages before
        trunk = Trunk(cfg, weights, cache)
        D = spp_out_dim(trunk.net.out_channels, cfg.features.levels)
        head = FCHead(D, fc_dim=cfg.head.fc_dim, num_classes=K, dropout=cfg.head.dropout)
        init_fc_from_weights(head, weights, self.data.class_names)  # logs where each layer came from
        ft_items = make_items(self.data.finetune, props, flips=cfg.data.use_flipped)
        val_items = make_items(self.data.held_out, props, flips=False)
        levels = cfg.features.levels
        if ftc.conv_layers:
            log.info("fine-tuning the last %d conv unit(s) of the trunk with fc6/fc7 (finetune.conv_layers)",
                     ftc.conv_layers)
            source = TunedTailWindows(trunk.net, ftc.conv_layers, ft_items, val_items, trunk.cached, levels,
                                      trunk.proj, K, ftc, device=cfg.device)
            desc = f"fine-tune conv tail ({ftc.conv_layers}) + fc"
        else:
            source = CachedWindows(ft_items, val_items, trunk.pyramid, levels, trunk.proj, K, ftc)
            desc = "fine-tune fc6/fc7"
        info = self.run.dist
        resume = load_keyed(self.resume_path, self.key)
        head, hist = finetune(head, source, ftc, resume_state=None if resume is None else resume["state"],
                              save_state=lambda st: save_keyed(self.resume_path, self.key, {"state": st}),
                              device=cfg.device, desc=desc, progress=info.main)
        tail = torch.nn.ModuleList(trunk.net.tail_modules(ftc.conv_layers)).state_dict() if ftc.conv_layers else None
        if not all(bool(torch.isfinite(v).all()) for v in head.state_dict().values()):
            raise FloatingPointError(f"fine-tuning produced non-finite weights (lower finetune.lr); nothing was "
                                     f"saved to {self.path}")
        out = {"head": head.state_dict(), "tail": tail, "history": hist}
        if info.main:
            save_keyed(self.path, self.key, out)
            self.resume_path.unlink(missing_ok=True)
        distributed.barrier("fine-tuned weights written")
        log.info("fine-tuning: best validation error %s at iteration %s", hist.get("best_val_error"),
                 hist.get("best_iter"))
        return out

    def identity(self, value: dict) -> str:
        return digest(self.key, content_id(self.path))


# fc layer names of the weights files the trunk's weights may come with, as FCHead names them
_FC_NAMES = {"fc6.": "fc6.", "fc7.": "fc7.", "cls_score.": "cls_score.",
             "classifier.0.": "fc6.", "classifier.3.": "fc7."}  # the last two: torchvision's VGG


def _read_weights(weights: str) -> dict:
    """The trunk weights file's dict (``weights_only=True``), or {} for ``none``, ``imagenet``, a
    missing file or a file that is not a dict."""
    path = Path(weights)
    if weights in ("none", "imagenet") or not path.is_file():
        return {}
    st = torch.load(path, map_location="cpu", weights_only=True)
    return st if isinstance(st, dict) else {}


def _fc_layers(st: dict) -> dict[str, torch.Tensor]:
    flat = st.get("fc") if isinstance(st.get("fc"), dict) else st.get("state_dict", st)
    if not isinstance(flat, dict):
        return {}
    flat = {k[len("module."):] if k.startswith("module.") else k: v for k, v in flat.items()}
    out = {}
    for k, v in flat.items():
        for prefix, name in _FC_NAMES.items():
            if k.startswith(prefix) and isinstance(v, torch.Tensor):
                out[name + k[len(prefix):]] = v
    return out


def weights_fc_layers(weights: str) -> dict[str, torch.Tensor]:
    """The fc layers a trunk weights file holds, under FCHead's names (``fc6.weight``, ...).

    Where they are: the ``fc`` mapping of an SPP classifier checkpoint (``sppnet classifier``, the
    pre-training stage), or ``fc6.*`` / ``fc7.*`` keys beside the conv keys of a flat state dict (a
    converted paper ZF-5), or torchvision VGG's ``classifier.0`` / ``classifier.3``. Empty for
    ``none``, ``imagenet`` and files without fc layers. Read with ``weights_only=True``.
    """
    return _fc_layers(_read_weights(weights))


def init_fc_from_weights(head: FCHead, weights: str, class_names: Sequence[str]) -> list[str]:
    """Initialise fc6/fc7 from the trunk's weights file where it holds them with the head's shapes
    (paper §4: detection fine-tunes the classification net's fc layers); the others keep their
    spec §1 random init. The (K+1)-way classifier is copied too when the file is a classifier
    trained on the same classes (crops of the same training split). The log says which layer came
    from where.

    Returns:
        the copied parameter names.
    """
    st = _read_weights(weights)  # read once
    fc = _fc_layers(st)
    same_classes = tuple(st.get("class_names", ())) == tuple(class_names)
    prefixes = ("fc6", "fc7") + (("cls_score",) if same_classes else ())
    own = head.state_dict()
    skipped = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in fc.items()
               if k in own and own[k].shape != v.shape and k.startswith(("fc6", "fc7"))]
    bad_layers = {s.split(".")[0] for s in skipped}  # a layer is copied whole or not at all
    copied = [k for k, v in fc.items() if k in own and own[k].shape == v.shape and k.startswith(prefixes)
              and k.split(".")[0] not in bad_layers]
    own.update({k: fc[k] for k in copied})
    head.load_state_dict(own)
    layers = sorted({k.split(".")[0] for k in copied})
    fresh = [n for n in ("fc6", "fc7", "cls_score") if n not in layers]
    log.info("fc layers: %s from %s; %s random (spec §1)%s", ", ".join(layers) or "none", weights,
             ", ".join(fresh) or "none",
             f"; shapes that differ from the head: {', '.join(skipped)}" if skipped else "")
    return copied


class _TunedStage(Stage):
    """A stage that works on the fine-tuned model: rebuilds the trunk (tuned tail loaded) and head."""

    def __init__(self, run: Run, data: TrainingData, proposals: Output[dict], weights: Output[str],
                 cache: Output[Conv5Cache], tuned: Output[dict], *more: Output) -> None:
        super().__init__(proposals, weights, cache, tuned, *more)
        self.run, self.cfg, self.data = run, run.cfg, data
        self.props, self.weights, self.cache, self.tuned = proposals.value, weights.value, cache.value, tuned.value
        self.path = run.out / self.name / f"{self.name}.pt"

    def svm_items(self) -> list[TrainItem]:
        """The training images the SVMs, statistics and box regressors use (no flips, spec §7)."""
        items = make_items(self.data.train, self.props, flips=False)
        return items[: self.cfg.svm.max_images] if self.cfg.svm.max_images else items

    def model(self) -> tuple[Trunk, FCHead]:
        cfg = self.cfg
        trunk = Trunk(cfg, self.weights, self.cache)
        trunk.load_tail(self.tuned["tail"])
        D = spp_out_dim(trunk.net.out_channels, cfg.features.levels)
        head = FCHead(D, fc_dim=cfg.head.fc_dim, num_classes=len(self.data.class_names), dropout=cfg.head.dropout)
        head.load_state_dict(self.tuned["head"])
        return trunk, head.eval()

    def load(self) -> dict | None:
        return load_keyed(self.path, self.key)

    def save(self, out: dict | None) -> dict:
        """Rank 0 writes the stage's output; every rank then returns it (read back where it was not
        computed here)."""
        if self.run.dist.main:
            save_keyed(self.path, self.key, out)
        distributed.barrier(f"stage {self.name} written")
        return out if out is not None else self.load()

    def identity(self, value: dict) -> str:
        return digest(self.key, content_id(self.path))


class FeatureStatsStage(_TunedStage):
    """Scales that bring fc7 and pool5 features to a mean L2 norm of ``svm.feature_norm`` (spec §7-8).
    Value: ``{"feature_scale", "pool_scale"}``."""

    name = "stats"

    def settings(self) -> object:
        s = self.cfg.svm
        return [[r.image_id for r in self.data.train], s.max_images, s.feature_norm, s.stats_images, s.stats_rois,
                self.cfg.seed, self.cfg.features.levels]

    def build(self) -> dict:
        trunk, head = self.model()
        s = self.cfg.svm
        fscale, pscale = feature_norm_scales(head, self.svm_items(), trunk.pyramid, self.cfg.features.levels,
                                             trunk.proj, target_norm=s.feature_norm, max_images=s.stats_images,
                                             max_rois=s.stats_rois, seed=self.cfg.seed, device=self.cfg.device)
        log.info("feature scales: fc7 x%.4f, pool5 x%.4f (mean norm -> %.0f)", fscale, pscale, s.feature_norm)
        return self.save({"feature_scale": fscale, "pool_scale": pscale})


class SVMStage(_TunedStage):
    """Per-class linear SVMs on scaled fc7 with hard-negative mining (spec §7). Value: ``{"W", "b",
    "stats"}``."""

    name = "svm"

    def settings(self) -> object:
        return [self.data.class_names, [r.image_id for r in self.data.train], self.cfg.svm,
                self.cfg.features.levels]

    def build(self) -> dict:
        trunk, head = self.model()
        stats = self.inputs[-1].value
        W, b, info = train_svms(head, self.svm_items(), trunk.pyramid, self.cfg.features.levels, trunk.proj,
                                len(self.data.class_names), stats["feature_scale"], self.cfg.svm,
                                class_names=self.data.class_names, device=self.cfg.device)
        return self.save({"W": W, "b": b, "stats": info})


class BoxRegressionStage(_TunedStage):
    """Per-class ridge regressors from pool5 to box deltas (spec §8); value ``{"weight",
    "feature_scale"}``, or ``{}`` when ``bbox_reg.enabled`` is false."""

    name = "bbox"

    def settings(self) -> object:
        return [self.data.class_names, [r.image_id for r in self.data.train], self.cfg.svm.max_images,
                self.cfg.bbox_reg, self.cfg.seed, self.cfg.features.levels]

    def load(self) -> dict | None:
        return {} if not self.cfg.bbox_reg.enabled else super().load()

    def build(self) -> dict:
        trunk, _ = self.model()
        stats = self.inputs[-1].value
        folder = self.path.parent / f"samples-{self.key}"
        if self.run.dist.main:  # sample folders of other keys are stale
            for old in self.path.parent.glob("samples-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        reg = train_box_regressors(self.svm_items(), trunk.pyramid, self.cfg.features.levels, trunk.proj,
                                   len(self.data.class_names), stats["pool_scale"], self.cfg.bbox_reg,
                                   seed=self.cfg.seed, folder=folder, class_names=self.data.class_names)
        return self.save(None if reg is None else {"weight": reg.weight, "feature_scale": reg.feature_scale})

    def identity(self, value: dict) -> str:
        return self.key if not value else super().identity(value)


class ModelStage(_TunedStage):
    """The detector checkpoint ``model.pt``: the tuned trunk and head, the SVMs, the box regressors
    and the test-time settings."""

    name = "model"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.path = self.run.out / "model.pt"

    def settings(self) -> object:
        return [self.data.class_names, self.cfg.backbone, self.cfg.features.levels, detect_params(self.cfg).to_dict()]

    def load(self) -> SPPDetector | None:
        if not self.path.is_file():
            return None
        try:
            det = load_detector(self.path)
        except CheckpointError as e:
            log.warning("%s; rewriting it", e)
            return None
        return det if det.meta.get("key") == self.key else None

    def build(self) -> SPPDetector:
        cfg = self.cfg
        svm, bbox = self.inputs[-2].value, self.inputs[-1].value
        trunk, head = self.model()
        det = SPPDetector(
            backbone=trunk.net, head=head, svms=LinearSVMs(svm["W"], svm["b"], self.inputs[-3].value["feature_scale"]),
            bbox=BoxRegressor(bbox["weight"], bbox["feature_scale"]) if bbox else None,
            class_names=self.data.class_names, levels=cfg.features.levels, params=detect_params(cfg),
            arch=cfg.backbone.arch, width_mult=cfg.backbone.width_mult,
            meta={"key": self.key, "config": config_to_dict(cfg), "stage_seconds": dict(self.run.timings)},
        )
        if self.run.dist.main:
            det.save(self.path)
        distributed.barrier("model written")
        return det

    def identity(self, value: SPPDetector) -> str:
        return digest(self.key, tensor_digest(value.state_dict()))


def train(cfg: Config, stop_after: str | None = None, argv: Sequence[str] | None = None) -> Path:
    """Train a detector from ``cfg``; returns the path of ``model.pt`` (or of the output folder when
    ``stop_after`` names a stage before the model).

    Everything is written under ``cfg.output_dir`` (log ``train_log.txt``, resolved config, one
    folder per stage, ``train_timings.json`` with each stage's seconds and ``train_memory.json`` with its
    peak resident memory).

    Raises:
        detector.config.ConfigError / detector.data.voc.VOCDataError / ValueError: bad settings or
            data, before any stage runs where they can be seen then.
    """
    if stop_after is not None and stop_after not in TRAIN_STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(TRAIN_STAGES)}, got {stop_after!r}")
    detect_params(cfg)  # test-time settings are checked before hours of training, not after
    bc = cfg.backbone  # weights that declare other pixels than the config asks for: refused now
    fmt = resolve_input_format(bc.arch, bc.input_format, weights_input_format(bc.weights), bc.weights)
    run = Run(cfg, log_name="train_log.txt", stop_after=stop_after, argv=argv)
    log.info("trunk input format: %s (backbone.input_format %s, weights %s)", fmt, bc.input_format, bc.weights)
    cfg = run.cfg  # with the device resolved
    t0 = time.perf_counter()
    data = training_data(cfg)
    log.info("%d classes; %d training images (%d for fine-tuning, %d held out for validation)",
             len(data.class_names), len(data.train), len(data.finetune), len(data.held_out))
    try:
        props = run.stage(ProposalsStage(cfg, cfg.data.train_split, data.with_proposals(), run.out,
                                         cfg.proposals.train_file))
        log.info("proposals: %.0f per image on average", mean_count(props.value))
        weights = run.stage(PretrainStage(cfg, data, run.out))
        if cfg.pretrain.bn_images:
            weights = run.stage(BatchNormStage(cfg, data, weights, run.out))
        items = (make_items(data.finetune, props.value, flips=cfg.data.use_flipped)
                 + make_items(data.held_out, props.value, flips=False) + make_items(data.train, props.value, flips=False))
        cache = run.stage(Conv5CacheStage(cfg, weights, items, run.out))
        tuned = run.stage(FinetuneStage(run, data, props, weights, cache))
        base = (run, data, props, weights, cache, tuned)
        stats = run.stage(FeatureStatsStage(*base))
        svm = run.stage(SVMStage(*base, stats))
        bbox = run.stage(BoxRegressionStage(*base, stats))
        run.stage(ModelStage(*base, stats, svm, bbox))
    except StopAfter as e:
        log.info("stopped after stage %s (--stop-after)", e)
        run.write_fingerprints()
        return run.out
    total = time.perf_counter() - t0
    from detector.artifacts import write_json

    memory = distributed.all_gather({"peak_rss_mib_per_stage": run.peak_rss_mb,
                                     "peak_rss_mib_process": peak_memory_mb()})  # one entry per rank
    if run.dist.main:
        write_json(run.out / "train_timings.json", {**run.timings, "total": total})
        write_json(run.out / "train_memory.json", memory[0] if len(memory) == 1 else {"ranks": memory})
    run.write_fingerprints()
    path = run.out / "model.pt"
    log.info("wrote %s (training took %.1f s this run; stage seconds %s)", path, total,
             {k: round(v, 1) for k, v in run.timings.items()})
    return path
