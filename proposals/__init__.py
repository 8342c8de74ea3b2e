"""Object proposals for SPP-net: selective search (OpenCV contrib), EdgeBoxes, proposal files.

Public API:
    selective_search(image, mode="fast+", min_size=20, max_boxes=None) -> ndarray float32 [R, 4] xyxy
    edge_boxes(image, model_path, max_boxes=2000) -> ndarray float32 [R, 4] xyxy
    grid_boxes(height, width, ...) -> ndarray float32 [R, 4] xyxy
    read_image(path) / to_rgb_uint8(array) -> ndarray uint8 [H, W, 3] RGB; ImageError
    load_proposals(path, image_ids) / read_proposal_file(path) / save_proposals(path, dict)
    compute_proposals_for_images(items, out, workers=2, ...) -> dict id -> boxes
    proposal_recall(proposals, gt_boxes, ...) -> recall table
"""
from proposals.imageio import ImageError, read_image, to_rgb_uint8
from proposals.selective_search import MODES, edge_boxes, grid_boxes, selective_search
from proposals.store import (ProposalFileError, load_proposals, read_proposal_file, save_proposals)
from proposals.compute import compute_proposals_for_images
from proposals.recall import proposal_recall

__all__ = [
    "ImageError", "read_image", "to_rgb_uint8",
    "MODES", "selective_search", "edge_boxes", "grid_boxes",
    "ProposalFileError", "load_proposals", "read_proposal_file", "save_proposals",
    "compute_proposals_for_images", "proposal_recall",
]
