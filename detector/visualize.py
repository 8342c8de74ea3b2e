"""Drawing detections and ground truth on images, and tiling pictures into one (no matplotlib state).

Shape shorthand:
    N: detections      G: ground-truth boxes      K: foreground classes

Boxes are drawn by ``torchvision.utils.draw_bounding_boxes`` (xyxy pixels, the project's format),
labels in DejaVu Sans, the font matplotlib ships (PIL's small bitmap font where it is missing).
Nothing here imports pyplot or sets a matplotlib backend, so a notebook's backend is left alone.

Colours: detections take their class's colour from :data:`CLASS_COLOURS` (label ``k`` gets colour
``k mod 10``; the palette is matplotlib's tab10 without its green), ground truth is always
:data:`GT_COLOUR` (green), so the two never look alike.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes

__all__ = ["draw_detections", "tile", "caption", "CLASS_COLOURS", "GT_COLOUR"]

CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf", "#ffd700")  # tab10 with its green replaced by gold
GT_COLOUR = "#00e000"


@functools.lru_cache(maxsize=1)
def _font_path() -> str | None:
    try:
        import matplotlib  # its data folder only: no pyplot, no backend

        p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return str(p) if p.is_file() else None
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None


def _font(size: int) -> ImageFont.ImageFont:
    path = _font_path()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default()


def _as_uint8_hwc(image: Any) -> np.ndarray:
    """An image as uint8 [H, W, 3] RGB: an HWC uint8 array, a PIL image, a CHW tensor (uint8, or
    float in [0, 1]) or a path."""
    if isinstance(image, (str, Path)):
        from proposals.imageio import read_image

        return read_image(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"draw_detections: a tensor image must be [3, H, W], got {tuple(t.shape)}")
        return np.ascontiguousarray(t.expand(3, -1, -1).permute(1, 2, 0).numpy())  # (H, W, 3)
    if hasattr(image, "mode") and hasattr(image, "convert"):
        from proposals.imageio import pil_to_rgb

        return pil_to_rgb(image)
    from proposals.imageio import to_rgb_uint8

    return to_rgb_uint8(np.asarray(image))


def draw_detections(
    image: Any,
    detections: Mapping[str, torch.Tensor] | None,
    class_names: Sequence[str],
    score_threshold: float | None = None,
    ground_truth: Mapping[str, torch.Tensor] | None = None,
    *,
    width: int | None = None,
    font_size: int | None = None,
) -> np.ndarray:
    """Draw detections (class colours, ``"class score"`` labels) and ground truth (green, ``class``).

    Args:
        image: uint8 [H, W, 3] RGB array, PIL image, Tensor[3, H, W] (uint8 or float in [0, 1]) or path.
        detections: ``detect()``'s dict: ``boxes`` (Tensor[N, 4] xyxy pixels), ``scores``
            (Tensor[N]), ``labels`` (Tensor[N] int64 into ``class_names``); None = none.
        class_names: K names.
        score_threshold: draw only detections scoring at least this (None = all given).
        ground_truth: optional dict with ``boxes`` (Tensor[G, 4] xyxy) and optional ``labels``
            (Tensor[G] int64), e.g. an ``ImageRecord``'s; drawn under the detections.
        width: line width in px (default: 2, 3 above 600 px).
        font_size: label size in px (default: scaled with the image, 11 to 20).
    Returns:
        ndarray uint8 [H, W, 3] RGB: a new picture (the input is not changed).
    """
    img = _as_uint8_hwc(image)
    h, w = img.shape[:2]
    width = width or (3 if max(h, w) > 600 else 2)
    font_size = font_size or int(min(20, max(11, round(max(h, w) / 40))))
    font = _font_path()
    canvas = torch.from_numpy(img).permute(2, 0, 1).contiguous()  # (3, H, W) uint8

    def draw(boxes: torch.Tensor, labels: list[str], colours: list[str]) -> None:
        nonlocal canvas
        if boxes.shape[0] == 0:
            return
        canvas = draw_bounding_boxes(canvas, boxes.detach().cpu().float().reshape(-1, 4), labels=labels,
                                     colors=colours, width=width, font=font, font_size=font_size if font else None,
                                     label_colors="white", fill_labels=True)

    if ground_truth is not None:
        gb = torch.as_tensor(ground_truth["boxes"]).reshape(-1, 4)
        gl = ground_truth.get("labels")
        names = [class_names[int(k)] for k in gl] if gl is not None else [""] * gb.shape[0]
        draw(gb, [f"gt {n}".strip() for n in names], [GT_COLOUR] * gb.shape[0])
    if detections is not None:
        scores, labels, boxes = detections["scores"].cpu(), detections["labels"].cpu(), detections["boxes"].cpu()
        keep = torch.ones_like(scores, dtype=torch.bool) if score_threshold is None else scores >= score_threshold
        order = torch.argsort(scores[keep])  # lowest first, so the best box is drawn on top
        b, s, lab = boxes[keep][order], scores[keep][order], labels[keep][order]
        draw(b, [f"{class_names[int(k)]} {float(v):.2f}" for k, v in zip(lab, s)],
             [CLASS_COLOURS[int(k) % len(CLASS_COLOURS)] for k in lab])
    return np.ascontiguousarray(canvas.permute(1, 2, 0).numpy())  # (H, W, 3)


def caption(image: np.ndarray, lines: Sequence[str], font_size: int = 14, where: str = "below",
            background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """``image`` with a strip of text lines added above or below (dark text on ``background``).

    Returns:
        ndarray uint8 [H + strip, W, 3].
    """
    font = _font(font_size)
    line_h = int(font_size * 1.35)
    strip = Image.new("RGB", (image.shape[1], line_h * len(lines) + 6), background)
    d = ImageDraw.Draw(strip)
    for i, text in enumerate(lines):
        d.text((4, 3 + i * line_h), text, fill=(20, 20, 20), font=font)
    parts = [image, np.asarray(strip)] if where == "below" else [np.asarray(strip), image]
    return np.concatenate(parts, axis=0)


def tile(pictures: Sequence[np.ndarray], columns: int, gap: int = 8,
         background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Pictures in a grid of ``columns``, each cell as large as the largest picture (top-left aligned).

    Returns:
        ndarray uint8 [rows * (Hmax + gap) + gap, columns * (Wmax + gap) + gap, 3].
    """
    if not pictures:
        raise ValueError("tile: no pictures")
    ch = max(p.shape[0] for p in pictures)
    cw = max(p.shape[1] for p in pictures)
    columns = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // columns)
    out = np.empty((rows * (ch + gap) + gap, columns * (cw + gap) + gap, 3), np.uint8)
    out[:] = background
    for i, p in enumerate(pictures):
        r, c = divmod(i, columns)
        y, x = gap + r * (ch + gap), gap + c * (cw + gap)
        out[y:y + p.shape[0], x:x + p.shape[1]] = p
    return out
