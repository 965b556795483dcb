"""The pretraining corpus store: fixed-size image shards plus an index table (source, modality, hash, origin).

On disk (one folder, written as a whole by :func:`biovfm.io.atomic_dir`, so it is never half-written)::

    index.csv      row, source, modality, hash, origin (file/frame/slice the image came from)
    shards.json    format/version, image shape, row count, shard list [{file, n}]
    shards/000000.npy ...  uint8 (n, H, W, 3) each, ``shard_size`` rows except the last; memory-mapped on load
    report.json    what the preprocess stage read, skipped, de-duplicated and kept (written by the stage)

Shards make the stage stream (constant memory) and keep each file small; ``images[idx]`` reads only the rows asked
for. The former single-array layout (``images.npy``) still loads, with identical subsets.

Subsets for each (modality mix, data size) are nested: a fixed seeded permutation of the eligible rows,
so a smaller subset is always a prefix of a larger one. Subsets are computed where they are used (the
pretraining job) so that adding a data size never rewrites the store and never reruns other jobs.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biovfm.io import atomic_dir

INDEX = "index.csv"
MANIFEST = "shards.json"
SHARDS = "shards"
REPORT = "report.json"
LEGACY_IMAGES = "images.npy"
FORMAT = "biovfm-corpus"
VERSION = 2
DEFAULT_SHARD_SIZE = 1024
INDEX_COLUMNS = ("source", "modality", "hash", "origin")


def content_hash(image: np.ndarray) -> str:
    """Hash of the pixels and shape, the identity used for de-duplication and leakage checks."""
    h = hashlib.sha1(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class ShardedImages:
    """A read-only (N, H, W, 3) uint8 view over memory-mapped shards; ``images[idx]`` returns an ndarray."""

    def __init__(self, files: list[Path], counts: list[int], image_shape: tuple[int, ...]) -> None:
        self._files = files
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: list[np.ndarray | None] = [None] * len(files)
        self.shape = (int(self._offsets[-1]), *image_shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _shard(self, k: int) -> np.ndarray:
        if self._maps[k] is None:
            m = np.load(self._files[k], mmap_mode="r")
            want = (int(self._offsets[k + 1] - self._offsets[k]), *self.shape[1:])
            if m.shape != want or m.dtype != np.uint8:
                raise ValueError(f"{self._files[k]}: holds {m.dtype} {m.shape}, the manifest says uint8 {want}; "
                                 "rebuild the store (rerun the preprocess stage)")
            self._maps[k] = m
        return self._maps[k]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for a store of {len(self)} images")
            k = int(np.searchsorted(self._offsets, i, side="right") - 1)
            return np.asarray(self._shard(k)[i - self._offsets[k]])
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for a store of {len(self)} images")
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for k in np.unique(shard_of):
            sel = shard_of == k
            out[sel] = self._shard(int(k))[rows[sel] - self._offsets[k]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)


@dataclass
class CorpusStore:
    images: np.ndarray | ShardedImages  # (N, H, W, 3) uint8, memory-mapped when loaded from disk
    index: pd.DataFrame  # columns: source, modality, hash (and origin)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, modalities: tuple[str, ...] | list[str], n: int, seed: int = 0) -> np.ndarray:
        """Row indices of the first ``n`` images of the seeded permutation of rows in ``modalities``."""
        eligible = np.flatnonzero(self.index["modality"].isin(list(modalities)).to_numpy())
        if n > len(eligible):
            have = self.index["modality"].value_counts().to_dict()
            raise ValueError(
                f"corpus has {len(eligible)} images of modalities {list(modalities)} (by modality: {have}), a subset "
                f"of {n} was requested; add sources (corpus.sources; data.synthetic.corpus_size for the synthetic "
                "corpus) or reduce grid.data_sizes"
            )
        order = np.random.default_rng([seed, 0x5EB]).permutation(len(eligible))
        return np.sort(eligible[order[:n]])


class StoreWriter:
    """Streams images into fixed-size shards and rows into ``index.csv`` inside ``folder`` (a temp folder).

    Memory: one shard buffer, whatever the corpus size. Call :meth:`close` to flush and write the manifest."""

    def __init__(self, folder: str | Path, image_shape: tuple[int, int, int], shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.folder = Path(folder)
        (self.folder / SHARDS).mkdir(parents=True, exist_ok=True)
        self.image_shape = tuple(image_shape)
        self._buf = np.empty((shard_size, *image_shape), np.uint8)
        self._fill = 0
        self._shards: list[dict[str, Any]] = []
        self._index_file = open(self.folder / INDEX, "w", newline="")
        self._index = csv.writer(self._index_file)
        self._index.writerow(("row", *INDEX_COLUMNS))
        self.n = 0

    def add(self, image: np.ndarray, source: str, modality: str, hash_: str, origin: str = "") -> int:
        if image.shape != self.image_shape or image.dtype != np.uint8:
            raise ValueError(f"{origin or 'image'}: got {image.dtype} {image.shape}, the store holds uint8 {self.image_shape}")
        self._buf[self._fill] = image
        self._fill += 1
        self._index.writerow((self.n, source, modality, hash_, origin))
        self.n += 1
        if self._fill == len(self._buf):
            self._flush()
        return self.n - 1

    def _flush(self) -> None:
        if self._fill:
            name = f"{SHARDS}/{len(self._shards):06d}.npy"
            np.save(self.folder / name, self._buf[: self._fill])
            self._shards.append({"file": name, "n": self._fill})
            self._fill = 0

    def close(self) -> dict[str, Any]:
        self._flush()
        self._index_file.close()
        manifest = {"format": FORMAT, "version": VERSION, "image_shape": list(self.image_shape), "dtype": "uint8",
                    "n_images": self.n, "shard_size": len(self._buf), "shards": self._shards}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


def write_store(out_dir: str | Path, images: np.ndarray, sources: np.ndarray, modalities: np.ndarray,
                hashes: np.ndarray | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                origins: np.ndarray | None = None) -> dict[str, int]:
    """De-duplicate exact copies (first one kept) and write an in-memory corpus atomically; returns counts."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"corpus images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if hashes is None:
        hashes = np.array([content_hash(im) for im in images])
    _, first = np.unique(hashes, return_index=True)
    keep = np.sort(first)
    with atomic_dir(out_dir) as tmp:
        w = StoreWriter(tmp, images.shape[1:], shard_size)
        for i in keep:
            w.add(images[i], str(sources[i]), str(modalities[i]), str(hashes[i]), "" if origins is None else str(origins[i]))
        w.close()
    return {"read": int(len(images)), "duplicates": int(len(images) - len(keep)), "kept": int(len(keep))}


def read_index(path: str | Path) -> pd.DataFrame:
    """The index table; strings stay strings (a source named 'NA' is not a missing value)."""
    return pd.read_csv(path, index_col="row", dtype={c: str for c in INDEX_COLUMNS}, keep_default_na=False)


def load_store(store_dir: str | Path) -> CorpusStore:
    """Open a store (sharded, or the former single ``images.npy``) without reading the images."""
    d = Path(store_dir)
    if not (d / INDEX).is_file():
        raise FileNotFoundError(f"{d / INDEX}: missing; run the preprocess stage (snakemake preprocess_corpus)")
    index = read_index(d / INDEX)
    if (d / MANIFEST).is_file():
        m = json.loads((d / MANIFEST).read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{d / MANIFEST}: not a {FORMAT} v{VERSION} manifest; rebuild the store")
        files = [d / s["file"] for s in m["shards"]]
        if missing := [str(f) for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{d}: {len(missing)} shard(s) missing, e.g. {missing[0]}; rebuild the store")
        images: Any = ShardedImages(files, [int(s["n"]) for s in m["shards"]], tuple(m["image_shape"]))
    elif (d / LEGACY_IMAGES).is_file():
        images = np.load(d / LEGACY_IMAGES, mmap_mode="r")
    else:
        raise FileNotFoundError(f"{d / MANIFEST}: missing; run the preprocess stage (snakemake preprocess_corpus)")
    if len(index) != len(images):
        raise ValueError(f"{d}: index has {len(index)} rows but the shards hold {len(images)} images; rebuild the store")
    return CorpusStore(images=images, index=index)
