"""Shared fixtures. BCCD (../shared/datasets/BCCD) is used when present and skipped otherwise."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """Path of the real BCCD data set; skips the test on a clone without ../shared."""
    if not (BCCD / "Annotations").is_dir():
        pytest.skip("../shared/datasets/BCCD not present (a user's clone has no ../shared)")
    return BCCD
