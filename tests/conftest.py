"""Shared fixtures. BCCD (../shared/datasets/BCCD) is used when present and skipped otherwise."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """Path of the real BCCD data set; skips the test on a clone without ../shared."""
    if not (BCCD / "Annotations").is_dir():
        pytest.skip("../shared/datasets/BCCD not present (a user's clone has no ../shared)")
    return BCCD


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny inputs: one intra-op thread. With other processes on a 2-core machine, a second
    spinning OpenMP thread made small ops 4-30x slower (a 64x256 SVD: 1.3 s with 2 threads, 3 ms
    with 1). Subprocess tests (tools) set their own threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
