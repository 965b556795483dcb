"""MedMNIST getAUC/getACC semantics against values counted by hand (concordant pairs, ties = 1/2)."""
from __future__ import annotations

import numpy as np
import pytest

from biovfm.data.medmnist import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL
from biovfm.evaluate.metrics import UndefinedAUCError, get_acc, get_auc, scores_from_logits

# Multi-class, 3 classes, y = [0, 0, 1, 1, 2, 2] as MedMNIST's N x 1 column; rows sum to 1.
MC_Y = np.array([[0], [0], [1], [1], [2], [2]])
MC_S = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.3, 0.4, 0.3],
        [0.5, 0.3, 0.2],
        [0.2, 0.7, 0.1],
        [0.1, 0.2, 0.7],
        [0.3, 0.3, 0.4],
    ]
)
# class 0: pos {.6,.3} vs neg {.5,.2,.1,.3}: 4 + (0+1+1+.5) = 6.5/8
# class 1: pos {.3,.7} vs neg {.3,.4,.2,.3}: (.5+0+1+.5) + 4 = 6/8
# class 2: pos {.7,.4} vs neg {.1,.3,.2,.1}: 8/8
MC_AUC = (6.5 / 8 + 6 / 8 + 1.0) / 3
# argmax = [0, 1, 0, 1, 2, 2] vs [0, 0, 1, 1, 2, 2]: 4 of 6
MC_ACC = 4 / 6

# Multi-label, 3 label columns.
ML_Y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
ML_S = np.array([[0.9, 0.3, 0.5], [0.2, 0.8, 0.5], [0.4, 0.7, 0.2], [0.6, 0.1, 0.6]])
# col 0: pos {.9,.4} vs neg {.2,.6}: 3/4; col 1: pos {.8,.7} vs neg {.3,.1}: 1; col 2: pos {.5,.5} vs neg {.2,.6}: 2/4
ML_AUC = (0.75 + 1.0 + 0.5) / 3
# > 0.5 (strict): col 0 [1,0,0,1] vs [1,0,1,0]: 2/4; col 1 exact: 1; col 2 [0,0,0,1] vs [1,1,0,0]: 1/4
ML_ACC = (0.5 + 1.0 + 0.25) / 3

# Binary with 2 score columns: only the last column counts. The first column is deliberately
# anti-informative so that using it (or the argmax) would give different numbers.
BIN_Y = np.array([[0], [0], [1], [1]])
BIN_S = np.array([[0.0, 0.1], [0.0, 0.6], [1.0, 0.35], [1.0, 0.8]])
# last column: pos {.35,.8} vs neg {.1,.6}: (1+0) + (1+1) = 3/4; > .5 -> [0,1,0,1] vs [0,0,1,1]: 2/4
BIN_AUC, BIN_ACC = 0.75, 0.5


def test_multi_class_hand_counted() -> None:
    assert get_auc(MC_Y, MC_S, MULTI_CLASS) == pytest.approx(MC_AUC)
    assert get_acc(MC_Y, MC_S, MULTI_CLASS) == pytest.approx(MC_ACC)


def test_ordinal_is_scored_as_multi_class() -> None:
    """RetinaMNIST: one-vs-rest macro AUC and argmax ACC, no ordinal metric (paper 7.1)."""
    assert get_auc(MC_Y, MC_S, ORDINAL) == pytest.approx(MC_AUC)
    assert get_acc(MC_Y, MC_S, ORDINAL) == pytest.approx(MC_ACC)
    # a 2-class ordinal example counted by hand: class 0 pos {.8,.4} vs neg {.6,.3} on column 0 -> 3/4,
    # class 1 pos {.4,.7} vs neg {.2,.6} on column 1 -> 3/4
    y = np.array([0, 0, 1, 1])
    s = np.array([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    assert get_auc(y, s, ORDINAL) == pytest.approx(0.75)
    assert get_acc(y, s, ORDINAL) == pytest.approx(0.5)  # argmax [0,1,0,1]


def test_multi_label_hand_counted() -> None:
    assert get_auc(ML_Y, ML_S, MULTI_LABEL) == pytest.approx(ML_AUC)
    assert get_acc(ML_Y, ML_S, MULTI_LABEL) == pytest.approx(ML_ACC)


def test_multi_label_threshold_argument() -> None:
    # threshold 0.45: col 0 [1,0,0,1] -> 2/4; col 1 -> 1; col 2 [1,1,0,1] vs [1,1,0,0] -> 3/4
    assert get_acc(ML_Y, ML_S, MULTI_LABEL, threshold=0.45) == pytest.approx((0.5 + 1.0 + 0.75) / 3)


def test_binary_uses_last_column() -> None:
    assert get_auc(BIN_Y, BIN_S, BINARY) == pytest.approx(BIN_AUC)
    assert get_acc(BIN_Y, BIN_S, BINARY) == pytest.approx(BIN_ACC)
    # 1-D scores are the positive-class scores themselves
    assert get_auc(BIN_Y, BIN_S[:, 1], BINARY) == pytest.approx(BIN_AUC)
    assert get_acc(BIN_Y.ravel(), BIN_S[:, 1], BINARY) == pytest.approx(BIN_ACC)


def test_scores_from_logits() -> None:
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    p = scores_from_logits(z, MULTI_CLASS)
    assert np.allclose(p.sum(axis=1), 1.0) and np.all(np.isfinite(p))
    assert np.allclose(p[1], 1 / 3) and p[0, 0] == pytest.approx(1.0)
    s = scores_from_logits(z, MULTI_LABEL)
    assert np.allclose(s, [[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]])
    assert np.allclose(scores_from_logits(z, BINARY), p)  # binary: 2-logit softmax, same code path


def test_logits_vs_probabilities() -> None:
    """Which metric the sigmoid/softmax step changes, per task type.

    Multi-label: sigmoid is monotone per entry, so AUC is unchanged, but thresholding logits at 0.5
    (instead of 0) changes ACC. Multi-class: argmax is softmax-invariant, so ACC is unchanged, but OvR
    AUC compares one column across rows, which softmax re-orders (paper 7.9: scoring raw logits is wrong).
    """
    logits = np.array([[2.0, -1.0], [0.3, 0.4], [-0.5, 2.0], [0.2, -3.0]])
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = scores_from_logits(logits, MULTI_LABEL)
    assert get_auc(y, logits, MULTI_LABEL) == pytest.approx(get_auc(y, probs, MULTI_LABEL))
    # logits > .5 -> col0 [1,0,0,0] (3/4 correct), col1 [0,0,1,0] (3/4); probs > .5 -> col0 [1,1,0,1], col1 [0,1,1,0]
    assert get_acc(y, logits, MULTI_LABEL) == pytest.approx(0.75)
    assert get_acc(y, probs, MULTI_LABEL) == pytest.approx((0.75 + 1.0) / 2)

    z = np.array([[2.0, 0.0], [3.0, 5.0], [0.0, 1.0]])
    yc = np.array([[0], [1], [1]])
    pc = scores_from_logits(z, MULTI_CLASS)
    assert get_acc(yc, z, MULTI_CLASS) == get_acc(yc, pc, MULTI_CLASS) == pytest.approx(1.0)
    # logits: class 0 pos {2} vs neg {3, 0} -> 1/2, class 1 pos {5, 1} vs neg {0} -> 1;
    # softmax: class 0 pos {.88} vs neg {.12, .27} -> 1, class 1 pos {.88, .73} vs neg {.12} -> 1
    assert get_auc(yc, z, MULTI_CLASS) == pytest.approx(0.75)
    assert get_auc(yc, pc, MULTI_CLASS) == pytest.approx(1.0)


def test_absent_class_is_a_clear_error() -> None:
    y = np.array([[0], [1], [0], [1]])  # class 2 never occurs
    s = np.full((4, 3), 1 / 3)
    with pytest.raises(UndefinedAUCError, match="class 2"):
        get_auc(y, s, MULTI_CLASS)
    with pytest.raises(UndefinedAUCError, match="label column 1"):
        get_auc(np.array([[1, 0], [0, 0]]), np.array([[0.2, 0.1], [0.4, 0.3]]), MULTI_LABEL)
    with pytest.raises(UndefinedAUCError, match="binary"):
        get_auc(np.array([[1], [1]]), np.array([[0.2, 0.8], [0.4, 0.6]]), BINARY)
    assert issubclass(UndefinedAUCError, ValueError)


def test_unknown_task_type() -> None:
    with pytest.raises(ValueError, match="unknown task type"):
        get_auc(MC_Y, MC_S, "multiclass")


@pytest.mark.parametrize("task", [BINARY, MULTI_CLASS, MULTI_LABEL])
def test_rank_auc_and_accuracy_equal_sklearn_on_random_scores_with_ties(task) -> None:
    """The rank-based AUC is sklearn's roc_auc_score (ties included) and the accuracy is accuracy_score."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    n, k = 300, 5
    scores = np.round(rng.random((n, k)), 1)  # one decimal: many ties
    if task == MULTI_LABEL:
        y = (rng.random((n, k)) < 0.3).astype(int)
        auc = np.mean([roc_auc_score(y[:, i], scores[:, i]) for i in range(k)])
        acc = np.mean([accuracy_score(y[:, i], scores[:, i] > 0.5) for i in range(k)])
    elif task == BINARY:
        y = (rng.random((n, 1)) < 0.2).astype(int)
        auc, acc = roc_auc_score(y[:, 0], scores[:, -1]), accuracy_score(y[:, 0], scores[:, -1] > 0.5)
    else:
        y = rng.integers(0, k, (n, 1))
        auc = np.mean([roc_auc_score(y[:, 0] == i, scores[:, i]) for i in range(k)])
        acc = accuracy_score(y[:, 0], scores.argmax(1))
    assert get_auc(y, scores, task) == pytest.approx(auc, abs=1e-12)
    assert get_acc(y, scores, task) == pytest.approx(acc, abs=1e-15)
