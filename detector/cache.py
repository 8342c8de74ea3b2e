"""On-disk cache of conv5 maps: one file per image (and flip), every scale, float16 (spec §2).

Shape shorthand (one alphabet for the whole project):
    S: image scales      C: conv5 channels      Hs x Ws: conv5 size at scale s

Validity. A cache is described by a *key*: a JSON-able dict of everything that changes the maps
(:func:`conv5_cache_key`: arch, width, channels, a hash of the trunk's weights, scales, max-size cap,
input format, resize rule, storage dtype). Its short hash is part of every file name,
``<image id>.<orig|flip>.<key hash>.pt``, so an entry is valid only for the key that wrote it: a
changed key makes every old entry stale, :meth:`Conv5Cache.build` recomputes it and
:meth:`Conv5Cache.put` deletes the stale file of the same image.

Safety (``detector.artifacts``). Entries are written atomically, so an interrupted build leaves a
complete entry or a temp file, never a half-written entry; temp files of dead processes are
removed when a cache is opened, and a build resumes (valid entries are reused). Every entry passes
a content check (the CRC of every member) before its first use in a process, so an entry damaged in
place, even without a change of size, is rebuilt instead of being read; it is checked again if the
file changes afterwards. :meth:`Conv5Cache.content_id` digests the entries' CRCs, so the stages
made from the cache see when an entry was rebuilt into other bytes. Images are decoded by
``proposals.imageio.read_image``, the decoder of detection, so training and test see the same
pixels.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor, nn

from detector import distributed
from detector.artifacts import (
    ArtifactError,
    content_id,
    digest,
    load_torch,
    remove_stale_temps,
    save_torch,
    verify,
    write_text,
)

__all__ = ["Conv5Cache", "weights_hash", "conv5_cache_key", "CACHE_FORMAT"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout changes
RESIZE_RULE = "bilinear_no_antialias_round_half_up"  # detector.pyramid.resized_size + image_pyramid

ComputeFn = Callable[[str, bool], "tuple[Sequence[Tensor], Sequence[tuple[int, int]]]"]


def weights_hash(module: nn.Module) -> str:
    """SHA-1 (16 hex digits) of a module's state_dict: names, dtypes, shapes and bytes, in order.

    Args:
        module: e.g. a backbone; buffers (BatchNorm statistics) count.
    Returns:
        str: equal for equal weights, different as soon as one value changes.
    """
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def conv5_cache_key(backbone: nn.Module, scales: Sequence[int], max_size: int = 0, **extra: Any) -> dict:
    """Everything that changes the cached conv5 maps of ``backbone`` (JSON-able).

    Args:
        backbone: trunk from :func:`detector.backbones.build_backbone`.
        scales: shorter sides of the pyramid, in order.
        max_size: cap on the resized longer side (0 = none).
        extra: more JSON-able fields the caller wants in the key.
    Returns:
        dict with format, arch, width_mult, out_channels, weights (hash), input_format, scales,
        max_size, resize rule and storage dtype.
    """
    key = {
        "format": CACHE_FORMAT,
        "arch": type(backbone).__name__,
        "width_mult": float(getattr(backbone, "width_mult", 1.0)),
        "out_channels": int(backbone.out_channels),
        "weights": weights_hash(backbone),
        "input_format": str(backbone.input_format),
        "scales": [int(s) for s in scales],
        "max_size": int(max_size),
        "resize": RESIZE_RULE,
        "dtype": "float16",
    }
    key.update(extra)
    return key


class Conv5Cache:
    """A folder of per-image conv5 pyramids, valid for one key.

    Either give ``key`` (any JSON-able dict) and pass ``compute_fn`` to :meth:`build`, or give
    ``backbone`` and ``scales`` (the key is then :func:`conv5_cache_key`, merged with ``key`` if
    both are given) and let :meth:`build` read the image files and run :func:`image_pyramid` itself.

    Args:
        root: cache folder (created).
        key: JSON-able dict describing the maps.
        backbone, scales, max_size, device: the trunk, pyramid scales, longer-side cap and device
            used when the cache computes entries itself.
    """

    def __init__(self, root: str | Path, key: dict | None = None, *, backbone: nn.Module | None = None,
                 scales: Sequence[int] | None = None, max_size: int = 0,
                 device: str | torch.device = "cpu"):
        if backbone is not None:
            if scales is None:
                raise ValueError("Conv5Cache: scales are required with a backbone")
            key = {**conv5_cache_key(backbone, scales, max_size), **(key or {})}
        if key is None:
            raise ValueError("Conv5Cache: give a key dict or a backbone and scales")
        try:
            text = json.dumps(key, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"Conv5Cache: key must be JSON-able ({e})") from None
        self.root = Path(root)
        self.key = json.loads(text)
        self.key_hash = hashlib.sha1(text.encode()).hexdigest()[:16]
        self.backbone, self.scales, self.max_size, self.device = backbone, scales, max_size, device
        self._checked: dict[Path, tuple[int, int]] = {}  # entries whose content check passed: (size, mtime)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)
        if distributed.current().main:  # one writer under torchrun: the ranks share the folder
            self._write_key()

    # ------------------------------------------------------------------ files
    def _stem(self, image_id: str, flipped: bool) -> str:
        return f"{quote(str(image_id), safe='')}.{'flip' if flipped else 'orig'}"

    def path(self, image_id: str, flipped: bool = False) -> Path:
        """File of one entry under the current key."""
        return self.root / f"{self._stem(image_id, flipped)}.{self.key_hash}.pt"

    def _write_key(self) -> None:
        key_file = self.root / "key.json"
        if key_file.is_file():
            try:
                old = json.loads(key_file.read_text())
            except (OSError, ValueError):
                old = None
            if old == self.key:
                return
            if isinstance(old, dict):
                changed = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
                log.warning("conv5 cache %s was built for another key (changed: %s); its entries are "
                            "stale and are rebuilt when needed", self.root, ", ".join(changed))
        write_text(key_file, json.dumps(self.key, indent=1, sort_keys=True))

    def _check(self, path: Path) -> str | None:
        """Why the entry at ``path`` cannot be used (None: intact). The full content check runs once
        per process and file version (size, mtime)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        stamp = (st.st_size, st.st_mtime_ns)
        if self._checked.get(path) == stamp:
            return None
        problem = verify(path)
        if problem is None:
            self._checked[path] = stamp
        return problem

    def has(self, image_id: str, flipped: bool = False) -> bool:
        """True when an intact entry exists under the current key (its content check passes)."""
        return self._check(self.path(image_id, flipped)) is None

    # ------------------------------------------------------------------ read / write
    def get(self, image_id: str, flipped: bool = False) -> tuple[list[Tensor], list[tuple[int, int]]] | None:
        """Cached pyramid of one image, or None when missing, stale or damaged (a damaged entry is
        deleted with a warning naming it, so the next build recomputes it).

        Returns:
            (fmaps, scaled_sizes): S Tensor[C, Hs, Ws] float16 (CPU) and the S resized image sizes
            (height, width) they were computed from; None if there is no valid entry.
        """
        path = self.path(image_id, flipped)
        problem = self._check(path)
        if problem == "missing":
            return None
        ok = False
        if problem is None:
            try:
                entry = load_torch(path, verified=True)
                ok = (isinstance(entry, dict) and entry.get("key_hash") == self.key_hash
                      and entry.get("image_id") == str(image_id) and entry.get("flipped") == bool(flipped))
                problem = None if ok else "its header names another key or image"
            except ArtifactError as e:
                problem = str(e)
        if not ok:
            log.warning("conv5 cache: %s cannot be used (%s); it will be rebuilt", path, problem)
            path.unlink(missing_ok=True)
            self._checked.pop(path, None)
            return None
        sizes = [(int(h), int(w)) for h, w in entry["scaled_sizes"]]
        return list(entry["fmaps"]), sizes

    def put(self, image_id: str, flipped: bool, fmaps: Sequence[Tensor],
            scaled_sizes: Sequence[tuple[int, int]]) -> Path:
        """Store one pyramid atomically (float16, CPU) and delete stale entries of the same image.

        Args:
            image_id: image identifier (any string; escaped for the file name).
            flipped: whether the maps are of the mirrored image.
            fmaps: S Tensor[C, Hs, Ws] (or Tensor[1, C, Hs, Ws]).
            scaled_sizes: S (height, width) of the resized images.
        Returns:
            Path of the entry.
        Raises:
            ValueError: wrong shapes or counts, or maps with NaN/inf (the image is named).
        """
        maps = []
        for i, f in enumerate(fmaps):
            if f.ndim == 4 and f.shape[0] == 1:
                f = f[0]  # (C, Hs, Ws)
            if f.ndim != 3:
                raise ValueError(f"Conv5Cache.put({image_id!r}): fmap {i} must be [C, Hs, Ws], got "
                                 f"{tuple(f.shape)}")
            maps.append(f.detach().to(device="cpu", dtype=torch.float16).contiguous())
        sizes = [[int(h), int(w)] for h, w in scaled_sizes]
        if len(sizes) != len(maps):
            raise ValueError(f"Conv5Cache.put({image_id!r}): {len(maps)} maps but {len(sizes)} sizes")
        n_scales = len(self.key.get("scales", maps))
        if len(maps) != n_scales:
            raise ValueError(f"Conv5Cache.put({image_id!r}): {len(maps)} maps for a key with "
                             f"{n_scales} scales")
        if not all(bool(torch.isfinite(m).all()) for m in maps):
            raise ValueError(f"Conv5Cache.put({image_id!r}): the maps hold NaN/inf (the trunk's weights or the "
                             f"image are broken)")
        entry = {"format": CACHE_FORMAT, "key_hash": self.key_hash, "image_id": str(image_id),
                 "flipped": bool(flipped), "scaled_sizes": sizes, "fmaps": maps}
        path = save_torch(self.path(image_id, flipped), entry)
        self._checked.pop(path, None)
        for old in self.root.glob(f"{self._stem(image_id, flipped)}.*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    # ------------------------------------------------------------------ build
    def compute(self, image: np.ndarray) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """Pyramid of one RGB image with the cache's backbone (no caching)."""
        from detector.pyramid import image_pyramid, pyramid_sizes

        if self.backbone is None:
            raise ValueError("Conv5Cache.compute needs a cache opened with a backbone")
        fmaps = image_pyramid(self.backbone, image, self.scales, self.max_size, self.device)
        sizes = pyramid_sizes(image.shape[0], image.shape[1], self.scales, self.max_size)
        return [f[0] for f in fmaps], sizes

    def _compute_from_file(self, flipped: bool, path: str | Path) -> tuple[list[Tensor], list[tuple[int, int]]]:
        from proposals.imageio import read_image

        image = read_image(path)
        if flipped:
            image = np.ascontiguousarray(image[:, ::-1])
        return self.compute(image)

    def build(self, items: Iterable[tuple], compute_fn: ComputeFn | None = None,
              progress: bool = True) -> dict[str, int]:
        """Make sure every item has an intact entry; compute the missing, stale or damaged ones.

        Args:
            items: ``(image_id, flipped)`` with ``compute_fn``, or ``(image_id, flipped, image_path)``
                for a cache opened with a backbone (the file is read as RGB and mirrored if flipped).
            compute_fn: ``(image_id, flipped) -> (fmaps, scaled_sizes)``.
            progress: show a tqdm bar.
        Returns:
            dict with ``built``, ``reused`` and ``disk_bytes`` (all current entries).
        """
        from tqdm import tqdm

        items = list(items)
        todo = []
        for it in items:
            problem = self._check(self.path(it[0], bool(it[1])))
            if problem is not None:
                if problem != "missing":
                    log.warning("conv5 cache: %s cannot be used (%s); rebuilding it", self.path(it[0], bool(it[1])),
                                problem)
                todo.append(it)
        for it in tqdm(todo, desc="conv5 cache", disable=not progress or not todo, unit="img"):
            image_id, flipped = it[0], bool(it[1])
            if compute_fn is not None:
                fmaps, sizes = compute_fn(image_id, flipped)
            elif len(it) >= 3:
                fmaps, sizes = self._compute_from_file(flipped, it[2])
            else:
                raise ValueError(f"Conv5Cache.build: item {it!r} has no image path and no compute_fn "
                                 f"was given")
            self.put(image_id, flipped, fmaps, sizes)
        stats = {"built": len(todo), "reused": len(items) - len(todo), "disk_bytes": self.disk_bytes()}
        log.info("conv5 cache %s: %d built, %d reused, %.1f MB on disk", self.root, stats["built"],
                 stats["reused"], stats["disk_bytes"] / 2**20)
        return stats

    def content_id(self, items: Iterable[tuple]) -> str:
        """Digest of the key and of the entries of ``items`` (``(image_id, flipped, ...)``): their
        CRCs, read from the zip directories only. Changes when an entry is rebuilt into other bytes."""
        return digest(self.key_hash, [content_id(self.path(it[0], bool(it[1]))) for it in items])

    # ------------------------------------------------------------------ housekeeping
    def disk_bytes(self, include_stale: bool = False) -> int:
        """Bytes on disk of the current key's entries (and of stale ones with ``include_stale``)."""
        pattern = "*.pt" if include_stale else f"*.{self.key_hash}.pt"
        return sum(p.stat().st_size for p in self.root.glob(pattern) if p.is_file())

    def purge_stale(self) -> int:
        """Delete entries written under other keys; returns the number of files removed."""
        n = 0
        for p in self.root.glob("*.pt"):
            if not p.name.endswith(f".{self.key_hash}.pt"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"*.{self.key_hash}.pt"))
