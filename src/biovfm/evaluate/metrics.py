"""MedMNIST evaluator metrics (``medmnist/evaluator.py`` getAUC/getACC), reproduced exactly.

The paper reports these numbers, so every branch below mirrors the evaluator: both arrays are
squeezed; multi-label averages per-label ROC-AUC/accuracy; binary uses the score's last column;
multi-class and ordinal use a macro one-vs-rest AUC and argmax accuracy. The one deliberate
difference: an undefined AUC (a class or label with only one value in ``y_true``) raises
:class:`UndefinedAUCError` naming it, instead of sklearn's version-dependent error or NaN.

Each ROC-AUC is the Mann-Whitney statistic from average ranks, which is the area under the ROC curve with ties
handled as sklearn's ``roc_auc_score`` handles them (the tests hold them equal to 1e-12), at a fraction of its
per-call cost: the probes compute a validation AUC for every penalty and label, thousands of times per study.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

from biovfm.data.medmnist import BINARY, MULTI_LABEL, TASK_TYPES


class UndefinedAUCError(ValueError):
    """ROC-AUC is undefined because one class/label column of ``y_true`` has a single value."""


def _check_task(task: str) -> None:
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task type {task!r}; expected one of {TASK_TYPES}")


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Probabilities as the paper scores them: sigmoid for multi-label, softmax otherwise.

    ACC thresholds at 0.5 (binary, multi-label), so the evaluator must see probabilities.
    """
    _check_task(task)
    z = np.asarray(logits, dtype=np.float64)
    if task == MULTI_LABEL:
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free sigmoid
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _auc(y_true_binary: np.ndarray, score: np.ndarray, what: str) -> float:
    values = np.unique(y_true_binary)
    if values.size < 2:
        raise UndefinedAUCError(
            f"ROC-AUC undefined for {what}: y_true has only the value {values.tolist()} "
            f"among {y_true_binary.size} samples (that class is absent or is the only one present)"
        )
    pos = y_true_binary == values[-1]  # the larger value is the positive class, as in sklearn
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    ranks = rankdata(np.asarray(score, dtype=np.float64))  # ties share their average rank
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _last_column(y_score: np.ndarray) -> np.ndarray:
    if y_score.ndim == 2:
        return y_score[:, -1]
    if y_score.ndim != 1:
        raise ValueError(f"binary scores must be N or N x C, got shape {y_score.shape}")
    return y_score


def get_auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """MedMNIST ``getAUC``: macro per-label (multi-label), last column (binary), macro OvR otherwise."""
    _check_task(task)
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    if task == MULTI_LABEL:
        return float(np.mean([_auc(y_true[:, i], y_score[:, i], f"label column {i}") for i in range(y_score.shape[1])]))
    if task == BINARY:
        return _auc(y_true, _last_column(y_score), "the binary task")
    if y_score.ndim != 2:
        raise ValueError(f"{task} scores must be N x C, got shape {y_score.shape}")
    return float(
        np.mean([_auc((y_true == i).astype(float), y_score[:, i], f"class {i}") for i in range(y_score.shape[1])])
    )


def get_acc(y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5) -> float:
    """MedMNIST ``getACC``: per-label thresholded mean, ``score[:, -1] > threshold``, or argmax."""
    _check_task(task)
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    if task == MULTI_LABEL:
        y_pred = y_score > threshold
        return float(np.mean([np.mean(y_true[:, i] == y_pred[:, i]) for i in range(y_true.shape[1])]))
    if task == BINARY:
        return float(np.mean(y_true == (_last_column(y_score) > threshold)))
    return float(np.mean(y_true == np.argmax(y_score, axis=-1)))


def auc_or_nan(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """:func:`get_auc`, NaN with a warning when undefined: a tiny validation split must not abort a probe."""
    try:
        return get_auc(y_true, y_score, task)
    except UndefinedAUCError as e:
        warnings.warn(f"val AUC set to NaN: {e}", stacklevel=3)
        return float("nan")
