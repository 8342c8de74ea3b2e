"""Per-image proposal files: R-CNN / Fast R-CNN ``.mat``, detectron2 ``.pkl`` and the project's ``.npz``.

Shape shorthand (used across the project):
    R: proposals in one image

Every reader returns ``dict[image_id, ndarray float32 [R, 4]]`` in the project's convention (xyxy,
0-based, continuous pixels of the original image; ``detector.boxes``). The R-CNN ``.mat`` layout is
converted here, in :func:`_rcnn_mat_to_xyxy` (one of the project's three conversion edges).

Formats
-------
``.mat`` (R-CNN ``selective_search_data/*.mat``, Fast R-CNN ``data/selective_search_data``,
SPP-net ``fetch_ss_data_voc2007``): MATLAB v5 file with a cell array ``boxes`` (one ``[R, 4]``
double matrix per image, ``y1, x1, y2, x2``, 1-based inclusive pixels) and a cell array ``images``
of ids aligned with it. scipy stores a 1xN cell as an object array of shape ``(1, N)`` and an Nx1
cell as ``(N, 1)``; both are read. MATLAB v7.3 (HDF5) files are not read by scipy: the error says
how to convert them (``save(f, 'boxes', 'images', '-v7')`` in MATLAB/Octave).

``.pkl`` (detectron2 ``datasets/prepare_for_tests`` / ``PROPOSAL_FILES``): a dict with ``ids``,
``boxes`` (list of ``[R, 4]``), ``objectness_logits`` (list of ``[R]``) and ``bbox_mode`` (must be
``XYXY_ABS`` = 0, detectron2's continuous xyxy, already the project's convention). It is loaded with
a restricted unpickler that only builds numpy arrays and plain containers; any other class or
function in the pickle is refused (:class:`ProposalFileError`), so a pickle never runs code.

``.npz`` (this project, :func:`save_proposals`): ``ids`` (unicode ``[N]``), ``counts``
(int64 ``[N]``), ``boxes`` (float32 ``[sum R, 4]`` xyxy, images concatenated in ``ids`` order) and
``format`` = ``"sppnet-proposals-v1"``. Read with ``allow_pickle=False``; the file is written
uncompressed, so :class:`NpzProposals` reads one image's boxes from disk when asked and a long list of
images holds no boxes in memory (2000 boxes are 32 KB per image: 160 MB for VOC 2007 trainval).
"""
from __future__ import annotations

import enum
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

__all__ = [
    "ProposalFileError",
    "load_proposals",
    "read_proposal_file",
    "read_rcnn_mat",
    "read_detectron2_pkl",
    "read_npz",
    "NpzProposals",
    "save_proposals",
    "merge_proposal_files",
    "read_npz_meta",
    "NPZ_FORMAT",
]

NPZ_FORMAT = "sppnet-proposals-v1"


class ProposalFileError(ValueError):
    """Proposals that cannot be used: a file that cannot be read, ids that do not match the images
    asked for, or boxes of the wrong shape or with NaN/inf values (also those given to
    ``SPPDetector.detect``). Names the file or the image."""


def _check_boxes(boxes: np.ndarray, where: str) -> np.ndarray:
    b = np.asarray(boxes)
    if b.size == 0:
        return np.zeros((0, 4), np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ProposalFileError(f"{where}: expected boxes of shape [R, 4], got {tuple(b.shape)}")
    b = b.astype(np.float32)
    if not np.isfinite(b).all():
        raise ProposalFileError(f"{where}: boxes contain NaN or infinite values")
    return b


def _names(ids: Iterable[str], limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


# ----------------------------------------------------------------------------------------- .mat
def _rcnn_mat_to_xyxy(mat_boxes: np.ndarray) -> np.ndarray:
    """EDGE: R-CNN selective-search boxes ``(y1, x1, y2, x2)``, 1-based inclusive -> project xyxy.

    Reorders the columns to VOC order ``(x1, y1, x2, y2)`` (still 1-based inclusive) and applies
    :func:`detector.boxes.voc_to_xyxy`, which subtracts 1 from x1 and y1 only (pixel ``x2``,
    1-based inclusive, ends at the continuous coordinate ``x2``). Example: ``[1, 1, 20, 10]``
    (rows 1..20, cols 1..10) -> ``[0, 0, 10, 20]``, a 10 x 20 box.

    Args:
        mat_boxes (ndarray [R, 4]): as stored in the ``.mat`` cell.
    Returns:
        ndarray float32 [R, 4]: xyxy.
    """
    from detector.boxes import voc_to_xyxy  # here, not at the top: workers must not import torch

    voc = mat_boxes[:, [1, 0, 3, 2]]  # (R, 4) x1, y1, x2, y2, 1-based inclusive
    return voc_to_xyxy(np.ascontiguousarray(voc, dtype=np.float64)).numpy()


def _mat_str(x: object) -> str:
    arr = np.asarray(x)
    if arr.dtype.kind in "US":
        return "".join(str(s) for s in arr.ravel())
    if arr.dtype == object and arr.size == 1:
        return _mat_str(arr.ravel()[0])
    raise ProposalFileError(f"cannot read an image id from {arr!r}")


def read_rcnn_mat(path: str | Path) -> dict[str, np.ndarray]:
    """Read an R-CNN / Fast R-CNN / SPP-net selective-search ``.mat`` file.

    Args:
        path: ``.mat`` file with cells ``boxes`` and ``images`` (MATLAB v5/v7).
    Returns:
        dict id -> ndarray float32 [R, 4] xyxy (converted by :func:`_rcnn_mat_to_xyxy`).
    Raises:
        ProposalFileError: unreadable file, v7.3 (HDF5) file, missing variables, misaligned cells.
    """
    import scipy.io

    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB 7.3") or head[:8] == b"\x89HDF\r\n\x1a\n":
        raise ProposalFileError(
            f"{p}: MATLAB v7.3 (HDF5) file, which scipy cannot read. Convert it once, e.g. in "
            f"MATLAB/Octave: load('{p.name}'); save('{p.stem}_v7.mat', 'boxes', 'images', '-v7')")
    try:
        mat = scipy.io.loadmat(str(p))
    except NotImplementedError as e:  # scipy's message for v7.3
        raise ProposalFileError(f"{p}: {e}; save it with '-v7' in MATLAB/Octave") from None
    except Exception as e:
        raise ProposalFileError(f"{p}: not a readable .mat file ({type(e).__name__}: {e})") from None
    for key in ("boxes", "images"):
        if key not in mat:
            have = sorted(k for k in mat if not k.startswith("__"))
            raise ProposalFileError(f"{p}: no variable '{key}' (has: {have}); expected the R-CNN "
                                    f"layout with cells 'boxes' and 'images'")
    cells, images = np.asarray(mat["boxes"]), np.asarray(mat["images"])
    if cells.dtype != object:  # a single image stored as a plain matrix
        cells = np.array([cells], dtype=object)
    cells = cells.ravel()  # (1, N) and (N, 1) cells alike
    if images.dtype == object:
        ids = [_mat_str(x) for x in images.ravel()]
    elif images.dtype.kind in "US":  # char matrix (one id per row) or an array of strings
        ids = [str(x).strip() for x in images.ravel()]
    else:
        raise ProposalFileError(f"{p}: 'images' must be a cell array of strings, got {images.dtype}")
    if len(ids) != len(cells):
        raise ProposalFileError(f"{p}: 'images' has {len(ids)} entries but 'boxes' has {len(cells)}")
    out: dict[str, np.ndarray] = {}
    for image_id, b in zip(ids, cells):
        b = np.asarray(b, dtype=np.float64)
        if b.size == 0:
            out[image_id] = np.zeros((0, 4), np.float32)
            continue
        b = _check_boxes(b, f"{p}: image {image_id!r}").astype(np.float64)
        out[image_id] = _rcnn_mat_to_xyxy(b)
    if len(out) != len(ids):
        raise ProposalFileError(f"{p}: image ids are not unique")
    return out


# ----------------------------------------------------------------------------------------- .pkl
class _BoxMode(enum.IntEnum):
    """Stand-in for ``detectron2.structures.BoxMode`` so its pickled value loads without detectron2."""

    XYXY_ABS = 0
    XYWH_ABS = 1
    XYXY_REL = 2
    XYWH_REL = 3
    XYWHA_ABS = 4


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # numpy arrays pickled with protocol < 3 store bytes through it
    ("collections", "OrderedDict"),
    ("builtins", "bytes"),  # protocol-2 pickles rebuild bytes through a global
    ("__builtin__", "bytes"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only; every other global is refused."""

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("detectron2.") and name == "BoxMode":
            return _BoxMode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and "
                                     f"builtin containers are allowed in a proposal pickle)")


def read_detectron2_pkl(path: str | Path) -> dict[str, np.ndarray]:
    """Read a detectron2 proposal file (``ids``, ``boxes``, ``objectness_logits``, ``bbox_mode``).

    Boxes keep the file's order (detectron2 writes them by descending objectness).

    Args:
        path: ``.pkl`` file.
    Returns:
        dict str(id) -> ndarray float32 [R, 4] xyxy.
    Raises:
        ProposalFileError: unreadable or unsafe pickle, missing keys, unsupported ``bbox_mode``.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ProposalFileError(f"{p}: {e}") from None
    except Exception as e:
        raise ProposalFileError(f"{p}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, Mapping) or "ids" not in data or "boxes" not in data:
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise ProposalFileError(f"{p}: expected a dict with 'ids' and 'boxes' (detectron2 "
                                f"proposal file), got {keys}")
    mode = int(data.get("bbox_mode", 0))
    if mode != _BoxMode.XYXY_ABS:
        raise ProposalFileError(f"{p}: bbox_mode {mode} is not supported (only XYXY_ABS = 0)")
    ids = [str(i) for i in list(data["ids"])]
    boxes = list(data["boxes"])
    if len(ids) != len(boxes):
        raise ProposalFileError(f"{p}: {len(ids)} ids but {len(boxes)} box arrays")
    if len(set(ids)) != len(ids):
        raise ProposalFileError(f"{p}: image ids are not unique")
    return {i: _check_boxes(b, f"{p}: image {i!r}") for i, b in zip(ids, boxes)}


# ----------------------------------------------------------------------------------------- .npz
def _read_npz_arrays(p: Path, with_boxes: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``ids``, ``counts`` and (``with_boxes``) ``boxes`` of a project ``.npz``, its members and
    format checked."""
    try:
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            if not {"ids", "counts", "boxes"} <= files:
                raise ProposalFileError(f"{p}: not a proposal .npz (needs ids, counts, boxes; has {sorted(files)})")
            fmt = str(z["format"]) if "format" in files else NPZ_FORMAT
            ids, counts, boxes = z["ids"], z["counts"], (z["boxes"] if with_boxes else None)
    except ProposalFileError:
        raise
    except Exception as e:
        raise ProposalFileError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
    if fmt != NPZ_FORMAT:
        raise ProposalFileError(f"{p}: unknown format {fmt!r} (expected {NPZ_FORMAT!r})")
    return ids, counts, boxes


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a proposal file written by :func:`save_proposals`.

    Returns:
        dict id -> ndarray float32 [R, 4] xyxy.
    Raises:
        ProposalFileError: unreadable file or a different layout.
    """
    p = Path(path)
    ids, counts, boxes = _read_npz_arrays(p, with_boxes=True)
    boxes = _check_boxes(boxes, str(p))
    if len(ids) != len(counts) or int(counts.sum()) != len(boxes):
        raise ProposalFileError(f"{p}: ids ({len(ids)}), counts (sum {int(counts.sum())}) and "
                                f"boxes ({len(boxes)}) do not agree")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = {str(i): boxes[offsets[k]:offsets[k + 1]].copy() for k, i in enumerate(ids)}
    if len(out) != len(ids):
        raise ProposalFileError(f"{p}: image ids are not unique")
    return out


class NpzProposals(Mapping[str, np.ndarray]):
    """A proposal ``.npz`` (:func:`save_proposals`) as a read-only mapping id -> ndarray float32 [R, 4]
    xyxy that reads each image's boxes from the file when asked (one ``pread``), in file order.

    Only ``ids`` and ``counts`` are held ([N] each), so the memory does not grow with the boxes.
    Each read is checked like :func:`read_npz` checks the whole file (shape, NaN/inf). The file is
    held open; a copy pickled to another process opens it again there and refuses a file that was
    replaced or changed since it was indexed (its inode, size and time).

    Raises:
        ProposalFileError: unreadable file, another layout, or ``boxes`` stored compressed (use
            :func:`read_npz`, which reads any ``.npz`` whole).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        p = self.path
        ids, counts, _ = _read_npz_arrays(p, with_boxes=False)
        counts = np.asarray(counts, dtype=np.int64)
        try:
            self._data_offset, shape, dtype = _stored_array(p, "boxes.npy")
        except ProposalFileError:
            raise
        except Exception as e:
            raise ProposalFileError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
        if dtype != np.dtype("<f4") or len(shape) != 2 or shape[1] != 4:
            raise ProposalFileError(f"{p}: boxes must be float32 [sum R, 4], got {dtype} {shape}")
        if len(ids) != len(counts) or int(counts.sum()) != shape[0] or (counts < 0).any():
            raise ProposalFileError(f"{p}: ids ({len(ids)}), counts (sum {int(counts.sum())}) and "
                                    f"boxes ({shape[0]}) do not agree")
        self._ids = [str(i) for i in ids]
        self._index = {i: k for k, i in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            raise ProposalFileError(f"{p}: image ids are not unique")
        self._counts = counts  # (N,)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
        self._fd: int | None = None
        self._pid = -1
        self._stat = self._signature(os.stat(p))
        self._open()  # now, so that a file replaced later is not read with this one's offsets

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _open(self) -> None:
        """Open the file in this process; refuse a file that is no longer the one indexed."""
        fd = os.open(self.path, os.O_RDONLY)
        if self._signature(os.fstat(fd)) != self._stat:
            os.close(fd)
            raise ProposalFileError(f"{self.path}: the file changed after it was read (another run wrote it?); "
                                    f"load it again")
        self._fd, self._pid = fd, os.getpid()

    def __getitem__(self, key: str) -> np.ndarray:
        k = self._index[key]  # KeyError for an unknown id, as a dict
        if self._fd is None or self._pid != os.getpid():
            self._open()
        out = np.empty((int(self._counts[k]), 4), dtype="<f4")  # (R, 4)
        want = out.nbytes
        got = os.preadv(self._fd, [memoryview(out).cast("B")], self._data_offset + int(self._starts[k]) * 16) if want else 0
        if got != want:
            raise ProposalFileError(f"{self.path}: read {got} of {want} bytes of image {key!r} (file truncated?)")
        return _check_boxes(out, f"{self.path} [{key!r}]")


def _stored_array(path: Path, member: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """Byte offset, shape and dtype of an uncompressed, C-ordered ``.npy`` member of a ``.npz``."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise ProposalFileError(f"{path}: '{member}' is compressed; it cannot be read per image "
                                    f"(read_npz reads the whole file)")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: name and extra lengths at bytes 26-29
        if local[:4] != b"PK\x03\x04":
            raise ProposalFileError(f"{path}: damaged zip entry '{member}'")
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise ProposalFileError(f"{path}: '{member}' is stored in Fortran order")
        return f.tell(), tuple(shape), np.dtype(dtype)


def read_npz_meta(path: str | Path) -> str | None:
    """The ``meta`` text of a proposal ``.npz`` (its key, for computed files), or None when the file
    cannot be read or has none."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            return str(z["meta"]) if "meta" in z.files else None
    except Exception:  # noqa: BLE001 - any unreadable file simply has no usable meta
        return None


def save_proposals(path: str | Path, proposals: Mapping[str, np.ndarray], meta: str = "") -> Path:
    """Write proposals as the project's ``.npz``, atomically (temp file + ``os.replace``).

    Args:
        path: output file; ``.npz`` is appended when missing.
        proposals: id -> ndarray [R, 4] xyxy (any float dtype; stored as float32), in the order to keep.
        meta: free text stored as ``meta`` (e.g. the JSON of the parameters that made the boxes).
    Returns:
        the path written.
    """
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_name(p.name + ".npz")
    ids = [str(i) for i in proposals]
    arrays = [_check_boxes(np.asarray(proposals[i]), f"proposals[{i!r}]") for i in proposals]
    counts = np.array([len(b) for b in arrays], dtype=np.int64)
    boxes = np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32)  # (sum R, 4)
    from detector.artifacts import atomic_path

    with atomic_path(p) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.array(ids, dtype=str), counts=counts, boxes=boxes.astype(np.float32),
                 format=np.array(NPZ_FORMAT), meta=np.array(str(meta)))
        f.flush()
        os.fsync(f.fileno())
    return p


def merge_proposal_files(path: str | Path, parts: Iterable[str | Path], meta: str = "") -> Path:
    """Concatenate proposal ``.npz`` files (:func:`save_proposals`), in order, into one, atomically.

    The same file as :func:`save_proposals` of the parts' merged mapping, written one part's boxes
    at a time: the memory is one part's, not the whole list's.

    Args:
        path: output ``.npz``.
        parts: the files to merge; their ids must not repeat.
        meta: free text stored as ``meta``.
    Raises:
        ProposalFileError: an unreadable part, or an id in two parts.
    """
    p, parts = Path(path), [Path(q) for q in parts]
    ids: list[str] = []
    counts: list[np.ndarray] = []
    for q in parts:
        lazy = NpzProposals(q)
        ids += list(lazy)
        counts.append(lazy._counts)
    if len(set(ids)) != len(ids):
        raise ProposalFileError(f"{p}: the parts repeat image ids")
    count = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)  # (N,)
    from detector.artifacts import atomic_path

    with atomic_path(p) as tmp, open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in (("ids", np.array(ids, dtype=str)), ("counts", count)):
                with zf.open(name + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, arr, allow_pickle=False)
            with zf.open("boxes.npy", "w", force_zip64=True) as m:
                np.lib.format.write_array_header_1_0(m, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                         "fortran_order": False, "shape": (int(count.sum()), 4)})
                for q in parts:  # (sum R, 4), one part at a time
                    with np.load(q, allow_pickle=False) as z:
                        m.write(np.ascontiguousarray(z["boxes"], dtype="<f4").tobytes())
            for name, arr in (("format", np.array(NPZ_FORMAT)), ("meta", np.array(str(meta)))):
                with zf.open(name + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return p


# ------------------------------------------------------------------------------------ dispatcher
def read_proposal_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read any supported proposal file, chosen by extension (``.mat``, ``.pkl``, ``.npz``).

    Returns:
        dict id -> ndarray float32 [R, 4] xyxy, in file order.
    Raises:
        ProposalFileError: missing file, unknown extension, or a reader's error.
    """
    p = Path(path)
    if not p.is_file():
        raise ProposalFileError(f"proposal file not found: {p}")
    ext = p.suffix.lower()
    if ext == ".mat":
        return read_rcnn_mat(p)
    if ext in (".pkl", ".pickle"):
        return read_detectron2_pkl(p)
    if ext == ".npz":
        return read_npz(p)
    raise ProposalFileError(f"{p}: unknown proposal file type '{ext}' (use .mat, .pkl or .npz)")


def load_proposals(path: str | Path, image_ids: Iterable[str], *,
                   allow_extra: bool = False) -> dict[str, np.ndarray]:
    """Proposals for exactly the given images.

    Args:
        path: ``.mat`` / ``.pkl`` / ``.npz`` proposal file.
        image_ids: the ids the caller needs (a split's ids).
        allow_extra: ids in the file that were not asked for are an error by default (they usually
            mean the wrong split's file); True ignores them, e.g. to use the published VOC07 test
            file for the first N test images.
    Returns:
        dict id -> ndarray float32 [R, 4] xyxy, in ``image_ids`` order.
    Raises:
        ProposalFileError: an id asked for is missing from the file, or (unless ``allow_extra``)
            the file has ids not asked for; the message names them.
    """
    p = Path(path)
    wanted = [str(i) for i in image_ids]
    table = read_proposal_file(p)
    missing = [i for i in wanted if i not in table]
    if missing:
        raise ProposalFileError(f"{p}: no proposals for {len(missing)} image id(s): {_names(missing)}")
    if not allow_extra:
        wanted_set = set(wanted)
        extra = [i for i in table if i not in wanted_set]
        if extra:
            raise ProposalFileError(
                f"{p}: {len(extra)} id(s) in the file are not in the requested images: "
                f"{_names(extra)} (wrong split? pass allow_extra=True to use a subset)")
    return {i: table[i] for i in wanted}
