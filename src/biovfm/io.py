"""Atomic file output: every artifact is written to a temp file in the same folder, then renamed.

An interrupted job therefore never leaves a half-written file that Snakemake or DVC would take as done.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Uncompressed npz (as MedMNIST ships it), written atomically."""
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)


NPZ_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same arrays give the same bytes


class NpzStream:
    """An uncompressed npz being written member by member (see :func:`stream_npz`)."""

    def __init__(self, zf: zipfile.ZipFile, path: Path) -> None:
        self._zf, self._path = zf, path

    @contextlib.contextmanager
    def member(self, name: str, shape: tuple[int, ...], dtype: Any) -> Iterator[Callable[[np.ndarray], None]]:
        """Yield ``put(rows)``, which appends C-ordered rows of a ``shape`` array; the block must supply all of them."""
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        zi = zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_DATE_TIME)
        zi.compress_type, zi.external_attr = zipfile.ZIP_STORED, 0o644 << 16
        rows = 0

        def put(chunk: np.ndarray) -> None:
            nonlocal rows
            chunk = np.ascontiguousarray(chunk)
            if chunk.dtype != dtype or chunk.shape[1:] != shape[1:] or rows + len(chunk) > shape[0]:
                raise ValueError(f"{self._path}: {name}: got {chunk.dtype} rows {chunk.shape} after {rows} rows; the "
                                 f"member is declared {dtype} {shape}")
            f.write(memoryview(chunk).cast("B"))
            rows += len(chunk)

        with self._zf.open(zi, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": shape})
            yield put
            if rows != shape[0]:
                raise ValueError(f"{self._path}: {name}: {rows} of {shape[0]} rows written")

    def add(self, name: str, array: np.ndarray) -> None:
        """A whole (small) array of at least one dimension as one member."""
        with self.member(name, array.shape, array.dtype) as put:
            put(array)


@contextlib.contextmanager
def stream_npz(path: str | os.PathLike) -> Iterator[NpzStream]:
    """Write an uncompressed npz (memory-mappable, like :func:`write_npz`'s) a chunk at a time, atomically.

    Memory stays at one chunk whatever the array sizes; members are stored with fixed timestamps, so the bytes
    depend on the arrays alone. ``np.load`` and ``load_npz(..., mmap=True)`` read the result."""
    with atomic_path(path, suffix=".tmp.npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED,
                                                                       allowZip64=True) as zf:
        yield NpzStream(zf, Path(path))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder next to ``path``; swap it in for ``path`` only if the block succeeds.

    For outputs made of many files (a sharded store): readers see the old folder, then the new one, never a
    half-written mix. An existing ``path`` is moved aside and deleted after the swap.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
