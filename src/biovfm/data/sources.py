"""Pretraining sources: the user's own corpora (folders, DICOM, NIfTI, manifests), MedMNIST train splits and the
synthetic corpus, read as a stream of *units* and converted to the study's image convention.

Every image ends up as **uint8 H x W x 3 at the study's size**: intensities mapped to uint8 (8-bit inputs are kept
as they are; deeper data is windowed, see below), **center-cropped to a square on its short side** (the crop keeps
the full resolution of the anatomy in the middle, where medical images put it, instead of spending pixels on
padding bars), resized with PIL's bicubic filter (as MedMNIST+ was made, and as the evaluation tasks are resized),
and grayscale replicated to RGB. Images that already are square at the study's size pass through unchanged, so a
MedMNIST image gets exactly the content hash of its evaluation copy.

Intensities: 8-bit images are kept. 16-bit/float images (PNG, TIFF) and DICOM/NIfTI data are mapped linearly from
a window to 0..255: for DICOM, after the rescale slope/intercept, the file's WindowCenter/Width when present
(``window: file``), else the modality default (CT: soft tissue, center 40, width 400 HU), else per-file percentiles
(``clip_percentiles``); a NIfTI volume is normalised as a whole (its cal_min/cal_max, the modality default or
percentiles of the volume), so all its slices share one mapping. MONOCHROME1 is inverted, palette and YBR colour
converted to RGB.

Nothing here decides what is kept: readers yield converted images or a *skip* (path and reason; ``bad`` when the
file is corrupt or unreadable, not when it merely holds no image, like a DICOM report). A source whose
configuration or manifest is wrong (unknown modality or format, a path escaping the declared root) raises
:class:`SourceError` naming the source. Heavy readers (PIL, pydicom, nibabel, pyarrow) are imported lazily.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from biovfm.data.medmnist import MODALITIES, TASKS

KINDS = ("synthetic", "medmnist", "folder", "dicom", "nifti", "manifest")
# What an image equal to a validation/test image of an evaluation task does: fail the stage, or be left out. The
# benchmark's own train splits (kind medmnist) hold such copies as published, so they drop them by default.
ON_LEAK = ("fail", "drop")
DEFAULT_ON_LEAK = {"medmnist": "drop"}  # other kinds: the corpus' on_leak
# The nine task modalities plus those real corpora add (BioVFM-21M has MR, endoscopy, nuclear medicine, OCTA).
CORPUS_MODALITIES = tuple(sorted(set(MODALITIES) | {"endoscopy", "mr", "nm", "octa"}))
ALIASES = {
    "us": "ultrasound", "x-ray": "xray", "x_ray": "xray", "cxr": "xray", "radiograph": "xray", "mammography": "xray",
    "mri": "mr", "pathology": "histology", "he": "histology", "dermatoscopy": "dermoscopy", "dermascopy": "dermoscopy",
    "retina": "fundus", "pet": "nm", "spect": "nm", "endo": "endoscopy", "oct-a": "octa",
}
# DICOM Modality (0008,0060) -> corpus modality; unlisted values (SEG, RTDOSE, SR, OT, ...) are not taken
# unless the source names a fixed modality.
DICOM_MODALITY = {
    "CT": "ct", "MR": "mr", "US": "ultrasound", "CR": "xray", "DX": "xray", "DR": "xray", "MG": "xray", "XA": "xray",
    "RF": "xray", "RG": "xray", "PX": "xray", "IO": "xray", "NM": "nm", "PT": "nm", "OP": "fundus", "OPT": "oct",
    "ES": "endoscopy", "SM": "histology", "GM": "microscopy",
}
FROM_FILE = "from_file"  # DICOM Modality tag
FROM_FOLDER = "from_folder"  # first folder below the root
MODALITY_DEFAULT_WINDOW = {"ct": (40.0, 400.0)}  # (center, width), soft tissue
WINDOWS = ("file", "modality", "percentile")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # array axes after reorienting to RAS+ (nibabel canonical)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
FORMATS_OF_KIND = {"folder": ("image", "dicom", "nifti"), "dicom": ("dicom",), "nifti": ("nifti",),
                   "manifest": ("image", "dicom", "nifti")}
NPZ_CHUNK = 256  # rows of an npz source per unit of work
PERCENTILE_SAMPLE = 1 << 20  # voxels sampled for percentiles of a large volume


class SourceError(ValueError):
    """A source's configuration, manifest or files are unusable as declared; the message names the source."""


class NotAnImage(Exception):
    """A readable file that holds no image for the corpus (skipped, but not counted as bad)."""


# --------------------------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class Source:
    """One entry of ``corpus.sources`` with every default filled in (see the params schema for the meaning)."""

    name: str
    kind: str
    path: str = ""
    manifest: str = ""
    root: str = ""
    modality: str = ""
    license: str = ""
    flags: tuple[str, ...] = ()
    size: int = 28
    window: str | tuple[float, float] = "file"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    frame_stride: int = 1
    axes: tuple[str, ...] = ("axial",)
    slice_stride: int = 1
    skip_blank: bool = True
    allow_absolute: bool = False
    path_column: str = "path"
    modality_column: str = "modality"
    on_leak: str = ""  # fail | drop; "" = the corpus' on_leak

    @property
    def where(self) -> str:
        return f"corpus source {self.name!r} ({self.kind})"

    def leak_policy(self, corpus_on_leak: str) -> str:
        """What this source does with an image equal to a validation/test image: its own setting, else the corpus'."""
        return self.on_leak or corpus_on_leak


def normalize_modality(value: Any, where: str) -> str:
    """A vocabulary name from a name or alias (case-insensitive); an unknown one is an error naming ``where``."""
    key = str(value).strip().lower()
    key = ALIASES.get(key, key)
    if key not in CORPUS_MODALITIES:
        raise SourceError(f"{where}: unknown modality {value!r}; use one of {', '.join(CORPUS_MODALITIES)} "
                          f"(aliases: {', '.join(sorted(ALIASES))})")
    return key


def default_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The corpus when params declare none: the benchmark's own unlabeled pool (synthetic) or its train splits."""
    if data.get("source", "synthetic") == "medmnist":
        return [{"name": "medmnist", "kind": "medmnist", "license": "CC BY 4.0 (DermaMNIST: CC BY-NC 4.0)"}]
    return [{"name": "synthetic", "kind": "synthetic", "license": "generated, Apache-2.0"}]


def source_from_dict(d: dict[str, Any], data: dict[str, Any] | None = None) -> Source:
    """Validate one declared source and fill kind-specific defaults (paths, MedMNIST flags and size)."""
    data = data or {}
    d = dict(d)
    name, kind = d.get("name", "?"), d.get("kind", "?")
    where = f"corpus source {name!r} ({kind})"
    known = {f.name for f in fields(Source)}
    if unknown := sorted(set(d) - known):
        raise SourceError(f"{where}: unknown key(s) {unknown}")
    if kind not in KINDS:
        raise SourceError(f"corpus source {name!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind in DEFAULT_ON_LEAK:
        d.setdefault("on_leak", DEFAULT_ON_LEAK[kind])
    if d.get("on_leak", "") not in ("", *ON_LEAK):
        raise SourceError(f"{where}: on_leak {d['on_leak']!r}: use one of {', '.join(ON_LEAK)}")
    for key in ("flags", "clip_percentiles", "axes"):
        if key in d:
            d[key] = tuple(d[key])
    if isinstance(d.get("window"), (list, tuple)):
        d["window"] = tuple(float(v) for v in d["window"])
    if kind == "synthetic":
        d.setdefault("path", "data/raw/synthetic/corpus.npz")
    if kind == "medmnist":
        d.setdefault("root", "data/raw/medmnist")
        d.setdefault("flags", tuple(f for f in data.get("tasks", TASKS) if f in TASKS))
        d.setdefault("size", int((data.get("medmnist") or {}).get("size") or 28))
        if bad := [f for f in d["flags"] if f not in TASKS]:
            raise SourceError(f"{where}: unknown MedMNIST flag(s) {bad}; known: {', '.join(TASKS)}")
        if not d["flags"]:
            raise SourceError(f"{where}: no MedMNIST flags (data.tasks has none); list them under `flags`")
        from biovfm.data.medmnist import npz_name

        npz_name(d["flags"][0], d["size"])  # raises on a size MedMNIST+ lacks
    if kind in ("folder", "dicom", "nifti") and not d.get("path"):
        raise SourceError(f"{where}: needs `path`, the folder to read")
    if kind == "manifest" and not d.get("manifest"):
        raise SourceError(f"{where}: needs `manifest`, a CSV or Parquet file listing the images")
    src = Source(**d)
    modality = src.modality
    if kind in ("synthetic", "medmnist"):
        if modality:
            raise SourceError(f"{where}: `modality` is not set for this kind (it comes with the data); remove it")
    elif kind == "dicom" and not modality:
        modality = FROM_FILE
    elif modality == FROM_FILE and kind not in ("folder", "dicom"):
        raise SourceError(f"{where}: modality {FROM_FILE} reads the DICOM Modality tag; only folder/dicom sources have it")
    elif modality == FROM_FOLDER and kind == "manifest":
        raise SourceError(f"{where}: a manifest gives modalities in its `{src.modality_column}` column, not {FROM_FOLDER}")
    elif not modality and kind in ("folder", "nifti"):
        raise SourceError(f"{where}: needs `modality`: a name ({', '.join(CORPUS_MODALITIES)}), {FROM_FOLDER}"
                          + (f" or {FROM_FILE}" if kind == "folder" else ""))
    if modality and modality not in (FROM_FILE, FROM_FOLDER):
        modality = normalize_modality(modality, where)
    if isinstance(src.window, str) and src.window not in WINDOWS:
        raise SourceError(f"{where}: window {src.window!r}: use one of {', '.join(WINDOWS)} or [center, width]")
    if bad_axes := [a for a in src.axes if a not in AXES]:
        raise SourceError(f"{where}: unknown axes {bad_axes}; use {', '.join(AXES)}")
    return replace(src, modality=modality)


def source_to_dict(src: Source) -> dict[str, Any]:
    """JSON form (lists for tuples; unset paths and flags left out), the inverse of :func:`source_from_dict`."""
    out = {}
    for f in fields(Source):
        v = getattr(src, f.name)
        if f.name != "license" and v in ("", ()):
            continue
        if f.name == "size" and src.kind != "medmnist":
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def static_modalities(src: Source) -> set[str] | None:
    """Modalities a source can yield, known from params alone; None when only its files can tell."""
    if src.kind == "synthetic":
        return set(MODALITIES)
    if src.kind == "medmnist":
        return {TASKS[f].modality for f in src.flags}
    if src.modality in ("", FROM_FILE, FROM_FOLDER):
        return None
    return {src.modality}


def source_inputs(src: Source) -> list[str]:
    """Files (or folders) a source reads, for the workflow's input declaration."""
    if src.kind == "synthetic":
        return [src.path]
    if src.kind == "medmnist":
        from biovfm.data.medmnist import npz_name

        return [str(Path(src.root) / npz_name(f, src.size)) for f in src.flags]
    if src.kind == "manifest":
        return [src.manifest]
    return [src.path]


# --------------------------------------------------------------------------------------------- units of work
@dataclass
class ArrayUnit:
    """Rows of an npz array (synthetic corpus, MedMNIST train split), converted in a worker."""

    source: int
    origin: str  # file name; rows are origin[i]
    start: int
    images: np.ndarray
    modality: list[str]


@dataclass(frozen=True)
class FileUnit:
    """One file to read and convert in a worker."""

    source: int
    path: str
    origin: str  # path as the report shows it (relative to the source's root)
    fmt: str  # image | dicom | nifti
    modality: str  # a vocabulary name, or "" = from the file (DICOM tag)


@dataclass
class UnitResult:
    """What a unit produced: kept candidates (origin, modality, image, hash), skips, blank frames."""

    source: int
    inputs: int
    images: list[tuple[str, str, np.ndarray, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    blank: int = 0


def iter_units(sources: Sequence[Source], ignored: dict[str, int] | None = None) -> Iterator[ArrayUnit | FileUnit]:
    """Every unit of every source, in a fixed order (sorted walks), lazily: memory does not grow with the corpus.

    ``ignored`` counts files a folder walk passes over (other formats) per source name."""
    for i, src in enumerate(sources):
        if src.kind == "synthetic":
            yield from _synthetic_units(i, src)
        elif src.kind == "medmnist":
            from biovfm.data.medmnist import npz_name

            for flag in src.flags:
                path = Path(src.root) / npz_name(flag, src.size)
                for start, rows in iter_npz_rows(path, "train_images", NPZ_CHUNK, src.where):
                    yield ArrayUnit(i, path.name + ":train", start, rows, [TASKS[flag].modality] * len(rows))
        elif src.kind == "manifest":
            yield from _manifest_units(i, src)
        else:
            yield from _folder_units(i, src, ignored)


def _synthetic_units(i: int, src: Source) -> Iterator[ArrayUnit]:
    path = Path(src.path)
    if not path.is_file():
        raise SourceError(f"{src.where}: {path}: no such file; run the download stage first (or fix `path`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if set(z.files) != {"images", "modality"}:
                raise SourceError(f"{src.where}: {path}: a corpus npz needs exactly the keys images, modality; found {z.files}")
            modality = [str(m) for m in z["modality"]]
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"{src.where}: {path}: not a readable corpus npz ({e}); rerun the download stage") from e
    bad = sorted(set(modality) - set(CORPUS_MODALITIES))
    if bad:
        raise SourceError(f"{src.where}: {path}: unknown modalities {bad}")
    for start, rows in iter_npz_rows(path, "images", NPZ_CHUNK, src.where):
        yield ArrayUnit(i, path.name, start, rows, modality[start:start + len(rows)])


def iter_npz_rows(path: str | Path, key: str, chunk: int, where: str = "") -> Iterator[tuple[int, np.ndarray]]:
    """Rows of one array of an npz (stored or deflated), ``chunk`` at a time, without loading the whole array."""
    path = Path(path)
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise SourceError(f"{prefix}{path}: no such file; run the download stage first")
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version} is not supported")
            if dtype.hasobject:
                raise SourceError(f"{prefix}{path}: {key} holds Python objects (a pickled object array); refused, as "
                                  "unpickling can run code. Save plain numeric arrays (np.savez, no dtype=object)")
            if fortran or not shape:
                raise SourceError(f"{prefix}{path}: {key} must be a C-ordered array of rows, got shape {shape}"
                                  + (" in Fortran (column-major) order, as np.savez stores a transposed array; save "
                                     "np.ascontiguousarray(x) instead" if fortran else ""))
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                buf = _read_exact(f, n * row_bytes)
                yield start, np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))
    except KeyError:
        raise SourceError(f"{prefix}{path}: has no array {key!r}; is it a MedMNIST/corpus npz?") from None
    except SourceError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise SourceError(f"{prefix}{path}: not a readable npz ({type(e).__name__}: {e}); download it again") from e


def _read_exact(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            raise EOFError(f"truncated: expected {n} bytes, got {got}")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def file_format(path: Path, kind: str) -> str | None:
    """image | dicom | nifti from the name (and the DICOM preamble for extension-less files); None = not taken."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        fmt = "nifti"
    elif name.endswith(DICOM_SUFFIXES):
        fmt = "dicom"
    elif name.endswith(IMAGE_SUFFIXES):
        fmt = "image"
    elif "." not in name and kind in ("dicom", "folder") and _has_dicom_preamble(path):
        fmt = "dicom"
    else:
        return None
    return fmt if fmt in FORMATS_OF_KIND[kind] else None


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _folder_units(i: int, src: Source, ignored: dict[str, int] | None) -> Iterator[FileUnit]:
    root = Path(src.path)
    if not root.is_dir():
        raise SourceError(f"{src.where}: {root} is not a folder; fix `path`")
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not followed
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            rel = path.relative_to(root)
            fmt = file_format(path, src.kind)
            if fmt is None:
                if ignored is not None:
                    ignored[src.name] = ignored.get(src.name, 0) + 1
                continue
            if not path.resolve().is_relative_to(real_root):
                raise SourceError(f"{src.where}: {path} is a link to {path.resolve()}, outside the source's root {root}; "
                                  "refused: copy the file into the root or declare its own folder as a source")
            yield FileUnit(i, str(path), rel.as_posix(), fmt, _unit_modality(src, rel, fmt))


def _unit_modality(src: Source, rel: Path, fmt: str) -> str:
    if src.modality == FROM_FOLDER:
        if len(rel.parts) < 2:
            raise SourceError(f"{src.where}: {rel} lies directly under the root; modality {FROM_FOLDER} needs "
                              "<root>/<modality>/... (or give the source a fixed modality)")
        return normalize_modality(rel.parts[0], f"{src.where}: folder {rel.parts[0]!r}")
    if src.modality == FROM_FILE:
        if fmt != "dicom":
            raise SourceError(f"{src.where}: {rel} is not DICOM, so modality {FROM_FILE} cannot tell its modality; "
                              f"use {FROM_FOLDER}, a fixed modality, or a separate source for these files")
        return ""
    return src.modality


def resolve_entry(root: Path, entry: str, allow_absolute: bool, where: str) -> Path:
    """The file a manifest entry names, refusing absolute paths (unless allowed), ``..`` and symlink escapes."""
    p = Path(entry)
    if p.is_absolute():
        if not allow_absolute:
            raise SourceError(f"{where}: absolute path {entry!r} refused; list paths relative to the root {root} "
                              "or set allow_absolute: true for this source")
        return p
    if ".." in p.parts:
        raise SourceError(f"{where}: path {entry!r} climbs out of the root with '..'; refused")
    full = root / p
    if not full.resolve().is_relative_to(root.resolve()):
        raise SourceError(f"{where}: path {entry!r} resolves to {full.resolve()}, outside the root {root} "
                          "(a symlink escapes it); refused")
    return full


def _manifest_units(i: int, src: Source) -> Iterator[FileUnit]:
    manifest = Path(src.manifest)
    root = Path(src.root) if src.root else manifest.parent
    if not root.is_dir():
        raise SourceError(f"{src.where}: root {root} is not a folder; fix `root`")
    line = 1
    for chunk in _manifest_chunks(src, manifest):
        for entry, modality in chunk:
            line += 1
            where = f"{src.where}: {manifest} row {line - 1}"
            path = resolve_entry(root, entry, src.allow_absolute, where)
            fmt = file_format(path, "manifest")
            if fmt is None:
                raise SourceError(f"{where}: {entry!r} has an unknown format; supported: "
                                  f"{', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES)}")
            modality = src.modality or normalize_modality(modality, where)
            yield FileUnit(i, str(path), entry, fmt, modality)


def _manifest_chunks(src: Source, manifest: Path, rows: int = 10_000) -> Iterator[list[tuple[str, str]]]:
    """(path, modality) rows of a CSV or Parquet manifest, streamed in chunks."""
    if not manifest.is_file():
        raise SourceError(f"{src.where}: manifest {manifest} does not exist")
    columns = [src.path_column] + ([] if src.modality else [src.modality_column])
    name = manifest.name.lower()
    if name.endswith(".csv"):
        import pandas as pd

        batches = _read_csv_chunks(pd, manifest, rows)
        to_cols = lambda b: {c: b[c].tolist() for c in columns if c in b.columns}  # noqa: E731
    elif name.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(manifest)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise _unreadable_manifest(src, manifest, e) from None
        have = set(pf.schema_arrow.names)
        batches = pf.iter_batches(batch_size=rows, columns=[c for c in columns if c in have])
        to_cols = lambda b: {c: [str(v) for v in b.column(c).to_pylist()] for c in b.schema.names}  # noqa: E731
    else:
        raise SourceError(f"{src.where}: manifest {manifest} must be .csv or .parquet")
    for batch in _readable(batches, src, manifest):
        cols = to_cols(batch)
        if missing := [c for c in columns if c not in cols]:
            raise SourceError(f"{src.where}: manifest {manifest} lacks column(s) {missing} "
                              "(set path_column/modality_column, or a fixed modality)")
        paths = cols[src.path_column]
        mods = cols.get(src.modality_column, [""] * len(paths)) if not src.modality else [""] * len(paths)
        yield list(zip(paths, mods))


def _read_csv_chunks(pd, manifest: Path, rows: int):
    with pd.read_csv(manifest, dtype=str, keep_default_na=False, chunksize=rows) as reader:
        yield from reader


def _readable(batches, src: Source, manifest: Path):
    """The batches of a manifest reader; a file the reader cannot parse is a SourceError naming it."""
    try:
        yield from batches
    except SourceError:
        raise
    except (ValueError, OSError) as e:  # pandas' EmptyDataError/ParserError, UnicodeDecodeError, ArrowInvalid
        raise _unreadable_manifest(src, manifest, e) from None


def _unreadable_manifest(src: Source, manifest: Path, e: Exception) -> SourceError:
    kind = "Parquet" if manifest.name.lower().endswith((".parquet", ".pq")) else "CSV"
    reason = str(e).splitlines()[0] if str(e) else ""
    return SourceError(f"{src.where}: manifest {manifest} cannot be read as {kind} ({type(e).__name__}: {reason}); "
                       f"it needs a header row with the `{src.path_column}` column"
                       + ("" if src.modality else f" and the `{src.modality_column}` column"))


# --------------------------------------------------------------------------------------------- conversion
def to_study(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 gray (H x W) or RGB (H x W x 3) -> uint8 size x size x 3: center square crop, bicubic resize, gray to RGB."""
    im = resize_bicubic(center_square(image), size)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=-1)
    return np.ascontiguousarray(im)


def center_square(image: np.ndarray) -> np.ndarray:
    """The largest centred square (the short side); identity for square images."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top:top + s, left:left + s]


def resize_bicubic(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of one uint8 gray/RGB image to ``size`` (square, or (width, height)); identity when equal."""
    from PIL import Image

    wh = (size, size) if isinstance(size, int) else size
    if image.shape[1] == wh[0] and image.shape[0] == wh[1]:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(wh, Image.BICUBIC))


def scale_to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to 0..255 with clipping; all zeros when the window is empty."""
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(x.shape, np.uint8)
    y = (np.asarray(x, np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.clip(np.nan_to_num(y, nan=0.0), 0, 255)).astype(np.uint8)


def percentile_range(x: np.ndarray, clip: Sequence[float]) -> tuple[float, float]:
    """Percentiles of the finite values (a strided sample of large arrays, for speed)."""
    flat = np.asarray(x).reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: flat.size // PERCENTILE_SAMPLE + 1]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat.astype(np.float64), clip)
    return float(lo), float(hi)


def window_range(x: np.ndarray, src: Source, modality: str, from_file: tuple[float, float] | None) -> tuple[float, float]:
    """Intensity window (lo, hi) for a gray file or volume: explicit, the file's, the modality's, or percentiles."""
    w = src.window
    if isinstance(w, tuple):
        center, width = w
    elif w == "file" and from_file is not None:
        center, width = from_file
    elif w in ("file", "modality") and modality in MODALITY_DEFAULT_WINDOW:
        center, width = MODALITY_DEFAULT_WINDOW[modality]
    else:
        return percentile_range(x, src.clip_percentiles)
    return center - width / 2, center + width / 2


def is_blank(image: np.ndarray) -> bool:
    return bool(image.max() == image.min())


# --------------------------------------------------------------------------------------------- readers
def read_image_file(path: str | Path, src: Source) -> list[tuple[str, np.ndarray]]:
    """PNG/JPEG/TIFF (every page of a multi-page TIFF, ``frame_stride`` apart) as uint8 gray or RGB arrays."""
    from PIL import Image, ImageOps, ImageSequence

    out = []
    with Image.open(path) as im:
        n = getattr(im, "n_frames", 1)
        for k, frame in enumerate(ImageSequence.Iterator(im)):
            if k % src.frame_stride:
                continue
            frame.load()
            if n == 1:
                frame = ImageOps.exif_transpose(frame)
            out.append((f"#{k}" if n > 1 else "", pil_to_array(frame, src.clip_percentiles)))
    return out


def pil_to_array(frame, clip: Sequence[float]) -> np.ndarray:
    """uint8 gray/RGB kept as is; other 8-bit modes converted; 16-bit/int/float gray windowed by percentiles."""
    mode = frame.mode
    if mode in ("L", "RGB"):
        return np.asarray(frame)
    if mode in ("1", "LA"):
        return np.asarray(frame.convert("L"))
    if mode.startswith("I") or mode == "F":
        x = np.asarray(frame)
        return scale_to_uint8(x, *percentile_range(x, clip))
    return np.asarray(frame.convert("RGB"))  # P, PA, RGBA, CMYK, YCbCr, LAB, HSV, RGBX


def dicom_modality(ds) -> str:
    tag = str(ds.get("Modality", "") or "").upper()
    if tag not in DICOM_MODALITY:
        raise NotAnImage(f"DICOM Modality {tag or '(none)'!r} is not a corpus modality; give the source a fixed "
                         "`modality` to include such files")
    return DICOM_MODALITY[tag]


def _first(v: Any) -> float:
    return float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)


def _dicom_rescale(ds) -> tuple[float, float]:
    """Rescale slope/intercept: top level, else the shared functional group (enhanced multi-frame)."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return _first(ds.get("RescaleSlope", 1) or 1), _first(ds.get("RescaleIntercept", 0) or 0)
    try:
        t = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        return _first(t.RescaleSlope), _first(t.RescaleIntercept)
    except (AttributeError, IndexError, KeyError):
        return 1.0, 0.0


def _dicom_window(ds) -> tuple[float, float] | None:
    """The file's first VOI window (WindowCenter/Width), top level or shared functional group."""
    try:
        if "WindowCenter" in ds and "WindowWidth" in ds:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        else:
            voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
            c, w = _first(voi.WindowCenter), _first(voi.WindowWidth)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return (c, w) if w > 0 else None


def read_dicom(path: str | Path, src: Source, modality: str) -> list[tuple[str, str, np.ndarray]]:
    """Frames of one DICOM file as (suffix, modality, uint8 image): rescale, window, MONOCHROME1, colour to RGB."""
    import pydicom

    ds = pydicom.dcmread(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotAnImage("DICOM without pixel data (a report, a DICOMDIR, ...)")
    modality = modality or dicom_modality(ds)
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        depth = 16 if arr.dtype == np.uint16 else 8
    else:
        depth = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    color = photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel", 1)) == 3
    frames = (arr if n_frames > 1 else arr[None])[:: src.frame_stride]
    suffix = (lambda k: f"#{k * src.frame_stride}") if n_frames > 1 else (lambda k: "")
    if color:
        imgs = frames if frames.dtype == np.uint8 else scale_to_uint8(frames, 0, 2**depth - 1)
        return [(suffix(k), modality, im) for k, im in enumerate(imgs)]
    slope, intercept = _dicom_rescale(ds)
    x = frames.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    y = scale_to_uint8(x, *window_range(x, src, modality, _dicom_window(ds)))
    if photometric == "MONOCHROME1":
        y = 255 - y
    return [(suffix(k), modality, im) for k, im in enumerate(y)]


def read_nifti(path: str | Path, src: Source) -> list[tuple[str, np.ndarray]]:
    """Slices of one NIfTI volume (RAS+; first volume of 4D data) along ``axes``, ``slice_stride`` apart.

    The volume is normalised once (so slices share a mapping); each slice is resized to its physical aspect
    ratio (voxel spacing), so coronal/sagittal slices of thick-slice scans are not squashed."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = img.dataobj
    index = (slice(None),) * 3 + (0,) * (len(img.shape) - 3)
    vol = np.asarray(data[index] if len(img.shape) > 3 else data[...], dtype=np.float32)
    if vol.ndim == 2:
        vol = vol[..., None]
    spacing = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - min(3, len(img.header.get_zooms())))
    cal = (float(img.header["cal_min"]), float(img.header["cal_max"]))
    from_file = ((cal[0] + cal[1]) / 2, cal[1] - cal[0]) if cal[1] > cal[0] else None
    vol8 = scale_to_uint8(vol, *window_range(vol, src, src.modality, from_file))
    out = []
    for name in src.axes:
        ax = AXES[name]
        other = [a for a in range(3) if a != ax]
        for k in range(0, vol8.shape[ax], src.slice_stride):
            sl = np.rot90(np.take(vol8, k, axis=ax))  # rows: 2nd remaining axis (up = superior/anterior), cols: 1st
            out.append((f"#{name}={k}", _physical_aspect(sl, spacing[other[0]], spacing[other[1]])))
    return out


def _physical_aspect(sl: np.ndarray, col_mm: float, row_mm: float) -> np.ndarray:
    """Resize a slice so that one pixel covers the same distance along rows and columns."""
    if col_mm <= 0 or row_mm <= 0 or abs(col_mm / row_mm - 1) < 0.01:
        return np.ascontiguousarray(sl)
    unit = min(col_mm, row_mm)
    w = max(1, round(sl.shape[1] * col_mm / unit))
    h = max(1, round(sl.shape[0] * row_mm / unit))
    return resize_bicubic(np.ascontiguousarray(sl), (w, h))


def read_frames(unit: FileUnit, src: Source) -> list[tuple[str, str, np.ndarray]]:
    """(origin suffix, modality, uint8 image) of every frame/slice a file contributes."""
    if unit.fmt == "dicom":
        return read_dicom(unit.path, src, unit.modality)
    if unit.fmt == "nifti":
        return [(s, unit.modality, im) for s, im in read_nifti(unit.path, src)]
    return [(s, unit.modality, im) for s, im in read_image_file(unit.path, src)]


def convert_unit(unit: ArrayUnit | FileUnit, src: Source, size: int) -> UnitResult:
    """Read and convert one unit; unreadable files become skips (bad), files without images skips (not bad)."""
    from biovfm.data.store import content_hash

    if isinstance(unit, ArrayUnit):
        res = UnitResult(unit.source, inputs=len(unit.images))
        for j, im in enumerate(unit.images):
            img = to_study(im, size)
            res.images.append((f"{unit.origin}[{unit.start + j}]", unit.modality[j], img, content_hash(img)))
        return res
    res = UnitResult(unit.source, inputs=1)
    try:
        frames = read_frames(unit, src)
    except SourceError:
        raise
    except NotAnImage as e:
        res.skipped.append({"path": unit.origin, "reason": str(e), "bad": False})
        return res
    except Exception as e:  # corrupt, truncated, unsupported encodings: the file is skipped and reported
        res.skipped.append({"path": unit.origin, "reason": f"{type(e).__name__}: {e}"[:300], "bad": True})
        return res
    if not frames:
        res.skipped.append({"path": unit.origin, "reason": "no frames or slices", "bad": False})
    for suffix, modality, im in frames:
        if src.skip_blank and is_blank(im):
            res.blank += 1
            continue
        img = to_study(im, size)
        res.images.append((unit.origin + suffix, modality, img, content_hash(img)))
    return res
