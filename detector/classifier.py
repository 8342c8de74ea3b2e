"""Image classifier on the detection trunk: conv5 -> SPP (or a fixed pool5 grid) -> fc6/fc7 -> fc8.

Shape shorthand (one alphabet for the whole project):
    N: crops in a batch          C: conv5 channels          Hs x Ws: conv5 size of the input
    B = sum(n*n): SPP bins       D = C*B: pooled width       F: fc6 / fc7 width
    K: foreground classes (the classifier has K + 1 outputs; background is index K)

This is the paper's classification network (spec §1, paper §2-3) sized for pre-training the trunk
on crops of a detection training split, which is how a machine without ImageNet weights gets
trained conv layers. Two heads:

``spp=True`` (SPP-net)
    :class:`detector.spp.SpatialPyramidPool` over the whole conv5 map (levels 1, 2, 3, 6 by
    default): any input size gives ``D = C * 50`` features, so one network trains at 180 and 224
    and tests on crops of their own size.

``spp=False`` (the paper's "no SPP" baseline, Table 2 first row)
    A fixed pool5: one max pool, kernel 3 stride 2, over conv5, as the ZF-5 classification net has
    after conv5 (the Caffe/cuda-convnet pool5 the SPP layer replaces). For a 224 input conv5 is
    13 x 13 and pool5 is 6 x 6, so ``D = C * 36``. The grid is fixed: any input whose conv5 is not
    ``nospp_conv5`` x ``nospp_conv5`` (13 for 224) is refused with a clear error, because fc6
    expects exactly that many inputs. A no-SPP net can only see crops warped to the training size.

fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 is :class:`detector.head.FCHead` with
``num_classes=K`` (its ``cls_score`` is fc8, K + 1 outputs), so the detector's fine-tuning head can
load fc6/fc7 from the checkpoint unchanged.

Checkpoint (:func:`save_classifier`): a plain dict loadable with ``torch.load(weights_only=True)``:
``backbone`` (the trunk's state_dict, what ``build_backbone(arch, weights=<file>)`` reads), ``fc``
(FCHead state_dict: fc6.*, fc7.*, cls_score.*), ``arch``, ``width_mult``, ``input_format``,
``class_names`` (K names, background not included), ``mode``, ``spp``, ``levels``, ``nospp_conv5``,
``fc_in_dim``, ``fc_dim``, ``dropout`` and ``meta`` (free-form: resolved config, metrics).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.backbones import build_backbone
from detector.head import FCHead
from detector.projection import project_boxes
from detector.spp import SpatialPyramidPool, spp_out_dim, spp_pool

__all__ = [
    "SPPClassifier",
    "FixedGridPool",
    "CLASSIFIER_FORMAT",
    "ClassifierCheckpointError",
    "classifier_state",
    "save_classifier",
    "load_classifier",
    "reinit_kaiming",
]

CLASSIFIER_FORMAT = "sppnet-classifier-v1"


class ClassifierCheckpointError(RuntimeError):
    """A classifier checkpoint that cannot be loaded (missing, unsafe, wrong format); names the file."""


class FixedGridPool(nn.Module):
    """The no-SPP baseline's pool5: max pool kernel 3, stride 2 on a conv5 map of a fixed size.

    Args:
        conv5_side: the only conv5 side accepted (13 = ZF-5 at 224 px).
        kernel, stride: pool5 geometry (3, 2 as the ZF-5 classification net).
    Input: Tensor[N, C, conv5_side, conv5_side]. Output: Tensor[N, C * g * g] with
    ``g = (conv5_side - kernel) // stride + 1`` (6 for 13).
    """

    def __init__(self, conv5_side: int = 13, kernel: int = 3, stride: int = 2):
        super().__init__()
        if conv5_side < kernel:
            raise ValueError(f"FixedGridPool: conv5_side {conv5_side} is smaller than the kernel {kernel}")
        self.conv5_side, self.kernel, self.stride = int(conv5_side), int(kernel), int(stride)
        self.grid = (self.conv5_side - self.kernel) // self.stride + 1

    def out_dim(self, channels: int) -> int:
        """Output width ``C * grid * grid``."""
        return channels * self.grid * self.grid

    def forward(self, fmap: Tensor) -> Tensor:
        if fmap.ndim != 4 or fmap.shape[-2:] != (self.conv5_side, self.conv5_side):
            raise ValueError(
                f"no-SPP head: conv5 must be {self.conv5_side}x{self.conv5_side} (the training size), got "
                f"{tuple(fmap.shape[-2:])}; a fixed pool5 grid cannot take other input sizes: resize the "
                f"crop to the training size first"
            )
        return F.max_pool2d(fmap, self.kernel, self.stride).flatten(1)  # (N, C*g*g)

    def extra_repr(self) -> str:
        return f"conv5_side={self.conv5_side}, kernel={self.kernel}, stride={self.stride}, grid={self.grid}"


class SPPClassifier(nn.Module):
    """Backbone -> SPP (or fixed pool5) -> fc6 -> fc7 -> fc8 ((K + 1)-way, background = K).

    Args:
        backbone: a trunk from :func:`detector.backbones.build_backbone` (``out_channels``,
            ``input_format`` attributes).
        num_classes: K foreground classes; the output has K + 1 logits.
        fc_dim: F, width of fc6 and fc7.
        levels: SPP levels in fc6's concatenation order (used when ``spp``).
        dropout: dropout after fc6 and fc7 in ``train()`` mode.
        spp: True = SPP head; False = the no-SPP baseline (:class:`FixedGridPool`).
        nospp_conv5: conv5 side the no-SPP head accepts (13 for ZF-5 at 224).
    Input: Tensor[N, 3, H, W] preprocessed for ``backbone.input_format``. Output: Tensor[N, K+1].
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        fc_dim: int,
        levels: Sequence[int],
        dropout: float,
        spp: bool = True,
        nospp_conv5: int = 13,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.spp = bool(spp)
        self.levels = tuple(int(n) for n in levels)
        self.nospp_conv5 = int(nospp_conv5)
        C = int(backbone.out_channels)
        if self.spp:
            self.pool: nn.Module = SpatialPyramidPool(self.levels)
            in_dim = spp_out_dim(C, self.levels)
        else:
            self.pool = FixedGridPool(self.nospp_conv5)
            in_dim = self.pool.out_dim(C)
        self.head = FCHead(in_dim, fc_dim=fc_dim, num_classes=self.num_classes, dropout=dropout)

    @property
    def input_format(self) -> str:
        return str(self.backbone.input_format)

    def pooled(self, x: Tensor, windows: Tensor | None = None) -> Tensor:
        """conv5 + pooling. x (Tensor[N, 3, H, W]) -> Tensor[N, D].

        ``windows`` (Tensor[N, 4] | None): one xyxy box per input in its pixels; each is projected
        onto the input's conv5 map (spec §3, as a detection window) and SPP-pooled alone
        (:func:`detector.spp.spp_pool`). None pools the whole map.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SPPClassifier expects Tensor[N, 3, H, W], got {tuple(x.shape)}")
        fmap = self.backbone(x)  # (N, C, Hs, Ws)
        if fmap.shape[-2] < 1 or fmap.shape[-1] < 1:
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small for the backbone (empty conv5)")
        if windows is None:
            return self.pool(fmap)  # (N, D)
        if not self.spp:
            raise ValueError("window pooling needs an SPP head; a fixed pool5 grid pools the whole map")
        if windows.shape != (x.shape[0], 4):
            raise ValueError(f"windows must be Tensor[{x.shape[0]}, 4], got {tuple(windows.shape)}")
        N, C, hs, ws = fmap.shape
        h, w = x.shape[-2:]
        cells = project_boxes(windows.float().cpu(), (h, w), (h, w), (hs, ws), self.backbone.stride,
                              self.backbone.proj_offset0, self.backbone.proj_shrink)  # (N, 4)
        # One spp_pool call for the batch: the N maps side by side, each window shifted onto its own
        # map (windows stay inside their map, so no bin ever reaches a neighbour).
        tiled = fmap.permute(1, 2, 0, 3).reshape(C, hs, N * ws)  # (C, hs, N*ws)
        shift = (torch.arange(N) * ws)[:, None] * torch.tensor([1, 0, 1, 0])  # (N, 4)
        return spp_pool(tiled, (cells + shift).to(fmap.device), self.levels)  # (N, D)

    def forward(self, x: Tensor, windows: Tensor | None = None, dropout_rows: Tensor | None = None,
                dropout_total: int | None = None) -> Tensor:
        """Logits. x (Tensor[N, 3, H, W]) -> Tensor[N, K+1] (dropout active in train mode);
        ``windows`` as in :meth:`pooled`; ``dropout_rows`` / ``dropout_total`` as in
        :meth:`detector.head.FCHead.forward` (a data-parallel step)."""
        return self.head(self.pooled(x, windows), dropout_rows, dropout_total)  # (N, K+1)


@torch.no_grad()
def reinit_kaiming(model: nn.Module, sample: Tensor | None = None, input_std: float = 1.0) -> None:
    """He et al. (2015) fan-in init for every conv / linear weight, biases 0, then data-driven scaling.

    Spec §1's N(0, 0.01^2) init with biases of 1 suits the paper's 90-epoch ImageNet schedule; a
    short CPU schedule from scratch without batch norm learns far faster when every layer starts
    with unit-variance outputs. He init preserves the variance only for zero-mean inputs; max
    pooling, the pyramid's max bins and the 0..255 input scale shift it. So, when ``sample`` (a
    preprocessed batch of training crops) is given, each conv / linear layer in forward order is
    rescaled so its output has unit std on that batch (Mishkin & Matas 2016, "LSUV"). Without a
    sample, only the first conv is divided by ``input_std``. The classifier layer (``cls_score``)
    then gets N(0, 0.01^2) weights so the logits start near 0.

    Args:
        model: any module (an :class:`SPPClassifier` or a bare trunk).
        sample (Tensor[N, 3, H, W] | None): preprocessed crops; ``model(sample)`` must run.
        input_std: used without ``sample``: the pixel std of the preprocessed input.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    head = getattr(model, "head", None)
    last = head.cls_score if isinstance(head, FCHead) else None
    for m in layers:
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if m.bias is not None:
            m.bias.zero_()
    if sample is None:
        if layers and isinstance(layers[0], nn.Conv2d):
            layers[0].weight.div_(max(float(input_std), 1e-6))
    else:
        was_training = model.training
        model.eval()
        for m in layers:
            if m is last:
                continue
            out: list[Tensor] = []
            # a copy: ZF-5 applies its ReLUs in place on the conv outputs after the hook has run
            h = m.register_forward_hook(lambda _m, _i, o: out.append(o.detach().clone()))
            model(sample)
            h.remove()
            std = float(out[0].std()) if out else 0.0
            if std > 0:
                m.weight.div_(std)
        model.train(was_training)
    if last is not None:
        nn.init.normal_(last.weight, 0.0, 0.01)  # logits start near 0 (uniform softmax)
        last.bias.zero_()


def classifier_state(
    model: SPPClassifier,
    *,
    arch: str,
    width_mult: float,
    class_names: Sequence[str],
    mode: str,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a classifier (tensors, numbers, strings, lists, dicts only).

    Args:
        model: the trained classifier.
        arch, width_mult: what :func:`detector.backbones.build_backbone` needs to rebuild the trunk.
        class_names: K foreground names in id order (background is index K, not listed).
        mode: training mode ("single", "multi", "random", "nospp").
        meta: free-form JSON-like dict (resolved config, metrics).
    """
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.num_classes}-class classifier")
    return {
        "format": CLASSIFIER_FORMAT,
        "arch": arch,
        "width_mult": float(width_mult),
        "input_format": model.input_format,
        "backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "fc": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "fc_in_dim": int(model.head.in_dim),
        "fc_dim": int(model.head.fc_dim),
        "dropout": float(model.head.dropout),
        "class_names": list(class_names),
        "mode": mode,
        "spp": model.spp,
        "levels": list(model.levels),
        "nospp_conv5": model.nospp_conv5,
        "meta": dict(meta or {}),
    }


def save_classifier(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a :func:`classifier_state` dict atomically (temp file, then rename)."""
    from detector.artifacts import save_torch

    return save_torch(path, state)


def read_classifier_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; raises ClassifierCheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierCheckpointError(f"classifier checkpoint not found: {path}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unsafe or corrupt file: name it, no deep traceback
        raise ClassifierCheckpointError(
            f"{path}: refused or unreadable as a safe (weights_only) checkpoint: {type(e).__name__}"
        ) from None
    if not isinstance(st, dict) or st.get("format") != CLASSIFIER_FORMAT:
        got = st.get("format") if isinstance(st, dict) else type(st).__name__
        raise ClassifierCheckpointError(f"{path}: not an SPP classifier checkpoint (format {got!r})")
    return st


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[SPPClassifier, dict[str, Any]]:
    """Rebuild a classifier from :func:`save_classifier`'s file.

    Returns:
        (model in eval mode on ``device``, the checkpoint dict).
    Raises:
        ClassifierCheckpointError: missing, unsafe or foreign file.
    """
    st = read_classifier_state(path)
    backbone = build_backbone(st["arch"], width_mult=st["width_mult"], weights="none",
                              input_format=st.get("input_format", "auto"))
    backbone.load_state_dict(st["backbone"])
    model = SPPClassifier(
        backbone, len(st["class_names"]), fc_dim=st["fc_dim"], levels=st["levels"], dropout=st["dropout"],
        spp=st["spp"], nospp_conv5=st["nospp_conv5"],
    )
    model.head.load_state_dict(st["fc"])
    return model.to(device).eval(), st
