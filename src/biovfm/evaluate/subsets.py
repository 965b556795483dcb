"""Label-efficiency subsets: which training labels a probe sees at a fraction of the training set.

Stratified, seeded and nested: each class keeps ``max(1, round(fraction * n_class))`` rows, taken as a prefix of
one seeded permutation of that class, so the 1% rows are among the 10% rows, which are among the 100%.
Multi-label tasks: a prefix of one seeded permutation of all rows, plus, for a label column without a positive
in it, that column's first positive in the same order (a probe cannot learn a label it never sees).
The rows depend on (seed, task, fraction) only: every model of a study sees the same labels.
"""
from __future__ import annotations

import zlib

import numpy as np

from biovfm.data.medmnist import MULTI_LABEL, TaskInfo


def label_subset(y: np.ndarray, fraction: float, info: TaskInfo, seed: int = 0) -> np.ndarray:
    """Sorted training-row indices of the ``fraction`` label subset (all rows at 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    y = np.asarray(y).reshape(len(y), -1)
    n = len(y)
    if fraction == 1:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(info.flag.encode())])
    if info.task == MULTI_LABEL:
        order = rng.permutation(n)
        keep = set(order[:max(1, round(fraction * n))].tolist())
        for col in range(y.shape[1]):
            pos = order[y[order, col] == 1]
            if len(pos) and not keep.intersection(pos.tolist()):
                keep.add(int(pos[0]))
        return np.array(sorted(keep))
    rows = []
    for cls in np.unique(y[:, 0]):
        members = np.flatnonzero(y[:, 0] == cls)
        members = members[rng.permutation(len(members))]
        rows.append(members[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(rows))

