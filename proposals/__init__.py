"""Object proposals for SPP-net: selective search (OpenCV contrib), EdgeBoxes, proposal files.

Public API (imported lazily, so a worker process that needs only selective search never imports
torch):
    propose(image, method="selective_search", **options) -> ndarray float32 [R, 4] xyxy
    selective_search(image, mode="fast+", min_size=20, max_boxes=None) -> ndarray float32 [R, 4] xyxy
    edge_boxes(image, model_path, max_boxes=2000) -> ndarray float32 [R, 4] xyxy
    grid_boxes(height, width, ...) -> ndarray float32 [R, 4] xyxy
    read_image(path) / to_rgb_uint8(array) -> ndarray uint8 [H, W, 3] RGB; ImageError
    load_proposals(path, image_ids) / read_proposal_file(path) / save_proposals(path, dict)
    compute_proposals_for_images(items, out, options, workers=2) -> dict id -> boxes
    start_proposal_pool(workers) -> a process pool for propose() calls
    usable_cores() -> CPU cores this process may run on (its affinity)
    proposal_recall(proposals, gt_boxes, ...) -> recall table
"""
from __future__ import annotations

import importlib

# eager: these import no torch (and the function must shadow its module's name)
from proposals.imageio import ImageError, read_image, to_rgb_uint8
from proposals.selective_search import METHODS, MODES, edge_boxes, grid_boxes, propose, selective_search

_WHERE = {
    "ProposalFileError": "store", "load_proposals": "store", "read_proposal_file": "store",
    "save_proposals": "store",
    "compute_proposals_for_images": "compute", "start_proposal_pool": "compute", "usable_cores": "compute",
    "proposal_recall": "recall",
}

__all__ = ["ImageError", "read_image", "to_rgb_uint8", "METHODS", "MODES", "propose", "selective_search",
           "edge_boxes", "grid_boxes", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"proposals.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'proposals' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
