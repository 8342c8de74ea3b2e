"""Crops on disk, read back by index: the pre-training set in bounded memory.

Shape shorthand:
    M: crops in the store      S: crop side      N: crops read at once

A pre-training set holds ``crops_per_image + bg_per_image`` crops of every training image, 150 KB
each at 224 px: 1.5 GB per 1000 images at the default 10 crops, more than memory at VOC or
ImageNet scale. :class:`CropStore` appends the crops to an unnamed temporary file (deleted by the
OS when the process ends, killed or not) and reads a batch back with one ``pread`` per run of
consecutive rows. The OS page cache keeps what fits in memory; the process itself holds one
batch. It indexes like the ``Tensor[M, S, S, 3]`` it replaces (``store[idx]`` with an int, a
slice, or an index tensor), so the training loops take either.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["CropStore"]


class CropStore:
    """uint8 crops ``[M, S, S, 3]`` in a temporary file.

    Args:
        size: S.
        folder: where the temporary file lives (default: the system's temp folder). Use a folder
            with room for ``M * S * S * 3`` bytes, e.g. the run's output folder.
    """

    def __init__(self, size: int, folder: str | Path | None = None) -> None:
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder)
        self.size = int(size)
        self._row = self.size * self.size * 3
        self._n = 0

    def append(self, crops: Tensor) -> None:
        """Add crops (Tensor[N, S, S, 3] uint8) at the end."""
        if crops.dtype != torch.uint8 or tuple(crops.shape[1:]) != (self.size, self.size, 3):
            raise ValueError(f"CropStore of side {self.size} takes uint8 [N, {self.size}, {self.size}, 3], got "
                             f"{crops.dtype} {tuple(crops.shape)}")
        os.pwrite(self._file.fileno(), crops.contiguous().numpy().tobytes(), self._n * self._row)
        self._n += int(crops.shape[0])

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._n, self.size, self.size, 3)

    def __getitem__(self, index: int | slice | Tensor | np.ndarray | list) -> Tensor:
        """Crops by index: an int gives Tensor[S, S, 3], anything else Tensor[N, S, S, 3] (uint8)."""
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = np.arange(self._n)[index.numpy() if isinstance(index, Tensor) else index]  # (N,)
        out = np.empty((rows.shape[0], self.size, self.size, 3), dtype=np.uint8)  # (N, S, S, 3)
        flat = out.reshape(rows.shape[0], self._row)
        fd = self._file.fileno()
        j = 0
        while j < rows.shape[0]:  # one read per run of consecutive rows
            k = j + 1
            while k < rows.shape[0] and rows[k] == rows[k - 1] + 1:
                k += 1
            want = (k - j) * self._row
            got = os.preadv(fd, [memoryview(flat[j:k]).cast("B")], int(rows[j]) * self._row)
            if got != want:
                raise OSError(f"crop store: read {got} of {want} bytes (the temporary file was truncated)")
            j = k
        return torch.from_numpy(out)

    def close(self) -> None:
        self._file.close()
