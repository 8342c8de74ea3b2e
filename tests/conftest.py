"""Shared fixtures. BCCD (../shared/datasets/BCCD) is used when present and skipped otherwise."""
from __future__ import annotations

from pathlib import Path

import subprocess
import sys

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


# A tiny digits run (12 trainval, 4 test images, a 1/8-width ZF-5): every stage in seconds.
TINY = """
name: tiny
output_dir: {out}
seed: 0
num_threads: 2
data: {{root: {data}, classes: [zero, one, two, three, four, five, six, seven, eight, nine], val_fraction: 0.2}}
proposals: {{max_boxes: 300, workers: 1}}
backbone: {{arch: zf5, width_mult: 0.125}}
pretrain: {{enabled: true, epochs: 2, sizes: [48, 64], fc_dim: 64, batch_size: 32, crops_per_image: 4,
           optimizer: adamw, lr: 0.002, init: kaiming, hflip: false}}
features: {{train_scales: [160, 320], test_scales: [240], target_side: 64}}
head: {{fc_dim: 64}}
finetune: {{iters: 40, lr: 0.01, lr_steps: [30], val_every: 20, val_batches: 2, batch_size: 32,
           chunk_iters: 20, chunk_images: 8}}
svm: {{stats_images: 10, stats_rois: 20, retrain_every: 200}}
"""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config trained and tested once through the real tools, uninterrupted:
    (root, config path, train CompletedProcess, test CompletedProcess); outputs in root/run."""
    from detector.data.digits_build import make_digits_dataset

    root = tmp_path_factory.mktemp("e2e")
    data = root / "digits"
    make_digits_dataset(data, seed=3, n_trainval=12, n_test=4)
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(out=root / "run", data=data))
    train = subprocess.run([sys.executable, str(REPO / "tools/train_detector.py"), "--config", str(cfg)],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert train.returncode == 0, train.stderr[-4000:]
    test = subprocess.run([sys.executable, str(REPO / "tools/test_net.py"), "--config", str(cfg),
                           "--time-proposals", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert test.returncode == 0, test.stderr[-4000:]
    return root, cfg, train, test


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint dict, by dotted name (tests compare two runs' checkpoints with it)."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, x: object) -> None:
        if isinstance(x, torch.Tensor):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return out
