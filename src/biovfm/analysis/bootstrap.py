"""Test-set bootstrap of the MedMNIST metrics: seeded, paired across models, vectorised.

A resample is a vector of multinomial counts over the test images. The counts of resample ``b`` of a
task depend only on (task, test-set size, seed), so every model evaluated on that task sees the same
resamples: differences, slopes and fitted laws computed replicate by replicate are paired bootstraps,
whose spread is the test-set uncertainty of the quantity itself, not of each point separately.

AUC under counts is the weighted Mann-Whitney statistic (ties count one half), computed for all
resamples at once from one sort of the scores; it equals ``roc_auc_score(..., sample_weight=counts)``.
Metric semantics follow ``biovfm.evaluate.metrics`` (MedMNIST's evaluator): macro over label columns
(multi-label), last score column (binary), macro one-vs-rest (multi-class, ordinal). A class absent
from a resample makes its AUC undefined; the macro mean skips it (NaN only if every column is undefined).
"""
from __future__ import annotations

import warnings
import zlib
from typing import Iterator

import numpy as np

from biovfm.data.medmnist import BINARY, MULTI_LABEL

N_BOOT = 1000
LEVEL = 0.95
CHUNK = 100  # resamples per block: bounds memory to CHUNK x n_test floats per array


def resample_counts(n: int, n_boot: int = N_BOOT, key: str = "", seed: int = 0, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Blocks (``chunk`` x n, float64) of bootstrap counts over ``n`` items; the same for the same (n, key, seed)."""
    if n < 1:
        raise ValueError(f"cannot bootstrap an empty test set ({key or 'unnamed'})")
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), n])
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def weighted_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Binary ROC-AUC of ``score`` for labels ``y`` (0/1, n) under each row of weights ``w`` (B x n)."""
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], np.asarray(y)[order].astype(bool)
    w = w[:, order]
    if not (s[1:] == s[:-1]).any():  # no ties (most probabilities): each positive beats the negatives below it
        wp = w[:, pos]
        num = (wp * np.cumsum(w * ~pos, axis=1)[:, pos]).sum(axis=1)
        p, q = wp.sum(axis=1), w[:, ~pos].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = num / (p * q)
        auc[(p == 0) | (q == 0)] = np.nan
        return auc
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    p, q = wp.sum(axis=1), wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = num / (p * q)
    auc[(p == 0) | (q == 0)] = np.nan
    return auc


def _auc_columns(y: np.ndarray, scores: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(binary labels, score) pairs whose AUCs the task's metric averages."""
    if task == MULTI_LABEL:
        return [(y[:, i], scores[:, i]) for i in range(scores.shape[1])]
    if task == BINARY:
        return [(y.reshape(-1), scores[:, -1] if scores.ndim == 2 else scores)]
    lab = y.reshape(-1)
    return [((lab == i).astype(np.int8), scores[:, i]) for i in range(scores.shape[1])]


def correct(y: np.ndarray, scores: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Per-image accuracy (multi-label: fraction of label columns right), so ACC = mean over images."""
    if task == MULTI_LABEL:
        return ((scores > threshold) == y.astype(bool)).mean(axis=1)
    if task == BINARY:
        s = scores[:, -1] if scores.ndim == 2 else scores
        return ((s > threshold) == y.reshape(-1).astype(bool)).astype(float)
    return (scores.argmax(axis=1) == y.reshape(-1)).astype(float)


def metric_replicates(y: np.ndarray, scores: dict[str, np.ndarray], task: str, key: str, n_boot: int = N_BOOT,
                      seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bootstrap replicates (AUC, ACC), each of shape (n_boot,), for every model's test scores on one task.

    ``scores`` maps a model name to its N x C test scores (probabilities); ``y`` is the MedMNIST label
    array (N x 1, or N x L for multi-label). All models share the resamples of ``key`` (the task).
    """
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    n = len(y)
    for name, s in scores.items():
        if len(s) != n:
            raise ValueError(f"{key}: {name} has {len(s)} test scores for {n} test labels")
    cols = {name: _auc_columns(y, np.asarray(s, dtype=np.float64), task) for name, s in scores.items()}
    right = {name: correct(y, np.asarray(s), task) for name, s in scores.items()}
    aucs: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    accs: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    for w in resample_counts(n, n_boot, key, seed):
        total = w.sum(axis=1)
        for name in scores:
            per_col = np.stack([weighted_auc(yc, sc, w) for yc, sc in cols[name]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every column is undefined
                aucs[name].append(np.nanmean(per_col, axis=0))
            accs[name].append(w @ right[name] / total)
    return {name: (np.concatenate(aucs[name]), np.concatenate(accs[name])) for name in scores}


def percentile_ci(reps: np.ndarray, level: float = LEVEL, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of replicates along ``axis``, ignoring undefined (NaN) replicates."""
    alpha = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN bounds
        lo, hi = np.nanpercentile(reps, [alpha, 100 - alpha], axis=axis)
    return lo, hi


def seed_resampled_mean(reps: np.ndarray, n_boot: int, key: str, seed: int = 0) -> np.ndarray:
    """Replicates of a mean over seeds (S x B -> B): resample the seeds too, so the interval covers
    the seed-to-seed spread as well as the test set. One seed: its replicates unchanged."""
    reps = np.asarray(reps, dtype=float)
    s = reps.shape[0]
    if s == 1:
        return reps[0]
    pick = np.random.default_rng([seed, zlib.crc32(key.encode()), 7]).integers(0, s, size=(n_boot, s))
    return reps[pick, np.arange(n_boot)[:, None]].mean(axis=1)
