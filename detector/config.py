"""Configuration: one frozen dataclass per stage, the only place where defaults live.

The defaults are the paper's / the released code's values (``../shared/spec/SPP_NET_SPEC.md``, cited
by section). A YAML file in ``detector/configs/`` (package data; ``configs/`` at the repository
root links to it) holds one experiment's overrides only; :func:`load_config` finds it by path or by
its bare name, rejects unknown keys and values of the wrong type, then checks every value against
the rule declared with its field (range, choices, agreement with other fields) and reports all
broken rules at once, before any work starts. It returns a frozen :class:`Config`.

Only the engine (``detector.engine``: its stages, ``train``, ``evaluate``, ``build_detector``) and
the commands (``detector.commands``) read a Config; library code takes explicit arguments, or one config section as its
parameters dataclass (``FinetuneConfig``, ``SVMConfig``, ``BBoxRegConfig``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "ProposalConfig",
    "BackboneConfig",
    "PretrainConfig",
    "FeatureConfig",
    "HeadConfig",
    "FinetuneConfig",
    "SVMConfig",
    "BBoxRegConfig",
    "TestConfig",
    "ConfigError",
    "load_config",
    "resolve_config_path",
    "packaged_configs",
    "PACKAGED_CONFIGS",
    "config_to_dict",
    "save_config",
    "config_from_dict",
    "check_config",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # devkit order (VOCinit.m); foreground ids 0..19 follow it


Arch = Literal["zf5", "zf5_bn", "vgg16", "resnet50", "resnet18", "mobilenet_v3"]  # detector.backbones.ARCHS

# Stride-16 conv units at the end of each trunk that finetune.conv_layers may tune: the
# ``tail_units`` of the trunk classes in detector/backbones.py, repeated here so that loading a
# config needs no torch (tests/test_config.py checks that the two agree).
TAIL_UNITS: dict[str, int] = {"zf5": 3, "zf5_bn": 3, "vgg16": 3, "resnet50": 5, "resnet18": 1, "mobilenet_v3": 5}
# Smallest input side (px) that leaves each trunk a non-empty conv5 map
# (detector.backbones.conv5_size; tests/test_config.py checks it). Scales and crop sizes under it fail.
# The trunks with a width multiplier (detector.backbones.WIDTH_ARCHS; tests/test_config.py checks it).
WIDTH_ARCHS: tuple[str, ...] = ("zf5", "zf5_bn", "resnet18")
# The trunks with BatchNorm layers (detector.bn_stats.batchnorm_layers; tests/test_bn_stats.py checks it).
BN_ARCHS: tuple[str, ...] = ("zf5_bn", "resnet50", "resnet18", "mobilenet_v3")
MIN_INPUT_SIDE: dict[str, int] = {"zf5": 31, "zf5_bn": 31, "vgg16": 16, "resnet50": 1, "resnet18": 1, "mobilenet_v3": 1}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema: unknown key, wrong type, a value
    outside its range or choices, or values that contradict each other. The message names every
    such key."""


# ----------------------------------------------------------------------------------------------
# value rules
#
# A field's own rule sits in its annotation, ``Annotated[type, rule]``; a rule that relates several
# fields is in its section's ``problems()``. :func:`check_config` runs both after the merge and
# reports every broken rule at once. Every float must also be finite, except in fields marked
# MINUS_INF_OK, where -inf means "no threshold" (test.score_thresh) or "never" (svm.evict_thresh).


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` tells whether a value is allowed; ``text`` completes "<key> must be ..."."""

    ok: Callable[[Any], bool]
    text: str


MINUS_INF_OK = "-inf allowed"  # annotation marker (see above)


def at_least(lo: float, note: str = "") -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}" + (f" ({note})" if note else ""))


def above(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Rule(ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


NON_EMPTY = Rule(lambda v: len(v) > 0, "non-empty")
DISTINCT = Rule(lambda v: len(set(v)) == len(v), "free of repeats")
INCREASING = Rule(lambda v: all(a < b for a, b in zip(v, v[1:])), "strictly increasing")
DEVICE = Rule(lambda v: re.fullmatch(r"cpu|cuda|cuda:\d+|auto", v) is not None,
              "'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available, else CPU)")

PosInt = Annotated[int, at_least(1)]
def added(default: Any) -> Any:
    """A field added after runs existed, whose ``default`` keeps the old behaviour: at that default
    it is left out of stage keys (detector.artifacts.KEYLESS_AT_DEFAULT), so the runs stay valid."""
    return field(default=default, metadata={"keyless_at_default": True})


Count = Annotated[int, at_least(0)]  # where 0 is special ("all", "off"), the field's comment says so
Seed = Annotated[int, between(0, 2**32 - 1)]  # the range numpy's legacy seeding takes (detector.engine.run.setup_torch)
PosFloat = Annotated[float, above(0)]
NonNegFloat = Annotated[float, at_least(0)]
Frac = Annotated[float, between(0, 1, hi_open=True)]  # [0, 1): probabilities, momenta, IoUs that exclude 1
PosFrac = Annotated[float, between(0, 1, lo_open=True)]  # (0, 1]: fractions and IoUs that exclude 0
Sides = Annotated[tuple[PosInt, ...], NON_EMPTY]  # pixel sides; at least one
Levels = Annotated[tuple[PosInt, ...], NON_EMPTY]  # SPP pyramid levels n (n x n bins each)
Text = Annotated[str, NON_EMPTY]
# (key, value, what is allowed), reported as "<key> must be <allowed>, got <value>"
Problem = tuple[str, Any, str]
# A broken relation: a Problem and the other keys it compares with. It is not reported when one of
# those keys already breaks its own rule (that value is the trouble).
Relation = tuple[str, Any, str, tuple[str, ...]]


@dataclass(frozen=True)
class DataConfig:
    root: Text = "data/digits"  # the data set's folder, laid out as `format` says
    # Layout of `root` (detector.data.splits.FORMATS): "voc" = Annotations/, JPEGImages/,
    # ImageSets/Main/<split>.txt; "coco" = annotations/instances_<split>.json (every image it lists is
    # in the split) with the images in <split>/, images/<split>/, images/ or root itself (the first
    # that holds the file), as CVAT / Label Studio / Roboflow COCO exports write; crowd boxes count
    # as VOC "difficult" (detector/data/coco.py).
    format: Literal["voc", "coco"] = "voc"
    train_split: Text = "trainval"  # images used for training (fine-tuning, SVMs, box regression)
    # Held-out split for every model selection (never the test split; spec §6 selected on VOC07
    # test, we do not). "" = hold out `val_fraction` of the training split, chosen with `seed`.
    val_split: str = ""
    val_fraction: Frac = 0.1  # used only when val_split is ""; 0 = none held out
    test_split: Text = "test"  # split scored by tools/test_net.py
    # Foreground class names in id order. () = every name found in the training annotations,
    # sorted (stable for a given data set). VOC configs list the devkit's 20 classes.
    classes: Annotated[tuple[Text, ...], DISTINCT] = ()
    max_train_images: Count = 0  # 0 = all; >0 keeps the first N training ids (CPU-sized runs)
    max_test_images: Count = 0  # 0 = all; >0 scores the first N test ids (stated in the output)
    use_flipped: bool = True  # horizontally flipped copies join fine-tuning (spec §2, §6)

    def problems(self) -> list[Relation]:
        if self.val_split and self.val_split in (self.train_split, self.test_split):
            return [("val_split", self.val_split, "'' or a split other than train_split and test_split",
                     ("train_split", "test_split"))]
        return []


@dataclass(frozen=True)
class ProposalConfig:
    # "selective_search": computed by proposals.selective_search for every image (cached);
    # "file": loaded from train_file / test_file (.mat R-CNN, .pkl detectron2, .npz);
    # "edge_boxes": OpenCV EdgeBoxes with the structured-edge model `edge_model`.
    method: Literal["selective_search", "edge_boxes", "file"] = "selective_search"
    # "fast+" (default): OpenCV fast selective search on a copy with longer side `ss_side`, unioned
    # with a multi-scale grid of windows (proposals/selective_search.py; BCCD test recall@0.5 0.978
    # at ~0.58 CPU s/image vs 0.77 at 1.7 s for plain "fast"); "fast": OpenCV fast as-is (closest to
    # spec §9); "quality": OpenCV quality.
    mode: Literal["fast+", "fast", "quality"] = "fast+"  # proposals.selective_search.MODES
    min_size: Count = 20  # boxes with a side under this many pixels are dropped (spec §9); 0 = none
    max_boxes: Count = 2000  # per image, after deduplication; 0 = all (paper: about 2000, §9)
    # Proposal files for the training / test split when method == "file". At least one must be set;
    # each tool asks for the one of the split it reads (a test-only run needs no train_file).
    train_file: str = ""
    test_file: str = ""
    edge_model: str = ""  # model.yml.gz for EdgeBoxes (required when method == "edge_boxes")
    # parallel processes for computing proposals (1 = in the calling process, its selective search split over the cores)
    workers: PosInt = 2
    # "fast+" only (proposals.selective_search keyword arguments of the same names):
    # ss_side 240 halves selective search's time at equal BCCD trainval recall@0.5 (0.976) but loses
    # 2.5 points of recall@0.7, and swapped in at test time 4.8 points of held-out AP75 (BENCHMARKS.md,
    # "Proposal variants" and the notes after `peers`), so 320 stays the default.
    ss_side: PosInt = 320  # px, longer side of the image copy selective search runs on (never upscaled)
    grid_min: PosFloat = 32.0  # px, smallest grid window side (at least min_size is used)
    grid_stride: PosFloat = 0.5  # grid spacing as a fraction of the window side
    grid_aspect_ratios: Annotated[tuple[PosFloat, ...], NON_EMPTY] = (1.0,)  # width/height of grid windows

    def problems(self) -> list[Relation]:
        if self.method == "file" and not (self.train_file or self.test_file):
            return [("train_file", self.train_file, "a proposal file (or test_file, for testing only) when "
                     "method is 'file'", ())]
        if self.method == "edge_boxes" and not self.edge_model:
            return [("edge_model", self.edge_model, "the path of model.yml.gz when method is 'edge_boxes'", ())]
        return []


@dataclass(frozen=True)
class BackboneConfig:
    # "zf5" (spec §1), "zf5_bn" (ZF-5's geometry with BatchNorm in place of LRN, an option for
    # training from scratch: with the digits config plus pretrain.bn_images 100, held-out mAP 0.710
    # against zf5's 0.738 but COCO AP 0.440 / AP75 0.512 against 0.434 / 0.469; 0.638 without
    # bn_images; tools/test_net.py --held-out, BENCHMARKS.md peers_train), "vgg16" (conv5_3), "resnet50" / "resnet18" (through layer3) or
    # "mobilenet_v3" (MobileNetV3-Large to stride 16: 1.9 GMAC at 688x917 against ZF-5's 15.3, the
    # trunk for speed); resnet18 costs about ZF-5's (17.7 GMAC) but has torchvision ImageNet weights
    arch: Arch = "zf5"
    # channel multiplier of zf5 / zf5_bn (1.0 = the paper's 96/256/384/384/256) and resnet18 (1.0 =
    # torchvision's 64/128/256; 0.25 = 16/32/64, a CPU-width ResNet for training from scratch). With
    # the digits config (finetune.conv_layers 1) resnet18 at 0.25 pre-trains to held-out top-1 error
    # 0.298 (zf5 0.188) but at the config's finetune.lr 0.02 its head stays all-background (held-out
    # mAP 0.0024); its dense conv5 maps need a 10x lower rate (0.002: mAP 0.478, zf5 0.738;
    # BENCHMARKS.md peers_train); no config uses it
    width_mult: PosFloat = 1.0
    # "none": random init (then pretrain.enabled should be true); "imagenet": torchvision's
    # weights API (local cache, or download on a connected machine); any other string: a local
    # state_dict file loaded with weights_only=True.
    weights: Text = "none"
    # The pixels the trunk takes: "bgr255_mean128" (the paper's ZF-5: BGR 0..255 minus 128, spec §2)
    # or "rgb_imagenet" (torchvision: RGB / 255, ImageNet mean / std). "auto": what the weights
    # file declares (SPP classifier checkpoints and detectors store it; torchvision's ImageNet
    # weights are rgb_imagenet), else the arch's own. A file that declares another is refused.
    input_format: Literal["auto", "bgr255_mean128", "rgb_imagenet"] = "auto"

    def problems(self) -> list[Relation]:
        out: list[Relation] = []
        if self.arch not in WIDTH_ARCHS and self.width_mult != 1.0:
            out.append(("width_mult", self.width_mult,
                        f"1.0 for arch {self.arch!r} (only {', '.join(WIDTH_ARCHS)} have CPU-sized variants)", ()))
        if self.arch in WIDTH_ARCHS and self.width_mult != 1.0 and self.weights == "imagenet":
            out.append(("width_mult", self.width_mult,
                        "1.0 with weights 'imagenet' (torchvision's weights are for the full width)", ("weights",)))
        if self.arch in ("zf5", "zf5_bn") and self.weights == "imagenet":  # detector.backbones._TORCHVISION_WEIGHTS
            out.append(("weights", self.weights,
                        f"'none' or a state_dict file for arch {self.arch!r} (torchvision has no ImageNet ZF-5)", ()))
        return out


@dataclass(frozen=True)
class PretrainConfig:
    """Multi-size SPP classifier on crops of the training split (spec §1, paper §3)."""

    enabled: bool = False  # train the backbone as a classifier first (machines without ImageNet weights)
    # "single" (224), "multi" (180/224 alternating by epoch), "random" ([180, 224]), "nospp"
    mode: Literal["single", "multi", "random", "nospp"] = "multi"
    sizes: Sides = (180, 224)  # input sizes for multi-size training (paper §3.2)
    epochs: PosInt = 6
    batch_size: PosInt = 64
    lr: PosFloat = 0.01
    momentum: Frac = 0.9
    weight_decay: NonNegFloat = 5e-4
    fc_dim: PosInt = 1024  # fc6/fc7 width of the classifier head
    dropout: Frac = 0.5  # dropout after the classifier's fc6 and fc7 during training (spec §1)
    levels: Levels = (1, 2, 3, 6)  # pyramid of the classifier's SPP layer
    crops_per_image: PosInt = 8  # object crops taken per training image
    bg_per_image: Count = 2  # background crops (IoU < 0.3 with every object) per image
    max_images: Count = 0  # 0 = all training images
    seed: Seed = 0
    # Weight init of a trunk trained from scratch (backbone.weights == "none"): "spec" keeps the
    # trunk's own init (ZF-5: N(0, 0.01^2), biases 0/1, spec §1, meant for a 90-epoch ImageNet
    # schedule); "kaiming" = He et al. 2015 fan-in init, biases 0, conv1 divided by the crops' pixel
    # std (short CPU schedules without batch norm learn much faster from it).
    init: Literal["spec", "kaiming"] = "spec"
    hflip: bool = True  # mirror a random half of each batch (paper's ImageNet training flips)
    jitter: NonNegFloat = 0.1  # object crops: centre shift up to this fraction of the box side
    # object crops: width and height each scaled by a factor in [1, context]
    context: Annotated[float, at_least(1)] = 1.3
    # Pool each object crop's own box (its conv5 cells, projected as a detection window) instead of
    # the whole crop; with context > 1 the crop then shows real pixels around the object, as a
    # window inside a whole image does at detection time. Held-out crops use the mean context.
    pool_window: bool = False
    warmup_iters: Count = 0  # linear lr warm-up iterations before the cosine decay (0 = none)
    # clip the global gradient L2 norm to this per step (0 = off; no-BN nets from scratch)
    clip_grad: NonNegFloat = 0.0
    val_max_images: Count = 0  # held-out images evaluated (0 = all); caps evaluation time
    # "sgd" (momentum SGD, the paper's) or "adamw": from scratch on a CPU budget (a few hundred
    # steps) SGD without batch norm stays at the class prior (measured on digits), AdamW learns.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    eval_min_side: PosInt = 48  # own-size evaluation: shorter sides under this (px) are enlarged to it
    workers: PosInt = 4  # threads decoding images of an ImageNet-layout data.root (train/, val/)
    # Trunks with BatchNorm (BN_ARCHS): after pre-training, re-estimate the BatchNorm running
    # statistics on this many whole training images at features.train_scales (stage "bnstats",
    # detector/bn_stats.py); 0 = keep the crops' statistics. The crops' statistics do not fit whole
    # images (digits, ResNet-18 x0.25: whole-image variance 0.41-0.64 of the crops' per layer).
    bn_images: Count = added(0)


@dataclass(frozen=True)
class FeatureConfig:
    # Shorter-side scales of the image pyramid (spec §2; the code's 874 is the paper's 864).
    train_scales: Sides = (480, 576, 688, 864, 1200)
    test_scales: Sides = (688,)  # 1-scale testing at 688 (paper §4.2); list 5 for 5-scale
    # Cap on the resized longer side, 0 = none (the paper has no cap, §2). A cap under a scale
    # would resize every image at that scale to the cap, so it must be at least the largest scale.
    max_size: Count = 0
    levels: Levels = (1, 2, 3, 6)  # SPP levels, in fc6's concatenation order (spec §4)
    # Window side (px) the per-window scale choice aims at (spec §5: 13 cells x 16 = 208, the
    # pre-training crop's conv5). A trunk pre-trained on smaller crops aims at their size.
    target_side: PosFloat = 208.0
    cache_dir: str = ""  # conv5 cache folder; "" = <output_dir>/conv5_cache

    def problems(self) -> list[Relation]:
        largest = max(self.train_scales + self.test_scales, default=0)
        if 0 < self.max_size < largest:
            return [("max_size", self.max_size, f"0 (no cap) or >= the largest scale ({largest})",
                     ("train_scales", "test_scales"))]
        return []


@dataclass(frozen=True)
class HeadConfig:
    fc_dim: PosInt = 4096  # fc6 and fc7 width (spec §1)
    dropout: Frac = 0.5  # dropout after fc6 and fc7 during fine-tuning only (spec §6)


@dataclass(frozen=True)
class FinetuneConfig:
    """fc6/fc7 + (K+1)-way classifier on SPP features of windows (spec §6)."""

    iters: PosInt = 200000  # spec §6 (code): 200k mini-batches
    lr: PosFloat = 1e-3
    # ×0.1 after each (code's "vstep"); steps past `iters` are never reached
    lr_steps: Annotated[tuple[Count, ...], INCREASING] = (30000, 60000)
    momentum: Frac = 0.9
    weight_decay: NonNegFloat = 5e-4
    batch_size: PosInt = 128  # windows per mini-batch, drawn from many images
    fg_fraction: PosFrac = 0.25  # 32 fg + 96 bg
    # Window labels by IoU with the ground truth, 0 <= bg_iou_low < bg_iou_high <= fg_iou <= 1
    fg_iou: PosFrac = 0.5  # foreground: IoU >= 0.5 with a ground-truth box
    bg_iou_low: Frac = 0.1  # background: IoU in [bg_iou_low, bg_iou_high)
    bg_iou_high: PosFrac = 0.5
    random_scale: bool = True  # a uniformly random scale per training window (spec §5)
    # validate on the held-out split every N iterations, keep the best (0 = only after the last one)
    val_every: Count = 2000
    # fixed validation batches (spec §6: 500, drawn once; the small-data configs use 20, which
    # costs 1/25 of the time and fits their held-out sets of 29-30 images)
    val_batches: PosInt = 500
    # Sampler granularity (spec §6 builds batches for 500 iterations from enough images to hold 10x
    # the windows they need): every `chunk_iters` iterations, `chunk_images` random images are
    # pooled once and their windows drawn into the next `chunk_iters` batches.
    chunk_iters: PosInt = 100
    chunk_images: PosInt = 64
    seed: Seed = 0
    # Deviation option (0 = the spec: fc layers only). N > 0 also fine-tunes the trunk's last N
    # stride-16 conv units (ZF-5: 1..3 = conv5, conv4-5, conv3-5; VGG-16: up to conv5_1-5_3) on the
    # detection windows, as Fast R-CNN does: the cache then holds the maps before those units and
    # every batch runs them with gradients on `images_per_batch` images (batch_size /
    # images_per_batch windows each, one random scale per image). The tuned units go into model.pt.
    # At most TAIL_UNITS[backbone.arch].
    conv_layers: Count = 0
    conv_lr_mult: NonNegFloat = 1.0  # the tuned conv units learn at lr x this (0 = they stay as pre-trained)
    images_per_batch: PosInt = 2  # used only with conv_layers > 0; at most batch_size then

    def problems(self) -> list[Relation]:
        out: list[Relation] = []
        if not self.bg_iou_low < self.bg_iou_high:
            out.append(("bg_iou_low", self.bg_iou_low, f"< bg_iou_high ({self.bg_iou_high})", ("bg_iou_high",)))
        if not self.bg_iou_high <= self.fg_iou:
            out.append(("bg_iou_high", self.bg_iou_high, f"<= fg_iou ({self.fg_iou})", ("fg_iou",)))
        if self.conv_layers > 0 and self.images_per_batch > self.batch_size:
            out.append(("images_per_batch", self.images_per_batch,
                        f"<= batch_size ({self.batch_size}) when conv_layers > 0", ("batch_size",)))
        return out


@dataclass(frozen=True)
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining (spec §7)."""

    C: PosFloat = 0.001  # liblinear -c
    pos_weight: PosFloat = 2.0  # liblinear -w1
    bias: PosFloat = 10.0  # liblinear -B
    # liblinear's stopping tolerance (-e); spec §7 uses liblinear's default, 0.1 for -s 3. On BCCD
    # (same fine-tuned model, SVMs, box regressors and test rebuilt) 0.1 against 1e-4: mAP 0.815461
    # against 0.815331, each fit 0.09-0.11 s against 0.16 s.
    tol: PosFloat = 0.1
    neg_iou: PosFrac = 0.3  # negatives: IoU < 0.3 with every GT of the class
    # Candidate negatives include the image's ground-truth boxes (spec §7: other classes' GT boxes
    # qualify; R-CNN's box list is GT + proposals); false = proposals only. BCCD with tol 0.1:
    # mAP 0.815222 with them, 0.815461 without (the same model otherwise).
    gt_negatives: bool = True
    hard_thresh: float = -1.0001  # a negative is hard when it scores above this
    # cached easy negatives scoring below this are dropped after a retrain; < hard_thresh (-inf = never)
    evict_thresh: Annotated[float, MINUS_INF_OK] = -1.2
    retrain_every: PosInt = 2000  # retrain a class once this many new hard negatives accumulate
    feature_norm: PosFloat = 20.0  # features are scaled to this mean L2 norm
    stats_images: PosInt = 200  # images for the feature-norm statistic
    stats_rois: PosInt = 200  # windows per image for the statistic
    max_images: Count = 0  # 0 = every training image (no flips)
    # New hard negatives kept per class and image, highest scores first; 0 = all (spec §7). A weak
    # SVM that scores most windows at the margin (-1 > hard_thresh) otherwise adds every window of
    # every image and retrains each time (measured on digits: 18 s per image and growing).
    max_hard_per_image: Count = 0
    # Cached negatives kept per class after each retrain, the highest-scoring (a warning names every
    # drop); 0 = no cap (spec §7: eviction by score only), the default and the VOC configs'. A cap
    # bounds the SVM stage's memory when a weak SVM evicts nothing (a 200-iteration digits head kept
    # 47627 negatives of one class after 1069 images; BENCHMARKS.md "growth"). Test mAP against the
    # cap, the same trained models (BENCHMARKS.md "svm_max_cache"): BCCD 0.815196 uncapped (largest
    # cache kept: 6304, RBC), 0.815185 at 4000, 0.814294 at 2000, 0.812196 at 1000; digits 0.752773
    # at 0 and at 1000 (its caches keep at most 897). A cap above every cache changes nothing.
    max_cache: Count = 0

    def problems(self) -> list[Relation]:
        if not self.evict_thresh < self.hard_thresh:  # else negatives that still count as hard are evicted
            return [("evict_thresh", self.evict_thresh, f"< hard_thresh ({self.hard_thresh})", ("hard_thresh",))]
        return []


@dataclass(frozen=True)
class BBoxRegConfig:
    """Per-class ridge regressors on pooled conv5 features (spec §8)."""

    enabled: bool = True
    lam: PosFloat = 4000.0  # ridge λ
    min_iou: Frac = 0.5  # samples with IoU > min_iou to a GT of the class
    whiten_eps: PosFloat = 0.001  # added to the target covariance's eigenvalues
    # Samples per class kept (random subset, seeded); 0 = all (spec §8 keeps all). A cap bounds
    # memory on large data sets: each sample is a D-wide pooled vector.
    max_per_class: Count = 0
    # Extra samples per GT box drawn around it (detector.bbox_train.jitter_gt: centre moved by
    # jitter_sigma x its width/height, log width/height by jitter_sigma, both Gaussian), kept like
    # the proposals when IoU > min_iou; 0 = none (spec §8: proposals and GT boxes only). An option
    # for tight boxes where proposals rarely reach IoU 0.7 (BCCD recall@0.7 0.57); measured on
    # held-out images it helps no set consistently (32 at sigma 0.2: BCCD AP75 +4.7 points, digits
    # -4.4; BENCHMARKS.md peers_train), so no config sets it.
    jitter_per_gt: Count = added(0)
    jitter_sigma: PosFloat = added(0.1)


@dataclass(frozen=True)
class TestConfig:
    # per-class greedy NMS threshold (spec §9): IoU above it suppresses; 1 = no suppression
    nms: Annotated[float, between(0, 1)] = 0.3
    max_per_class: Count = 100  # kept per class and image (0 = all)
    # SVM scores below this are dropped before NMS (spec §9); -inf keeps every window (R-CNN's choice)
    score_thresh: Annotated[float, MINUS_INF_OK] = -1.5
    # "svm" (spec §7) or "svm+softmax": deviation option, the SVM margin plus the log-probability
    # of the class under the fine-tuned (K+1)-way classifier (an ensemble of the two scorers the
    # pipeline trains anyway; Fast R-CNN later scored with the softmax alone)
    score: Literal["svm", "svm+softmax"] = "svm"
    svd_rank: Count = 0  # truncated-SVD rank of fc6/fc7 (0 = off)
    # Arithmetic of fc6/fc7 at test time (detector/fc_precision.py): "float32" (the spec's), "int8"
    # (dynamic quantisation, CPU only), "float16" (CUDA only; elsewhere float32 with a warning), or
    # "auto": int8 on the CPU, float32 on a GPU. Deviation on the CPU only, for speed: full-width
    # fc6/fc7 (4096) over 2000 windows take about half the time in int8 (BENCHMARKS.md, detect).
    # mAP change measured with the same trained models (tools/test_net.py --set
    # test.fc_precision=P): BCCD 0.815331 -> 0.815333 (+0.0002 points), digits 0.754442 -> 0.752773
    # (-0.17 points), both within the 0.3-point budget. Save and export keep float32 layers.
    fc_precision: Literal["float32", "int8", "float16", "auto"] = "auto"
    # Arithmetic of the trunk's convolutions at test time (detector/conv_precision.py): "float32"
    # (the spec's) or "bfloat16" (autocast; on a CPU only where it is native, AVX512-BF16 or AMX,
    # elsewhere float32 with a warning). Deviation option for speed at full width; its mAP change
    # and speed are in BENCHMARKS.md (detect; fc6/fc7 int8 and shared windows).
    conv_precision: Literal["float32", "bfloat16"] = added("float32")
    # Window side (px) the per-window scale choice aims at when testing; 0 = features.target_side,
    # the training value the checkpoint holds. A test-time knob: changing it needs no retraining.
    target_side: Annotated[float, at_least(0, "0 = features.target_side")] = 0.0


@dataclass(frozen=True)
class Config:
    name: str = "default"  # experiment name, used in output paths and logs
    output_dir: Text = "runs/default"  # every stage writes under this folder
    seed: Seed = 0  # global seed; each stage derives its own generator from it
    # "auto" = CUDA when torch sees a GPU, else the CPU (the log names the device the run got);
    # or "cpu", "cuda", "cuda:N" (only the spelling is checked here; whoever uses the device
    # resolves "auto"). Results on the CPU do not depend on whether "auto" or "cpu" chose it.
    device: Annotated[str, DEVICE] = "auto"
    num_threads: Count = 0  # torch intra-op threads; 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: BBoxRegConfig = field(default_factory=BBoxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)

    def problems(self) -> list[Relation]:
        """Rules across sections: what the chosen trunk can take."""
        arch = self.backbone.arch
        out: list[Relation] = []
        n_tail = TAIL_UNITS[arch]
        if self.pretrain.bn_images:
            if arch not in BN_ARCHS:
                out.append(("pretrain.bn_images", self.pretrain.bn_images,
                            f"0 for backbone.arch {arch!r} (it has no BatchNorm layers; {', '.join(BN_ARCHS)} have)", ()))
            elif not (self.pretrain.enabled and self.backbone.weights == "none"):
                out.append(("pretrain.bn_images", self.pretrain.bn_images,
                            "0 unless pretrain.enabled with backbone.weights 'none' (it re-estimates the statistics "
                            "of a trunk pre-trained on crops)", ("pretrain.enabled", "backbone.weights")))
        if not 0 <= self.finetune.conv_layers <= n_tail:
            out.append(("finetune.conv_layers", self.finetune.conv_layers,
                        f"in 0..{n_tail} (the stride-16 conv units of backbone.arch {arch!r})", ()))
        side = MIN_INPUT_SIDE[arch]
        for key, sides in (("features.train_scales", self.features.train_scales),
                           ("features.test_scales", self.features.test_scales),
                           ("pretrain.sizes", self.pretrain.sizes)):
            out += [(f"{key}[{i}]", s, f">= {side} px (a smaller input leaves {arch} no conv5 cell)", ())
                    for i, s in enumerate(sides) if 0 < s < side]
        if 0 < self.pretrain.eval_min_side < side:
            out.append(("pretrain.eval_min_side", self.pretrain.eval_min_side,
                        f">= {side} px (a smaller input leaves {arch} no conv5 cell)", ()))
        return out


# ----------------------------------------------------------------------------------------------
# strict merge


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section, got {type(value).__name__}")
        errors: list[str] = []
        merged = _merge(tp(), value, where, errors)
        if errors:
            raise ConfigError("; ".join(errors))
        return merged
    if origin is Annotated:  # the rule is checked after the merge (check_config)
        return _coerce(value, typing.get_args(tp)[0], where)
    if origin in (tuple,):
        args = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:  # string choices
        choices = typing.get_args(tp)
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if value is None and tp is type(None):
        return None
    raise ConfigError(f"{where}: unsupported type {tp}")


def _merge(base: Any, overrides: dict, where: str, errors: list[str]) -> Any:
    """``base`` with the values of ``overrides`` that fit their types; each one that does not
    (unknown key, wrong type, a string outside its choices) is appended to ``errors``."""
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else str(key)
        try:
            if key not in names:
                raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: expected a mapping, got {value!r}")
                changes[key] = _merge(getattr(base, key), value, path, errors)
            else:
                changes[key] = _coerce(value, tp, path)
        except ConfigError as e:
            errors.append(str(e))
    return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------------------------
# range and consistency checks (the rules are declared with the fields above)


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _value_problems(value: Any, tp: Any, key: str) -> list[Problem]:
    """Broken rules of one value against its annotation (``Annotated`` rules, finiteness, elements)."""
    meta: tuple = ()
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
    if isinstance(value, float) and not math.isfinite(value):
        if MINUS_INF_OK not in meta:
            return [(key, value, "a finite number")]
        if value != -math.inf:
            return [(key, value, "a finite number or -inf")]
    for rule in meta:
        if isinstance(rule, Rule) and not rule.ok(value):
            return [(key, value, rule.text)]
    if typing.get_origin(tp) is tuple and isinstance(value, tuple):
        elem = typing.get_args(tp)[0]
        return [p for i, v in enumerate(value) for p in _value_problems(v, elem, f"{key}[{i}]")]
    return []


def _problems(section: Any, where: str = "") -> list[Problem]:
    """Every broken rule of a Config or section: each field's own rule, then the relations of the
    section's ``problems()`` whose keys all keep their own rules."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    out: list[Problem] = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out += _problems(value, f"{where}{f.name}.")
        else:
            out += _value_problems(value, hints[f.name], f"{where}{f.name}")
    reported = {key.split("[")[0] for key, _, _ in out}  # a list counts as reported when an element is
    if hasattr(section, "problems"):
        out += [(where + key, v, text) for key, v, text, others in section.problems()
                if not reported & {where + k for k in (key, *others)}]
    return out


def _error(source: str, lines: list[str]) -> ConfigError:
    head = f"{source}: " if source else ""
    if len(lines) == 1:
        return ConfigError(head + lines[0])
    return ConfigError(f"{head}{len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines))


def _check(cfg: Config, source: str = "") -> Config:
    problems = _problems(cfg)
    if problems:
        raise _error(source, [f"{key} must be {text}, got {_show(value)}" for key, value, text in problems])
    return cfg


def check_config(cfg: Config) -> Config:
    """``cfg`` when every value keeps its rule (range, choices, agreement with other values).

    :func:`load_config` and :func:`config_from_dict` call it; a Config built in code with
    ``dataclasses.replace`` is checked only when passed here.

    Raises:
        ConfigError: one line per broken rule, ``<key> must be <what is allowed>, got <value>``.
    """
    return _check(cfg)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice.

    PyYAML keeps the last of two equal keys without a word, so a setting written twice (a pasted
    block, a merge conflict) would silently take whichever came last.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, str] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}"
            try:
                if key in seen:
                    raise _DuplicateKeyError(f"duplicate key '{key}' at {where} (first at {seen[key]})")
                seen[key] = where
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


class _DuplicateKeyError(yaml.YAMLError):
    pass


# YAML 1.1 reads `1e-3` (no dot) as a string; every number a user writes in scientific notation is
# read as a float here (YAML 1.2 and Python agree), so `lr: 1e-3` is the number it looks like.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


# The configs shipped inside the package (package data in pyproject.toml), so that an installed
# `sppnet` finds them from any folder; `configs/` at the repository root is a link to this folder.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (``detector/configs/<name>.yaml``), sorted."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """The YAML file ``name`` stands for: an existing file as given, else the packaged config of that name.

    A bare name (no folder part, with or without ``.yaml``) such as ``digits_zf5`` finds
    ``detector/configs/digits_zf5.yaml`` from any working folder; a file of that name in the
    working folder comes first.

    Raises:
        ConfigError: neither exists; the message names ``name`` and the packaged configs.
    """
    p = Path(name)
    if p.is_file():
        return p
    if p.name and p.parent == Path("."):  # a bare name
        packaged = PACKAGED_CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config file not found: {name} (give a path, or the name of a packaged config: "
                      f"{', '.join(packaged_configs())})")


def _read_yaml(p: Path) -> dict:
    """The top-level mapping of the YAML file ``p``; every failure is a ConfigError naming ``p``."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML config: byte {e.start} is not UTF-8 text") from None
    try:
        loader = _StrictLoader(text)  # reads the whole text: control characters fail here
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except _DuplicateKeyError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"{p}: not a YAML config: character #x{e.character:04x} at position {e.position} "
                          f"is not allowed in YAML text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:  # no document, only comments, or a bare `---` / `~`
        raise ConfigError(f"{p}: is empty (a config file holds at least one setting; use {{}} for none)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: dict = {}
    cur = out
    for p in path[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[path[-1]] = value
    return out


def config_from_dict(d: dict, base: Config | None = None) -> Config:
    """Strictly merge a nested dict into ``base`` (default: all defaults), then :func:`check_config`.

    Raises:
        ConfigError: every key that is unknown or of the wrong type; if none, every broken rule.
    """
    errors: list[str] = []
    cfg = _merge(base or Config(), d, "", errors)
    if errors:
        raise _error("", errors)
    return _check(cfg)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML file of overrides and ``key.sub=value`` strings into a frozen Config.

    Args:
        path: YAML file, or the bare name of a packaged config such as ``"digits_zf5"``
            (:func:`resolve_config_path`); None = defaults only.
        overrides: strings such as ``"finetune.iters=500"`` or ``"features.test_scales=[480,688]"``;
            values are parsed as YAML. They apply in order after the file, so a key given twice
            (in the file and an override, or in two overrides) takes the last value: that is how
            a command line changes a setting. Inside one YAML file or value a repeated key is an
            error instead (PyYAML would keep the last one silently).
    Raises:
        ConfigError: a missing file or unknown packaged name; an unreadable, empty or non-UTF-8
            file, or a key repeated in it; every unknown key or wrong type of the file (then of the
            overrides); else every value that breaks its rule
            (:func:`check_config`), checked once all overrides are in. The message names each key.
    """
    cfg = Config()
    errors: list[str] = []
    if path is not None:
        path = resolve_config_path(path)
        data = _read_yaml(path)
        cfg = _merge(cfg, data, "", errors)
        if errors:
            raise _error(str(path), errors)
    overrides = list(overrides)
    for item in overrides:
        try:
            keys, value = _parse_override(item)
        except ConfigError as e:
            errors.append(str(e))
            continue
        cfg = _merge(cfg, _nest(keys, value), "", errors)
    if errors:
        raise _error("", errors)
    source = " + ".join(([str(path)] if path is not None else []) + (["overrides"] if overrides else []))
    return _check(cfg, source)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a Config; safe for YAML, JSON and weights_only pickles."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def save_config(cfg: Config, out_dir: str | Path, argv: list[str] | None = None) -> Path:
    """Write the resolved config as ``resolved_config.yaml`` in ``out_dir`` (argv as a comment line).

    The file loads back with :func:`load_config`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = config_to_dict(cfg)
    header = f"# argv: {json.dumps(list(argv))}\n" if argv is not None else ""
    from detector.artifacts import write_text

    return write_text(out / "resolved_config.yaml", header + yaml.safe_dump(d, sort_keys=False))
