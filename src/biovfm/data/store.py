"""The pretraining corpus store: one uint8 image array plus an index table (source, modality, content hash).

Subsets for each (modality mix, data size) are nested: a fixed seeded permutation of the eligible rows,
so a smaller subset is always a prefix of a larger one. Subsets are computed where they are used (the
pretraining job) so that adding a data size never rewrites the store and never reruns other jobs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from biovfm.io import atomic_path, write_text

IMAGES = "images.npy"
INDEX = "index.csv"


def content_hash(image: np.ndarray) -> str:
    """Hash of the pixels and shape, the identity used for de-duplication and leakage checks."""
    h = hashlib.sha1(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


@dataclass
class CorpusStore:
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped when loaded from disk
    index: pd.DataFrame  # columns: source, modality, hash

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, modalities: tuple[str, ...] | list[str], n: int, seed: int = 0) -> np.ndarray:
        """Row indices of the first ``n`` images of the seeded permutation of rows in ``modalities``."""
        eligible = np.flatnonzero(self.index["modality"].isin(list(modalities)).to_numpy())
        if n > len(eligible):
            raise ValueError(
                f"corpus has {len(eligible)} images of modalities {list(modalities)}, a subset of {n} was requested; "
                "enlarge the corpus (data.synthetic.corpus_size) or reduce grid.data_sizes"
            )
        order = np.random.default_rng([seed, 0x5EB]).permutation(len(eligible))
        return np.sort(eligible[order[:n]])


def write_store(out_dir: str | Path, images: np.ndarray, sources: np.ndarray, modalities: np.ndarray,
                hashes: np.ndarray | None = None) -> dict[str, int]:
    """De-duplicate exact copies and write the store atomically; returns counts for the stage report."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"corpus images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if hashes is None:
        hashes = np.array([content_hash(im) for im in images])
    _, first = np.unique(hashes, return_index=True)
    keep = np.sort(first)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / IMAGES, suffix=".tmp.npy") as tmp:
        np.save(tmp, images[keep])
    index = pd.DataFrame({"source": sources[keep], "modality": modalities[keep], "hash": hashes[keep]})
    write_text(out / INDEX, index.to_csv(index_label="row"))
    return {"read": int(len(images)), "duplicates": int(len(images) - len(keep)), "kept": int(len(keep))}


def load_store(store_dir: str | Path) -> CorpusStore:
    d = Path(store_dir)
    for name in (IMAGES, INDEX):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing; run the preprocess stage (snakemake preprocess)")
    images = np.load(d / IMAGES, mmap_mode="r")
    index = pd.read_csv(d / INDEX, index_col="row")
    if len(index) != len(images):
        raise ValueError(f"{d}: index has {len(index)} rows but {IMAGES} holds {len(images)} images; rebuild the store")
    return CorpusStore(images=images, index=index)
