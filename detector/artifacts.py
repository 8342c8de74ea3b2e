"""Files the pipeline writes and reads back: atomic writes, content checks, keyed load-or-build.

Every cached output of the project goes through this module: proposal files, conv5 cache
entries, the digits data set's stamp, the pre-trained classifier and every training stage.

Atomic writes. A file is written to ``<dir>/.<name>.<pid>.tmp`` and moved into place with
``os.replace``, so a reader sees either the old complete file or the new complete file, never a
half-written one. A killed writer leaves only its temp file, which :func:`remove_stale_temps`
deletes once its process is gone.

Content checks. ``torch.save`` files and ``.npz`` files are zip archives that store a CRC-32 of
every member. :func:`verify` reads every member and compares the CRCs (``zipfile.testzip``), so a
file damaged in place (same size, other bytes) is caught before it is used; ``torch.load`` itself
does not check them. :func:`content_id` is a digest of those CRCs read from the zip directory
only (cheap): two files with the same members and CRCs have the same content id.

Keys. A keyed artifact is a ``torch.save`` dict ``{"key": key, ...payload}``. :func:`load_keyed`
returns it only when the file is intact and was made under ``key``; otherwise None (a damaged
file is reported by name and rebuilt, never used). Keys are :func:`digest` strings of everything
that affects the output, including the keys of the artifacts it was made from, so a rebuilt
input changes every key downstream of it.

This module imports torch only inside the functions that need it, so proposal worker processes
(which must stay light) can use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "ArtifactError",
    "digest",
    "jsonable",
    "atomic_path",
    "temp_path",
    "write_text",
    "write_json",
    "save_torch",
    "remove_stale_temps",
    "verify",
    "content_id",
    "tensor_digest",
    "load_torch",
    "load_keyed",
    "save_keyed",
    "load_or_build",
]

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """A file that cannot be used: damaged, unreadable, or of the wrong kind; names the file."""


# Metadata flag of a config field added after runs existed whose default keeps the old behaviour:
# at that default the field is left out of stage keys (:func:`digest`), so those runs stay valid.
KEYLESS_AT_DEFAULT = "keyless_at_default"


def jsonable(x: Any, for_key: bool = False) -> Any:
    """Plain JSON-able form of config sections, paths, tuples and dicts (for keys and reports).
    With ``for_key``, fields flagged :data:`KEYLESS_AT_DEFAULT` are left out while at their default."""
    if hasattr(x, "__dataclass_fields__"):
        return {k: jsonable(getattr(x, k), for_key) for k, f in x.__dataclass_fields__.items()
                if not (for_key and f.metadata.get(KEYLESS_AT_DEFAULT) and getattr(x, k) == f.default)}
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (list, tuple)):
        return [jsonable(v, for_key) for v in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v, for_key) for k, v in x.items()}
    return x


def digest(*parts: Any) -> str:
    """Stable short hash (16 hex digits) of JSON-able parts: dataclasses, paths, lists, dicts."""
    text = json.dumps(jsonable(list(parts), for_key=True), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# atomic writes


def _host() -> str:
    """This machine's name as it appears in temp names (dots and underscores replaced)."""
    return socket.gethostname().replace(".", "-").replace("_", "-") or "host"


def temp_path(path: str | Path) -> Path:
    """The temp name of this process for ``path``: ``.<name>.<host>_<pid>.tmp`` next to it. The
    host keeps processes of several machines writing to one shared folder apart."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}_{os.getpid()}.tmp")


def _temp_owner(tmp: Path) -> tuple[str, int]:
    """(host, pid) of a temp name; names without a host are this host's."""
    tag = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
    host, _, pid = tag.rpartition("_")
    try:
        return host or _host(), int(pid)
    except ValueError:
        return _host(), -1


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``, on error it is removed.

    Usage: ``with atomic_path(p) as tmp: np.savez(tmp, ...)``. The writer must write exactly the
    yielded path (``np.savez`` appends ``.npz`` to names without it: the temp name ends in
    ``.tmp``, so pass a file object or use :func:`save_torch` / :func:`write_text`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
        _trace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _trace(path: Path) -> None:
    """With ``SPPNET_WRITE_TRACE=<folder>`` set, append every file this process writes to
    ``<folder>/writes.<host>_<pid>.txt`` (to check that no two processes of a job write one file)."""
    folder = os.environ.get("SPPNET_WRITE_TRACE")
    if folder:
        with open(Path(folder) / f"writes.{_host()}_{os.getpid()}.txt", "a") as f:
            f.write(f"{path.resolve()}\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(jsonable(obj), indent=1) + "\n")


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> int:
    """Delete temp files (and temp folders) of :func:`temp_path` whose writer process on this
    machine is gone; returns the count. A temp of a live process (another writer), or of another
    machine sharing the folder, is kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for tmp in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        host, pid = _temp_owner(tmp)
        if host != _host():
            continue
        if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
            continue  # being written by this process or another live one
        log.info("removing %s left by an interrupted write", tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n


# ------------------------------------------------------------------------------------------------
# content checks


def verify(path: str | Path) -> str | None:
    """Why the zip archive at ``path`` (a torch.save or .npz file) cannot be used, or None if intact.

    Reads every member and checks its CRC-32.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except FileNotFoundError:
        return "missing"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"not a complete archive ({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001 - zlib errors on damaged compressed members
        return f"damaged ({type(e).__name__}: {e})"
    return None if bad is None else f"member {bad} fails its CRC check (the file was changed or damaged)"


def content_id(path: str | Path) -> str:
    """Digest of a zip archive's member names and CRC-32s (its directory only: cheap).

    Raises:
        ArtifactError: not a readable zip archive.
    """
    try:
        with zipfile.ZipFile(path) as z:
            return digest([(i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in z.infolist()])
    except (OSError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path}: not a readable archive ({e})") from None


def tensor_digest(obj: Any) -> str:
    """Digest of every tensor in a nested dict / list (names, dtypes, shapes and bytes, in order),
    ignoring everything else: two checkpoints holding the same weights have the same digest even
    when their free-form metadata (timings) differ."""
    import torch

    h = hashlib.sha1()

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{prefix}|{t.dtype}|{tuple(x.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(f"{prefix}.{k}", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}[{i}]", v)

    walk("", obj)
    return h.hexdigest()[:16]


def load_torch(path: str | Path, verified: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file whose content check passes.

    Args:
        verified: the caller has just run :func:`verify` on it.
    Raises:
        ArtifactError: damaged, unreadable, or a file that would need to run code to load.
    """
    import torch

    path = Path(path)
    if not verified:
        problem = verify(path)
        if problem:
            raise ArtifactError(f"{path}: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of foreign or unsafe files
        first = str(e).splitlines()[0] if str(e) else ""
        raise ArtifactError(f"{path}: refused or unreadable as a safe (weights_only) file: "
                            f"{type(e).__name__}: {first}") from None


def load_keyed(path: str | Path, key: str) -> dict | None:
    """The keyed artifact at ``path`` when it is intact and was made under ``key``; else None.

    A damaged or unreadable file is logged as a warning naming it (and left for the rebuild to
    replace); a file made under another key is logged at INFO as stale.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = load_torch(path)
    except ArtifactError as e:
        log.warning("%s; rebuilding it", e)
        return None
    if not isinstance(obj, dict) or obj.get("key") != key:
        log.info("%s was made under another configuration or from other inputs; rebuilding it", path)
        return None
    return obj


def save_keyed(path: str | Path, key: str, payload: dict) -> Path:
    """Write ``{"key": key, **payload}`` with torch.save, atomically."""
    if "key" in payload:
        raise ValueError("save_keyed: payload must not have a 'key' entry")
    return save_torch(path, {"key": key, **payload})


def load_or_build(path: str | Path, key: str, build: Callable[[], dict]) -> dict:
    """The keyed artifact at ``path`` for ``key``, built with ``build()`` and saved when missing,
    damaged or stale. Returns the payload dict (with its ``key``)."""
    obj = load_keyed(path, key)
    if obj is None:
        save_keyed(path, key, build())
        obj = load_keyed(path, key)
        if obj is None:
            raise ArtifactError(f"{path}: written but cannot be read back")
    return obj
