"""Benchmark section ``peers``: SPP-net against torchvision's fastest detector over a list of images,
with proposals given (detection alone) and end to end (selective search included), as throughput
over the whole list; each run times every row once, in a rotating order, and each row's ratio to the
peer is the median of its runs' ratios (the machine's drift hits the rows of a run alike).

Models: random-weight full-width ZF-5 with fc6/fc7 4096 (timing does not depend on weights), dense
float32, the fast fc option (SVD rank + int8, :mod:`detector.fc_precision`) and that option with the
trunk in bfloat16 (:mod:`detector.conv_precision`, where the CPU has it natively), against
``torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn`` (random weights, its default
transform, min_size 800), whose own RPN is inside its time. End to end, SPP-net runs as the per-image
loop (``detect(im)``: selective search split over the torch threads, then the network), as
``detect_batch(images, workers=1)``, which computes the next images' proposals in a worker process
while the network runs, and as ``detect_batch(images)`` with its machine-dependent default; and the
loop with the bfloat16 trunk and selective search on a smaller copy of the image
(``proposals.ss_side`` 240 instead of 320), the cheaper proposal setting.

Shape shorthand: R proposals in one image.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from detector.bench import inputs as TI
from detector.bench.random_model import random_detector

__all__ = ["section_peers", "peer_images"]


def peer_images(voc_root: str | None, split: str = "test", n_images: int = 24) -> tuple[list[np.ndarray], str]:
    """The images of the section: the first ``n_images`` of a VOC-layout split (0 = all), or
    VOC-sized photos when no root is given. Returns (uint8 RGB arrays, a description)."""
    if not voc_root:
        photos = TI.voc_sized_photos(n_images or 12)
        return [im for _, im in photos], f"{len(photos)} photos resized to 500x375 (`voc_sized_photos`)"
    from proposals.imageio import read_image

    root = Path(voc_root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"{ids_file}: no '{split}' split list under the VOC root {root}")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    ids = ids[: n_images] if n_images else ids
    images = []
    for i in ids:
        path = next((p for p in (root / "JPEGImages" / f"{i}{ext}" for ext in (".jpg", ".jpeg", ".png")) if p.is_file()),
                    None)
        if path is None:
            raise FileNotFoundError(f"{root / 'JPEGImages'}: no image for id {i!r} of {ids_file}")
        images.append(read_image(path))
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
    return images, f"The first {len(images)} images of {root.name}'s '{split}' split ({', '.join(sizes[:3])})"


@torch.inference_mode()
def section_peers(voc_root: str | None = None, split: str = "test", n_images: int = 24, runs: int = 1,
                  svd_rank: int = 256, small_ss_side: int = 240) -> tuple[str, dict[str, float]]:
    """Throughput (images per second) over the same images: SPP-net (dense, SVD ``svd_rank`` + int8,
    and that with a bfloat16 trunk, end to end also with selective search on a ``small_ss_side`` px
    copy) and the torchvision peer, with given proposals and end to end (module docstring)."""
    import torchvision

    from detector.detector import spare_cores
    from detector.fc_precision import lower_fc_precision
    from detector.head import LowRankLinear
    from proposals import propose

    images, what = peer_images(voc_root, split, n_images)
    n = len(images)
    dense = random_detector(width_mult=1.0, fc_dim=4096, seed=0)
    fast = random_detector(width_mult=1.0, fc_dim=4096, seed=0)
    # random rank-r factors of the shapes compress_svd makes (an SVD of random weights would take
    # minutes and time the same)
    fast.head.fc6 = LowRankLinear(fast.head.in_dim, fast.head.fc_dim, svd_rank).eval()
    fast.head.fc7 = LowRankLinear(fast.head.fc_dim, fast.head.fc_dim, svd_rank).eval()
    fast.head = lower_fc_precision(fast.head, "int8")
    fastest = random_detector(width_mult=1.0, fc_dim=4096, seed=0)
    fastest.head = fast.head
    fastest.lower_conv("bfloat16")  # float32 with a warning where bfloat16 is not native
    opts = dense.params.proposal_options
    threads = torch.get_num_threads()  # what detect(im) splits selective search over
    t0 = time.perf_counter()
    boxes = [torch.from_numpy(np.asarray(propose(im, threads=threads, **opts), dtype=np.float32)).reshape(-1, 4)
             for im in images]
    ss_ips = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for im in images:
        propose(im, **opts)  # one thread, as a proposal worker process runs it
    ss_one_ips = n / (time.perf_counter() - t0)
    # the cheaper proposal setting (BENCHMARKS.md, proposal variants): selective search on a smaller copy
    small_opts = {**opts, "ss_side": small_ss_side}
    t0 = time.perf_counter()
    for im in images:
        propose(im, threads=threads, **small_opts)
    ss_small_ips = n / (time.perf_counter() - t0)
    peer = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im in images]  # (3, H, W) each
    for d in (dense, fast, fastest):
        d.detect(images[0], proposals=boxes[0])  # warm-up
    peer([tensors[0]])

    def spp_given(d):
        return lambda: [d.detect(im, proposals=b) for im, b in zip(images, boxes)]

    def fastest_small_proposals():
        """The loop ``fastest.detect(im)`` with ``small_opts`` as the model's proposal settings."""
        saved = fastest.params
        fastest.params = dataclasses.replace(saved, proposal_options=small_opts)
        try:
            return [fastest.detect(im) for im in images]
        finally:
            fastest.params = saved

    arms = [
        ("SPP-net ZF-5 1 scale, fc 4096 dense float32", "given", spp_given(dense)),
        (f"SPP-net ZF-5 1 scale, fc 4096 SVD {svd_rank} + int8", "given", spp_given(fast)),
        ("torchvision fasterrcnn_mobilenet_v3_large_fpn (its RPN inside)", "own RPN",
         lambda: [peer([t]) for t in tensors]),
        (f"SPP-net ZF-5 1 scale, SVD {svd_rank} + int8, loop `detect(im)`", "selective search, in turn",
         lambda: [fast.detect(im) for im in images]),
        (f"SPP-net ZF-5 1 scale, SVD {svd_rank} + int8, `detect_batch(images, workers=1)`",
         "selective search, overlapped", lambda: fast.detect_batch(images, workers=1)),
        (f"SPP-net ZF-5 1 scale, trunk {fastest.conv_precision}, fc 4096 SVD {svd_rank} + int8", "given",
         spp_given(fastest)),
        (f"SPP-net ZF-5 1 scale, trunk {fastest.conv_precision}, SVD {svd_rank} + int8, loop `detect(im)`",
         "selective search, in turn", lambda: [fastest.detect(im) for im in images]),
        (f"SPP-net ZF-5 1 scale, trunk {fastest.conv_precision}, SVD {svd_rank} + int8, "
         "`detect_batch(images, workers=1)`", "selective search, overlapped",
         lambda: fastest.detect_batch(images, workers=1)),
        (f"SPP-net ZF-5 1 scale, trunk {fastest.conv_precision}, SVD {svd_rank} + int8, loop `detect(im)`",
         f"selective search on a {small_ss_side} px copy, in turn", fastest_small_proposals),
        (f"SPP-net ZF-5 1 scale, trunk {fastest.conv_precision}, SVD {svd_rank} + int8, `detect_batch(images)` "
         f"(default workers: {1 if spare_cores() else 0} here)", "selective search, the default",
         lambda: fastest.detect_batch(images)),
    ]
    # round robin: every run times each arm once, the order rotating, so the machine's drift over the
    # minutes of a run hits all rows alike (the ratios to the peer are taken within the same runs)
    ips: list[list[float]] = [[] for _ in arms]
    for r in range(runs):
        for i in [(r + j) % len(arms) for j in range(len(arms))]:
            t0 = time.perf_counter()
            arms[i][2]()
            ips[i].append(n / (time.perf_counter() - t0))
    rows = [(name, props, {"median": statistics.median(v), "min": min(v), "max": max(v)})
            for (name, props, _), v in zip(arms, ips)]
    keys = ["peers_spp_dense_given_images_per_s", "peers_spp_fast_given_images_per_s", "peers_tv_mobilenet_images_per_s",
            "peers_spp_fast_loop_end_to_end_images_per_s", "peers_spp_fast_batch_end_to_end_images_per_s",
            "peers_spp_fastbf16_given_images_per_s", "peers_spp_fastbf16_loop_end_to_end_images_per_s",
            "peers_spp_fastbf16_batch_end_to_end_images_per_s", "peers_spp_fastbf16_small_ss_loop_end_to_end_images_per_s",
            "peers_spp_fastbf16_batch_default_end_to_end_images_per_s"]
    ratios = {k: r[2]["median"] for k, r in zip(keys, rows)}
    ratios["peers_selective_search_images_per_s"] = ss_ips
    ratios["peers_selective_search_one_thread_images_per_s"] = ss_one_ips
    ratios["peers_selective_search_small_images_per_s"] = ss_small_ips
    # each row against the peer within the same run, then the median over runs
    vs_peer = [statistics.median(a / p for a, p in zip(v, ips[2])) for v in ips]
    for i, k in enumerate(keys):
        if i != 2:
            ratios[k.replace("_images_per_s", "_over_peer")] = vs_peer[i]
    lines = ["| detector | proposals | images per second, median [min-max] | s per image | vs the peer (median of the runs' ratios) |",
             "|---|---|---|---|---|"]
    for (name, props, s), r in zip(rows, vs_peer):
        lines.append(f"| {name} | {props} | {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] | "
                     f"{1 / s['median']:.3f} | {r:.2f}x |")
    md = (f"{what}; random weights everywhere, {torch.get_num_threads()} torch threads, {runs} run(s) over the "
          f"list, each run timing every row once in a rotating order. Selective search ({opts.get('mode', '?')}, at most {opts.get('max_boxes', '?')} boxes) alone, split "
          f"over {threads} threads as `detect(im)` runs it: {ss_ips:.2f} images per second "
          f"({statistics.mean(len(b) for b in boxes):.0f} boxes per image; one thread: {ss_one_ips:.2f}); on a "
          f"{small_ss_side} px copy (`proposals.ss_side`, default {opts.get('ss_side', '?')}): {ss_small_ips:.2f}. "
          f"Throughput over the whole list (`n / seconds`), so an overlapped pipeline counts at its real rate.\n\n"
          + "\n".join(lines))
    return md, ratios
