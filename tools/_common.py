"""Shared plumbing of the tools (config -> library calls). Imported as ``_common`` by the scripts
in this folder (Python puts a script's own folder on sys.path; no path edits needed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from detector.config import Config, ConfigError, config_to_dict, load_config

log = logging.getLogger("sppnet")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file of overrides (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides, e.g. finetune.iters=500 features.test_scales=[688]")


def load_cfg_or_exit(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def setup_logging(out_dir: Path | None = None, name: str = "log.txt") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / name))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def setup_torch(cfg: Config) -> None:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)


def digest(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (cache keys)."""
    def conv(x: Any) -> Any:
        if hasattr(x, "__dataclass_fields__"):
            return config_to_dict(x)
        if isinstance(x, Path):
            return str(x)
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {str(k): conv(v) for k, v in x.items()}
        return x
    return hashlib.sha1(json.dumps(conv(list(parts)), sort_keys=True).encode()).hexdigest()[:16]


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_if_valid(path: Path, key: str) -> Any | None:
    """The stage output at ``path`` when it exists and was made under ``key``; else None."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or unsafe: rebuild
        log.warning("%s unreadable (%s); rebuilding", path, type(e).__name__)
        return None
    if not isinstance(obj, dict) or obj.get("key") != key:
        log.info("%s is stale (made under another configuration); rebuilding", path)
        return None
    return obj


def proposal_options(cfg: Config) -> dict:
    """Keyword arguments of proposals.selective_search for the config's proposal settings."""
    pc = cfg.proposals
    return {"mode": pc.mode, "min_size": pc.min_size, "max_boxes": pc.max_boxes or None,
            "ss_side": pc.ss_side, "grid_min": pc.grid_min, "grid_stride": pc.grid_stride,
            "grid_aspect_ratios": tuple(pc.grid_aspect_ratios)}


def training_records(cfg: Config, raw_boxes: bool = False, class_names: Sequence[str] | None = None
                     ) -> tuple[list, list, list, list[str]]:
    """The training split as ``train_detector.py`` divides it: ``(train, fine_tune, held_out, classes)``.

    ``train`` is ``data.train_split`` (its first ``data.max_train_images`` when set); ``held_out`` is
    ``data.val_split`` when set, else ``data.val_fraction`` of ``train`` chosen with ``seed``
    (``detector.training.split_train_val``), never fine-tuned on; ``fine_tune`` is the rest.
    ``raw_boxes`` loads the annotations as the evaluation reads them and ``class_names`` (default
    ``data.classes``, else every name in the split) sets the label ids (``load_voc_split``).
    """
    from detector.training import split_train_val
    from detector.data.voc import load_voc_split

    dc = cfg.data
    train, classes = load_voc_split(dc.root, dc.train_split, class_names or dc.classes or None,
                                   raw_boxes=raw_boxes)
    if dc.max_train_images:
        train = train[: dc.max_train_images]
    if dc.val_split:
        held, _ = load_voc_split(dc.root, dc.val_split, classes, raw_boxes=raw_boxes)
        held_ids = {r.image_id for r in held}
        fine_tune = [r for r in train if r.image_id not in held_ids]
    else:
        fine_tune, held = split_train_val(train, dc.val_fraction, cfg.seed)
    return list(train), list(fine_tune), list(held), list(classes)


def records_with_proposals(train: Sequence, held_out: Sequence) -> dict:
    """``{image_id: record}`` of every image whose proposals the training run computes, in the order
    that keys its proposal cache (``split_proposals`` of ``data.train_split``)."""
    return {r.image_id: r for r in list(train) + list(held_out)}


def proposal_cache_path(cfg: Config, split: str, ids_paths: Sequence[tuple[str, Path]], out_dir: Path) -> Path:
    """Where ``split_proposals`` caches computed proposals: keyed by the proposal settings and the
    image list (ids and paths, in order)."""
    pc = cfg.proposals
    key = digest(pc.method, proposal_options(cfg), pc.edge_model, [i for i, _ in ids_paths],
                 [str(p) for _, p in ids_paths])
    return out_dir / "proposals" / f"{split}-{key}.npz"


def split_proposals(cfg: Config, split: str, ids_paths: Sequence[tuple[str, Path]], out_dir: Path,
                    file: str = "") -> dict[str, np.ndarray]:
    """Proposals of one split: loaded from ``file`` (method "file") or computed and cached.

    Computed proposals live in ``out_dir/proposals/<split>-<key>.npz`` where the key covers the
    proposal settings and the image list; a killed run resumes from its per-image shards.
    """
    from proposals import compute_proposals_for_images, load_proposals

    ids = [i for i, _ in ids_paths]
    pc = cfg.proposals
    if pc.method == "file":
        if not file:
            sys.exit(f"config error: proposals.method is 'file' but no file is set for split '{split}' "
                     "(proposals.train_file / proposals.test_file)")
        return load_proposals(file, ids)
    if pc.method not in ("selective_search", "edge_boxes"):
        sys.exit(f"config error: proposals.method must be selective_search, edge_boxes or file, got '{pc.method}'")
    out = proposal_cache_path(cfg, split, ids_paths, out_dir)
    if out.is_file():
        try:
            return load_proposals(out, ids)
        except Exception as e:  # corrupt: recompute
            log.warning("%s unreadable (%s); recomputing", out, e)
    log.info("computing %s proposals for %d %s images -> %s", pc.method, len(ids), split, out)
    opts = proposal_options(cfg)
    if pc.method == "edge_boxes":
        sys.exit("config error: proposals.method 'edge_boxes' is available through proposals.edge_boxes for "
                 "single images; split-level EdgeBoxes is not wired into training yet (use selective_search "
                 "or a proposal file)")
    base = {k: opts.pop(k) for k in ("mode", "min_size", "max_boxes")}
    return compute_proposals_for_images(list(ids_paths), out, workers=pc.workers, progress=True,
                                        ss_options=opts, **base)


def peak_memory_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB (Linux ru_maxrss)."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0
