"""Feature statistics: the scale factors that bring fc7 and pool5 features to a mean L2 norm of 20
(spec §7 for the SVMs' fc7 features, spec §8 for the box regressors' pool5 features).

Shape shorthand:
    r: windows sampled in one image      D = C*B pooled width      F: fc7 width
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from detector import distributed
from detector.head import FCHead
from detector.regions import Conv5Pyramid, ProjectionParams, pool_regions
from detector.train_items import TrainItem, candidates

__all__ = ["feature_norm_scales"]


@torch.inference_mode()
def feature_norm_scales(
    head: FCHead,
    items: Sequence[TrainItem],
    load_pyramid: Callable[[TrainItem], Conv5Pyramid],
    levels: Sequence[int],
    proj: ProjectionParams,
    target_norm: float,
    max_images: int,
    max_rois: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Scale factors that bring the mean L2 norm of fc7 and of pool5 features to ``target_norm``.

    Measured on at most ``max_images`` random images x ``max_rois`` random windows each (GT boxes
    included), pooled at the spec §5 scale, with a numpy generator seeded by ``seed`` (spec §7:
    200 x 200, fixed seed). With several processes each rank measures its share of the images and
    the norms are gathered in image order, so the means are the one-process means.

    Returns:
        (fc7 scale, pool5 scale): multiply every feature (training and test) by them.
    Raises:
        RuntimeError: the features are all zero or not finite (the message says which).
    """
    g = np.random.default_rng(seed)
    chosen = g.permutation(len(items))[:max_images]
    picks = [(int(i), g.permutation(candidates(items[int(i)]).shape[0])[:max_rois]) for i in chosen]
    head = head.to(device).eval()
    norms = {}  # position in `picks` -> (pool5 norms, fc7 norms); each rank measures its share
    for pos, (i, pick) in distributed.shard(list(enumerate(picks))):
        item = items[i]
        pooled = pool_regions(load_pyramid(item), candidates(item)[torch.as_tensor(pick)], levels, proj)  # (r, D)
        norms[pos] = (pooled.norm(dim=1).cpu(), head.features(pooled.to(device)).norm(dim=1).cpu())
    for part in distributed.all_gather(norms):
        norms.update(part)
    pool_mean = float(torch.cat([norms[p][0] for p in range(len(picks))]).mean())  # in image order
    fc_mean = float(torch.cat([norms[p][1] for p in range(len(picks))]).mean())
    for name, v in (("fc7", fc_mean), ("pool5", pool_mean)):
        if not np.isfinite(v):
            raise RuntimeError(f"{name} features are not finite (mean norm {v}): the trunk or head weights hold NaN/inf")
        if v <= 0:
            raise RuntimeError(f"{name} features are all zero: the trunk or head produces no signal")
    return target_norm / fc_mean, target_norm / pool_mean
