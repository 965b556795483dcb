"""k-nearest-neighbour classification on frozen features: the training-free view of a representation.

As the MedMNIST+ benchmark (Doerrich et al. 2024; k = 11): cosine similarity, a uniform vote of the k most
similar training images. Scores are the vote fractions per class (multi-label: the fraction of neighbours
carrying each label; binary: ``[1 - f, f]`` for the positive fraction f), so the MedMNIST evaluator's AUC and
ACC apply unchanged (ACC is the majority vote). Similarities are computed a block of queries at a time from
the features as they are (norms folded in), so memory is a block x N, never a normalised copy of the features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from biovfm.data.medmnist import MULTI_LABEL, TaskInfo
from biovfm.evaluate.metrics import get_acc, get_auc

K = 11  # the MedMNIST+ benchmark's k
QUERY_BLOCK = 256  # queries per similarity block: 256 x N float32 at a time (170 MB at TissueMNIST's 165k train images)
NORM_EPS = 1e-12


@dataclass
class KnnResult:
    test_scores: np.ndarray
    auc: float
    acc: float
    k: int


def _rows(x: np.ndarray, start: int, stop: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x[start:stop], dtype=np.float32)).to(device)


def _inv_norms(x: np.ndarray, device: torch.device) -> torch.Tensor:
    out = [_rows(x, s, s + QUERY_BLOCK, device).norm(dim=1).clamp_min(NORM_EPS).reciprocal()
           for s in range(0, len(x), QUERY_BLOCK)]
    return torch.cat(out)


def neighbours(train: np.ndarray, query: np.ndarray, k: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Indices (len(query) x k) of the ``k`` training rows most cosine-similar to each query row, most similar
    first; ties go to the lower training index (deterministic)."""
    device = torch.device(device)
    k = min(k, len(train))
    t = torch.from_numpy(np.asarray(train, dtype=np.float32)).to(device)
    inv_t = _inv_norms(train, device)
    out = []
    for s in range(0, len(query), QUERY_BLOCK):
        q = _rows(query, s, s + QUERY_BLOCK, device)
        sim = (q @ t.T) * inv_t  # the query's own norm does not change its ranking
        out.append(torch.topk(sim, k, dim=1, sorted=True).indices.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def vote_scores(neigh: np.ndarray, y_train: np.ndarray, info: TaskInfo) -> np.ndarray:
    """Vote fractions per class (or label) of each query's neighbours, in the evaluator's score layout."""
    y = np.asarray(y_train).reshape(len(y_train), -1)
    if info.task == MULTI_LABEL:
        return y[neigh].mean(axis=1).astype(np.float64)
    onehot = np.eye(info.n_outputs)[y[:, 0].astype(np.int64)]
    return onehot[neigh].mean(axis=1)


def fit_knn(x: dict[str, np.ndarray], y: dict[str, np.ndarray], info: TaskInfo, k: int = K,
            device: torch.device | str = "cpu") -> KnnResult:
    """kNN of every test image among the training images, scored with the MedMNIST evaluator."""
    if k < 1:
        raise ValueError(f"kNN needs k >= 1, got {k}")
    scores = vote_scores(neighbours(x["train"], x["test"], k, device), y["train"], info)
    return KnnResult(test_scores=scores, auc=get_auc(y["test"], scores, info.task),
                     acc=get_acc(y["test"], scores, info.task), k=min(k, len(x["train"])))
