"""Atomic file output: every artifact is written to a temp file in the same folder, then renamed.

An interrupted job therefore never leaves a half-written file that Snakemake or DVC would take as done. A killed
job does leave its temp file (``.<name>.<host>-<pid>.<random>.tmp...``); the next successful write of the same
output removes the temps of dead processes on this host, so that a folder DVC versions holds no leftovers.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders that killed writers of ``path`` left next to it: those named by this
    host and a process id that no longer runs (a temp of another host, or of a live process, is kept). Returns what
    was removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.{_HOST}-") + r"(\d+)\.[^/]*\.(tmp|old)")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue
            p = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds. A failure for want of
    space (ENOSPC, EDQUOT, or a writer that lost the errno on a full disk) is raised as :class:`DiskFullError`
    naming ``path``; the temp is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix or f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
        sweep_stale_temps(path)
    except Exception as e:
        _raise_if_disk_full(e, path, "file")
        raise
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
    half-written mix. An existing ``path`` is moved aside and deleted after the swap. Out of space: a
    :class:`DiskFullError` naming ``path``, as :func:`atomic_path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        sweep_stale_temps(path)
    except Exception as e:
        _raise_if_disk_full(e, path, "folder")
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a library that keeps the OS error's text but not its errno says it (safetensors: "... (os error 28)").
_FULL_TEXTS = {errno.ENOSPC: ("No space left on device", "os error 28"),
               errno.EDQUOT: ("Disk quota exceeded", "os error 122")}
NEARLY_FULL = 1 << 20  # bytes left below which a write error that lost its errno is taken for a full disk


class DiskFullError(OSError):
    """An output could not be written: the disk holding it is full (ENOSPC) or the quota there is spent (EDQUOT).

    ``filename`` names the output (a file, or a folder written as a whole); its temp was removed, so nothing
    half-written is left and an earlier version of the output is unchanged."""

    def __init__(self, code: int, path: str | os.PathLike, free: int | None = None, kind: str = "file") -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.free, self.kind = free, kind

    def __reduce__(self):  # OSError's would rebuild it from (errno, strerror): keep the output's name across processes
        return type(self), (self.errno, self.filename, self.free, self.kind)

    def __str__(self) -> str:
        what = "the disk holding it is full" if self.errno == errno.ENOSPC else "the disk quota there is used up"
        free = "" if self.free is None else f", {_size(self.free)} free"
        return (f"{self.filename}: not written: {what} ({self.strerror}{free}); the half-written temp {self.kind} "
                f"was removed and any earlier {Path(self.filename).name} is unchanged")


def exception_chain(e: BaseException) -> Iterator[BaseException]:
    """``e``, then what it was raised from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        x = x.__cause__ or x.__context__


def full_disk_error(e: BaseException) -> OSError | None:
    """The OSError of a full disk or a spent quota in ``e``'s chain."""
    return next((x for x in exception_chain(e) if isinstance(x, OSError) and x.errno in FULL_ERRNOS), None)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the disk holding ``folder`` (None: cannot tell)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _disk_full_code(e: BaseException, folder: Path) -> int | None:
    """ENOSPC or EDQUOT when ``e`` is a write error caused by a full disk or a spent quota, else None.

    Some writers drop the errno: torch's zip writer ("unexpected pos 576 vs 534"), numpy's ``tofile`` ("N requested
    and M written"). A bare OSError or RuntimeError counts as a full disk when ``folder``'s disk is (nearly) full,
    checked before the failed write's temp is removed."""
    if (full := full_disk_error(e)) is not None:
        return full.errno
    for x in exception_chain(e):
        for code, texts in _FULL_TEXTS.items():
            if any(t in str(x) for t in texts):
                return code
    if type(e) in (OSError, RuntimeError) and getattr(e, "errno", None) is None:
        free = free_bytes(folder)
        if free is not None and free < NEARLY_FULL:
            return errno.ENOSPC
    return None


def _raise_if_disk_full(e: Exception, path: Path, kind: str) -> None:
    """Raise a write error of ``path`` that a full disk caused as a :class:`DiskFullError` naming ``path``."""
    code = _disk_full_code(e, path.parent)
    if code is not None:
        raise DiskFullError(code, path, free_bytes(path.parent), kind) from e


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
