"""Preprocess stage: evaluation tasks resized to the study's image size; the corpus into its store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from biovfm.data import store
from biovfm.data.medmnist import SPLITS, load_npz, task_info, validate_arrays
from biovfm.io import write_json, write_npz


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 N x H x W [x 3] images (PIL, as MedMNIST+ was made); identity at equal size."""
    if images.shape[1] == size:
        return images
    out = np.empty((len(images), size, size, *images.shape[3:]), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
    return out


def preprocess_task(raw_npz: str | Path, out_npz: str | Path, flag: str, size: int) -> None:
    info = task_info(flag)
    data = load_npz(raw_npz, info)
    for split in SPLITS:
        data[f"{split}_images"] = resize_images(data[f"{split}_images"], size)
    validate_arrays(data, out_npz, info)
    write_npz(out_npz, **data)


def preprocess_corpus(raw_npz: str | Path, out_dir: str | Path, size: int, source: str,
                      task_npzs: list[str | Path] = ()) -> dict:
    """Build the store from a raw corpus npz (keys images, modality); refuses a corpus holding evaluation images."""
    raw_npz = Path(raw_npz)
    with np.load(raw_npz, allow_pickle=False) as z:
        if set(z.files) != {"images", "modality"}:
            raise ValueError(f"{raw_npz}: a corpus npz needs exactly the keys images, modality; found {z.files}")
        images, modality = z["images"], z["modality"]
    images = resize_images(images, size)
    hashes = np.array([store.content_hash(im) for im in images])
    leaked = int(np.isin(hashes, list(evaluation_hashes(task_npzs))).sum())
    if leaked:
        raise ValueError(f"{raw_npz}: {leaked} corpus images are identical to evaluation images; the corpus must not contain them")
    counts = store.write_store(out_dir, images, np.full(len(images), source), modality, hashes)
    report = {"source": source, **counts, "leaked": 0, "by_modality": {str(k): int(v) for k, v in zip(*np.unique(modality, return_counts=True))}}
    write_json(Path(out_dir) / "report.json", report)
    return report


def evaluation_hashes(task_npzs: list[str | Path]) -> set[str]:
    """Content hashes (as RGB, the corpus convention) of every image of every split of these tasks."""
    out = set()
    for path in task_npzs:
        data = load_npz(path)
        for split in SPLITS:
            for im in data[f"{split}_images"]:
                out.add(store.content_hash(im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=-1)))
    return out
