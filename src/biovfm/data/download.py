"""Download stage. For the embedded default, 'downloading' means generating the synthetic benchmark
(deterministically, offline) into data/raw/synthetic in the same files real MedMNIST would give."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from biovfm.data.medmnist import task_info, validate_arrays
from biovfm.io import write_json, write_npz

CORPUS = "corpus.npz"


def raw_task_name(flag: str) -> str:
    return f"{flag}.npz"


def generate_synthetic(out_dir: str | Path, tasks: list[str], n_train: int, n_val: int, n_test: int,
                       size: int, corpus_size: int, seed: int) -> dict:
    from biovfm.data import synthetic

    out = Path(out_dir)
    t0 = time.perf_counter()
    for i, flag in enumerate(tasks):
        data = synthetic.generate_task(flag, n_train, n_val, n_test, size=size, seed=seed)
        validate_arrays(data, out / raw_task_name(flag), task_info(flag))
        write_npz(out / raw_task_name(flag), **data)
        print(f"[download] synthetic {flag}: {n_train}/{n_val}/{n_test} images at {size}px ({i + 1}/{len(tasks)})", flush=True)
    images, modality = synthetic.generate_corpus(corpus_size, synthetic.MODALITIES, size=size, seed=seed)
    write_npz(out / CORPUS, images=images, modality=np.asarray(modality, dtype=str))
    n_eval = len(tasks) * (n_train + n_val + n_test)
    manifest = {"source": "synthetic", "tasks": tasks, "size": size, "seed": seed, "corpus_size": corpus_size,
                "eval_images": n_eval, "seconds": round(time.perf_counter() - t0, 2)}
    print(f"[download] synthetic corpus: {corpus_size} images; total {manifest['seconds']}s", flush=True)
    return manifest
