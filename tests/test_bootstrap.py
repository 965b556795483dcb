"""Test-set bootstrap: exact weighted AUC, MedMNIST semantics, pairing across models, textbook intervals."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from biovfm.analysis.bootstrap import (
    metric_replicates,
    percentile_ci,
    resample_counts,
    seed_resampled_mean,
    weighted_auc,
)
from biovfm.evaluate.metrics import get_acc, get_auc


def test_weighted_auc_equals_sklearn_with_sample_weights_and_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y, 1.0), 1)  # rounded: many ties
    w = next(resample_counts(300, 5, "t"))
    got = weighted_auc(y, s, w)
    want = [roc_auc_score(y, s, sample_weight=w[i]) for i in range(5)]
    assert got == pytest.approx(want, abs=1e-12)


def test_resamples_are_counts_deterministic_and_keyed() -> None:
    a = np.concatenate(list(resample_counts(50, 250, "task", chunk=100)))
    b = np.concatenate(list(resample_counts(50, 250, "task", chunk=100)))
    c = np.concatenate(list(resample_counts(50, 250, "other", chunk=100)))
    assert a.shape == (250, 50) and (a.sum(axis=1) == 50).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="empty test set"):
        next(resample_counts(0, 10, "x"))


def _case(task: str, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    if task == "multi-label, binary-class":
        y = rng.integers(0, 2, (n, 4))
        s = 1 / (1 + np.exp(-(y + rng.normal(0, 1.2, y.shape))))
    elif task == "binary-class":
        y = rng.integers(0, 2, (n, 1))
        p = 1 / (1 + np.exp(-(y[:, 0] + rng.normal(0, 1.2, n))))
        s = np.stack([1 - p, p], axis=1)
    else:
        y = rng.integers(0, 5, (n, 1))
        z = rng.normal(0, 1, (n, 5))
        z[np.arange(n), y[:, 0]] += 1.0
        s = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return y, s


@pytest.mark.parametrize("task", ["multi-label, binary-class", "binary-class", "multi-class", "ordinal-regression"])
def test_replicates_center_on_the_medmnist_metric(task: str) -> None:
    y, s = _case(task)
    reps = metric_replicates(y, {"m": s}, task, key=task, n_boot=400)["m"]
    auc, acc = get_auc(y, s, task), get_acc(y, s, task)
    lo, hi = percentile_ci(reps[0])
    assert lo < auc < hi and abs(np.mean(reps[0]) - auc) < 0.01
    lo, hi = percentile_ci(reps[1])
    assert lo < acc < hi and abs(np.mean(reps[1]) - acc) < 0.01


def test_accuracy_interval_is_the_textbook_binomial_interval() -> None:
    """ACC of n=2000 images with p=0.8: 95% CI half-width 1.96 sqrt(p(1-p)/n) = 0.0175."""
    n, p = 2000, 0.8
    y = np.zeros((n, 1), dtype=int)
    right = np.arange(n) < int(p * n)
    s = np.stack([right, ~right], axis=1).astype(float)  # argmax correct on exactly 80% of the images
    acc = metric_replicates(y, {"m": s}, "multi-class", key="acc", n_boot=2000)["m"][1]
    lo, hi = percentile_ci(acc)
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(p, abs=0.003)


def test_models_share_resamples_so_differences_are_paired() -> None:
    """Two models whose scores differ by a constant shift rank identically: every replicate agrees exactly,
    so the paired difference has zero width while each AUC's own interval does not."""
    y, s = _case("binary-class", n=300)
    reps = metric_replicates(y, {"a": s, "b": np.clip(s + 1e-3, 0, 1)}, "binary-class", key="k", n_boot=300)
    d = reps["a"][0] - reps["b"][0]
    lo, hi = percentile_ci(reps["a"][0])
    assert np.abs(d).max() < 1e-12 and hi - lo > 0.02


def test_mismatched_scores_are_refused() -> None:
    y, s = _case("binary-class", n=100)
    with pytest.raises(ValueError, match="99 test scores for 100"):
        metric_replicates(y, {"m": s[:99]}, "binary-class", key="k", n_boot=10)


def test_seed_resampling_widens_the_interval_by_the_seed_spread() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0.8, 0.005, 1000)
    one = seed_resampled_mean(base[None], 1000, "g")
    assert np.array_equal(one, base)
    three = seed_resampled_mean(np.stack([base - 0.02, base, base + 0.02]), 1000, "g")
    assert np.std(three) > 2 * np.std(base)
    assert np.mean(three) == pytest.approx(0.8, abs=0.003)
