"""Detect objects in one image with a trained checkpoint and draw the labelled boxes.

    sppnet demo --checkpoint runs/digits_zf5/model.pt IMAGE --out out.png [--threshold 0] [--device cpu|cuda|auto]
    (in a checkout, the same: python tools/demo.py ...)

Writes the PNG ``--out`` and prints one line per detection (class, score, box) and the seconds per stage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector import SPPDetector
from detector.cli import add_device_arg, run_tool
from detector.engine.run import resolve_device
from proposals.imageio import read_image


def draw_detections(image, dets: dict, class_names, out: Path, title: str = "") -> Path:
    """Write ``image`` with labelled boxes to ``out`` (PNG).

    Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas: importing or calling this
    never changes the caller's matplotlib backend (no pyplot).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image)
    ax.set_axis_off()
    cmap = matplotlib.colormaps["tab10"]
    for box, score, label in zip(dets["boxes"].tolist(), dets["scores"].tolist(), dets["labels"].tolist()):
        x1, y1, x2, y2 = box
        color = cmap(label % 10)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=2))
        ax.text(x1, max(y1 - 2, 8), f"{class_names[label]} {score:.2f}", color="white", fontsize=8,
                bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))
    if title:
        ax.text(4, h - 6, title, color="white", fontsize=8, bbox=dict(facecolor="black", alpha=0.6, pad=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by sppnet train")
    p.add_argument("image", help="image file")
    p.add_argument("--out", default="out.png", help="PNG to write")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="display threshold on the SVM score (0 = the SVM decision boundary)")
    add_device_arg(p, "cpu")
    args = p.parse_args(argv)

    def body() -> None:
        det = SPPDetector.load(args.checkpoint, device=resolve_device(args.device))
        image = read_image(args.image)
        dets = det.detect(image, score_threshold=args.threshold)
        title = " ".join(f"{k} {v:.2f}s" for k, v in det.last_timings.items())
        out = draw_detections(image, dets, det.class_names, Path(args.out), title)
        for box, score, label in zip(dets["boxes"].tolist(), dets["scores"].tolist(), dets["labels"].tolist()):
            print(f"{det.class_names[label]:>12s} {score:7.3f}  " + " ".join(f"{v:7.1f}" for v in box))
        print(f"{len(dets['scores'])} detections; timings (s): {title}")
        print(f"wrote {out}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
