"""Stage ``proposals``: the windows of every image of a split, computed once and kept.

``proposals.method`` "selective_search" / "edge_boxes" computes them (``proposals.propose``, in
``proposals.workers`` processes, resumable per shard) into
``<output_dir>/proposals/<split>-<key>.npz``; "file" reads a proposal file (R-CNN ``.mat``,
detectron2 ``.pkl`` or the project's ``.npz``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from detector import distributed
from detector.artifacts import content_id, digest, verify
from detector.config import Config, ProposalConfig
from detector.data.voc import ImageRecord
from detector.engine.run import Stage
from proposals.compute import compute_proposals_for_images, prepare_parts, proposals_key
from proposals.store import NpzProposals, ProposalFileError, load_proposals, read_npz_meta

__all__ = ["ProposalsStage", "proposal_options"]

log = logging.getLogger(__name__)


def proposal_options(pc: ProposalConfig) -> dict:
    """Keyword arguments of :func:`proposals.propose` for the config's proposal settings (a
    detector stores them to propose windows for images given without proposals)."""
    if pc.method == "edge_boxes":
        return {"method": "edge_boxes", "model_path": pc.edge_model, "max_boxes": pc.max_boxes or 2000,
                "min_size": pc.min_size}
    return {"method": "selective_search", "mode": pc.mode, "min_size": pc.min_size,
            "max_boxes": pc.max_boxes or None, "ss_side": pc.ss_side, "grid_min": pc.grid_min,
            "grid_stride": pc.grid_stride, "grid_aspect_ratios": tuple(pc.grid_aspect_ratios)}


class ProposalsStage(Stage[Mapping[str, np.ndarray]]):
    """Proposals of ``records`` (a split, in order): ``{image_id: ndarray float32 [R, 4] xyxy}``.

    Computed proposals come back as an :class:`~proposals.store.NpzProposals` over the stage's file,
    which reads an image's boxes when asked, so the stages after it hold no boxes of their own.

    Args:
        cfg: the config (``proposals`` section).
        split: the split's name, for the file name and messages.
        records: the images.
        out_dir: the run's output folder.
        file: the proposal file when ``proposals.method`` is "file".
    """

    name = "proposals"

    def __init__(self, cfg: Config, split: str, records: Sequence[ImageRecord], out_dir: Path, file: str = "") -> None:
        super().__init__()
        self.pc, self.split, self.file = cfg.proposals, split, file
        self.items = [(r.image_id, r.path) for r in records]
        self.out_dir = Path(out_dir)
        if self.pc.method == "file" and not file:
            raise ValueError(f"proposals.method is 'file' but no proposal file is set for split '{split}' "
                             f"(proposals.train_file / proposals.test_file)")

    def settings(self) -> object:
        if self.pc.method == "file":
            p = Path(self.file)
            st = p.stat() if p.is_file() else None
            return ["file", str(p), None if st is None else [st.st_size, st.st_mtime_ns], [i for i, _ in self.items]]
        # the file's own key: the options, the images and proposals.compute's PROPOSALS_REVISION
        return proposals_key(self.items, proposal_options(self.pc))

    @property
    def path(self) -> Path:
        """Where computed proposals are kept."""
        return self.out_dir / "proposals" / f"{self.split}-{self.key}.npz"

    def load(self) -> Mapping[str, np.ndarray] | None:
        if self.pc.method == "file":
            return None  # reading the file is the build
        if not self.path.is_file() or read_npz_meta(self.path) != proposals_key(self.items, proposal_options(self.pc)):
            return None
        problem = verify(self.path)
        if problem is None:
            try:
                data = NpzProposals(self.path)
            except ProposalFileError as e:
                problem = str(e)
        if problem is not None:
            log.warning("%s: %s; recomputing it", self.path, problem)
            return None
        return data if list(data) == [i for i, _ in self.items] else None

    def build(self) -> Mapping[str, np.ndarray]:
        if self.pc.method == "file":
            return load_proposals(self.file, [i for i, _ in self.items])
        info, opts = distributed.current(), proposal_options(self.pc)
        log.info("computing %s proposals for %d %s images -> %s", self.pc.method, len(self.items), self.split,
                 self.path)
        if info.active:  # every rank computes its shards of images; rank 0 merges them
            if info.main:
                prepare_parts(self.items, self.path, opts)
            distributed.barrier("proposal parts ready")
            compute_proposals_for_images(self.items, self.path, opts, workers=self.pc.workers, progress=info.main,
                                         shard=(info.rank, info.world))
            distributed.barrier("proposal shards written")
        data = compute_proposals_for_images(self.items, self.path, opts, workers=self.pc.workers,
                                            progress=True) if info.main else None  # reads the file on demand
        distributed.barrier("proposal file written")
        if data is None:
            data = self.load()
            if data is None:
                raise RuntimeError(f"{self.path}: rank 0 wrote the proposal file, but this rank cannot read it "
                                   f"(is output_dir on a filesystem every rank shares?)")
        return data

    def identity(self, value: dict) -> str:
        if self.pc.method == "file":
            return self.key
        return digest(self.key, content_id(self.path))


def mean_count(props: Mapping[str, np.ndarray]) -> float:
    """Mean number of proposals per image."""
    return float(np.mean([len(b) for b in props.values()])) if props else 0.0
