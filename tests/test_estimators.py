"""The reference probe, kNN and label subsets against independent references (scikit-learn, closed forms)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from biovfm.data.medmnist import TASKS, TaskInfo
from biovfm.evaluate import logreg as lr
from biovfm.evaluate.knn import fit_knn
from biovfm.evaluate.logreg import LogRegConfig, fit_logreg, standardizer
from biovfm.evaluate.scores import parse_variant, variant_name
from biovfm.evaluate.subsets import label_subset


def _linear_task(flag: str, n: dict[str, int], d: int = 30, seed: int = 0) -> tuple[dict, dict]:
    """Features with a linear (logistic) ground truth in the task's label layout; columns on unequal scales."""
    info = TASKS[flag]
    rng = np.random.default_rng(seed)
    k = info.n_labels if info.task.startswith("multi-label") else info.n_outputs
    w = rng.normal(size=(d, k)) * 0.4
    scale = rng.uniform(0.1, 10, d)
    x, y = {}, {}
    for split, m in n.items():
        z = rng.normal(size=(m, d))
        if info.task.startswith("multi-label"):
            y[split] = (z @ w + rng.logistic(size=(m, k)) > 1.0).astype(np.int64)
        else:
            y[split] = np.argmax(z @ w + rng.gumbel(size=(m, k)), axis=1)[:, None]
        x[split] = (z * scale + 3.0).astype(np.float32)
    return x, y


@pytest.mark.parametrize("flag", ["breastmnist", "dermamnist", "chestmnist"])
def test_logreg_equals_scikit_learn_at_fixed_c(flag: str) -> None:
    x, y = _linear_task(flag, {"train": 400, "val": 100, "test": 300})
    r = fit_logreg(x, y, TASKS[flag], LogRegConfig(c_grid=(0.05,), tol=1e-8))
    mu, sd = standardizer(x["train"])
    z = {s: (x[s] - mu) / sd for s in x}
    sk = dict(C=0.05, max_iter=10_000, tol=1e-10)
    if flag == "chestmnist":  # one-vs-rest: one binary model per label column
        ref = np.stack([LogisticRegression(**sk).fit(z["train"], y["train"][:, j]).predict_proba(z["test"])[:, 1]
                        for j in range(y["train"].shape[1])], axis=1)
    else:
        ref = LogisticRegression(**sk).fit(z["train"], y["train"][:, 0]).predict_proba(z["test"])
    assert r.converged
    assert np.abs(r.test_scores - ref).max() < 1e-5


def test_logreg_reads_memory_maps_in_chunks_and_is_deterministic(tmp_path, monkeypatch) -> None:
    x, y = _linear_task("dermamnist", {"train": 300, "val": 80, "test": 120})
    whole = fit_logreg(x, y, TASKS["dermamnist"], LogRegConfig(c_grid=(0.01, 1.0, 100.0)))
    again = fit_logreg(x, y, TASKS["dermamnist"], LogRegConfig(c_grid=(0.01, 1.0, 100.0)))
    assert np.array_equal(whole.test_scores, again.test_scores) and whole.c == again.c
    mapped = {}
    for s, a in x.items():
        np.save(tmp_path / f"{s}.npy", a)
        mapped[s] = np.load(tmp_path / f"{s}.npy", mmap_mode="r")
    monkeypatch.setattr(lr, "CHUNK", 37)
    chunked = fit_logreg(mapped, y, TASKS["dermamnist"], LogRegConfig(c_grid=(0.01, 1.0, 100.0)))
    assert chunked.c == whole.c
    assert np.abs(chunked.test_scores - whole.test_scores).max() < 1e-6


def test_logreg_on_a_subset_equals_logreg_on_a_copy_of_those_rows() -> None:
    x, y = _linear_task("dermamnist", {"train": 300, "val": 80, "test": 120})
    rows = np.arange(0, 300, 3)
    a = fit_logreg(x, y, TASKS["dermamnist"], LogRegConfig(c_grid=(0.1, 1.0)), train_rows=rows)
    b = fit_logreg({**x, "train": x["train"][rows]}, {**y, "train": y["train"][rows]}, TASKS["dermamnist"],
                   LogRegConfig(c_grid=(0.1, 1.0)))
    assert a.c == b.c and np.abs(a.test_scores - b.test_scores).max() < 1e-9


def _collinear_task(n: int, d: int, rank: int, seed: int = 0) -> tuple[dict, dict]:
    """Multi-class features of low rank plus tiny noise, as LayerNorm-ed ViT features are (eigenvalues spanning
    five decades): the case where plain L-BFGS stalls."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(rank, d)) * np.logspace(0, -2.5, rank)[:, None]
    w = rng.normal(size=(rank, 4))
    x, y = {}, {}
    for split, m in {"train": n, "val": 150, "test": 200}.items():
        z = rng.normal(size=(m, rank))
        x[split] = (z @ mix + 1e-3 * rng.normal(size=(m, d))).astype(np.float32)
        y[split] = np.argmax(z @ w + rng.gumbel(size=(m, 4)), axis=1)[:, None]
    return x, y


@pytest.mark.parametrize("n,d", [(400, 60), (120, 300)])  # d <= n: covariance eigenbasis; d > n: Gram matrix
def test_preconditioned_logreg_reaches_the_same_optimum_in_far_fewer_iterations(n, d, monkeypatch) -> None:
    x, y = _collinear_task(n, d, rank=40)
    info = TaskInfo("collinear", "multi-class", 3, 4, "synthetic")
    cfg = LogRegConfig(c_grid=(10.0,), tol=1e-7, max_iter=20_000)
    fast = fit_logreg(x, y, info, cfg)
    plain = fit_logreg(x, y, info, dataclasses.replace(cfg, precondition=False))
    monkeypatch.setattr(lr, "CACHE_BYTES", 0)  # streamed rows: the weights are rotated instead of the features
    streamed = fit_logreg(x, y, info, cfg)
    mu, sd = standardizer(x["train"])
    ref = LogisticRegression(C=10.0, max_iter=100_000, tol=1e-12).fit((x["train"] - mu) / sd, y["train"][:, 0])
    ref_scores = ref.predict_proba((x["test"] - mu) / sd)
    assert fast.converged and plain.converged and streamed.converged
    for r in (fast, plain, streamed):
        assert np.abs(r.test_scores - ref_scores).max() < 1e-4
    assert fast.n_iter * 3 < plain.n_iter, (fast.n_iter, plain.n_iter)


def _gaussian_binary(n: dict[str, int], delta: float, d: int, prevalence: float, seed: int) -> tuple[dict, dict]:
    """Two Gaussians N(0, I) and N(delta e1 / ..., I): the Bayes-optimal (linear) AUC is Phi(|mu1 - mu0| / sqrt 2)."""
    rng = np.random.default_rng(seed)
    shift = np.zeros(d)
    shift[:3] = delta / math.sqrt(3)
    x, y = {}, {}
    for s, m in n.items():
        lab = (rng.random(m) < prevalence).astype(np.int64)
        x[s] = (rng.normal(size=(m, d)) + lab[:, None] * shift).astype(np.float32) * 4.0 + 1.0
        y[s] = lab[:, None]
    return x, y


def bayes_auc(delta: float) -> float:
    return 0.5 * (1 + math.erf(delta / 2))  # Phi(delta / sqrt 2)


def test_logreg_reaches_the_bayes_optimal_auc_of_a_known_linear_task() -> None:
    delta = 1.5
    x, y = _gaussian_binary({"train": 3000, "val": 500, "test": 20000}, delta, 20, 0.5, seed=1)
    r = fit_logreg(x, y, TASKS["breastmnist"])
    assert abs(r.auc - bayes_auc(delta)) < 0.01, (r.auc, bayes_auc(delta))
    majority = max(np.mean(y["test"]), 1 - np.mean(y["test"]))
    assert r.acc > majority


def test_knn_equals_scikit_learn_cosine_knn() -> None:
    for flag in ("dermamnist", "breastmnist"):
        x, y = _linear_task(flag, {"train": 300, "val": 10, "test": 200}, seed=2)
        r = fit_knn(x, y, TASKS[flag], k=11)
        ref = KNeighborsClassifier(n_neighbors=11, metric="cosine", algorithm="brute").fit(x["train"], y["train"][:, 0])
        proba = np.zeros_like(r.test_scores)
        proba[:, ref.classes_] = ref.predict_proba(x["test"])
        assert np.allclose(r.test_scores, proba), flag
        assert r.acc == pytest.approx(np.mean(ref.predict(x["test"]) == y["test"][:, 0]))


def test_knn_multi_label_scores_are_neighbour_label_fractions() -> None:
    x, y = _linear_task("chestmnist", {"train": 200, "val": 10, "test": 50}, seed=3)
    r = fit_knn(x, y, TASKS["chestmnist"], k=5)
    xn = x["train"] / np.linalg.norm(x["train"], axis=1, keepdims=True)
    sim = x["test"] @ xn.T
    top = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    assert np.allclose(r.test_scores, y["train"][top].mean(axis=1))


@pytest.mark.parametrize("flag", ["dermamnist", "breastmnist", "chestmnist"])
def test_label_subsets_are_stratified_nested_seeded_and_cover_every_class(flag: str) -> None:
    info = TASKS[flag]
    _, y = _linear_task(flag, {"train": 2000})
    y = y["train"]
    subsets = {f: label_subset(y, f, info, seed=0) for f in (0.01, 0.1, 0.5, 1.0)}
    assert np.array_equal(subsets[1.0], np.arange(len(y)))
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[0.5])  # nested
    assert np.array_equal(subsets[0.1], label_subset(y, 0.1, info, seed=0))  # seeded
    assert not np.array_equal(subsets[0.1], label_subset(y, 0.1, info, seed=1))
    for f, rows in subsets.items():
        if flag == "chestmnist":
            assert (y[rows].sum(0) > 0)[y.sum(0) > 0].all()  # every label with a positive somewhere has one here
            assert len(rows) >= round(f * len(y))
        else:
            full = np.bincount(y[:, 0], minlength=info.n_outputs)
            got = np.bincount(y[rows, 0], minlength=info.n_outputs)
            assert (got[full > 0] >= 1).all()
            assert np.all(np.abs(got - np.maximum(1, np.round(f * full)) * (full > 0)) <= 0)  # stratified


def test_label_subset_rejects_a_fraction_outside_0_1() -> None:
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(np.zeros((10, 1)), 0.0, TASKS["breastmnist"])


def test_variant_names_round_trip() -> None:
    for probe, f in (("logreg", 1.0), ("logreg", 0.1), ("logreg", 0.01), ("paper", 0.005), ("knn", 1.0)):
        assert parse_variant(variant_name(probe, f)) == (probe, pytest.approx(f))
    assert variant_name("logreg", 0.1) == "logreg_10pct"
    with pytest.raises(ValueError, match="variant"):
        parse_variant("Logreg-10")


# ----------------------------------------------------------------------------- the analysis of the estimators
def _points(rows: list[dict], reps: np.ndarray):
    import pandas as pd

    from biovfm.analysis.scaling import POINT_KEYS, Points

    base = {k: 0 for k in POINT_KEYS} | {"method": "", "model": "", "modality": ""}
    return Points(pd.DataFrame([base | r for r in rows]), reps)


def test_probe_fidelity_pairs_models_and_tasks_and_counts_where_the_paper_head_is_lower() -> None:
    from biovfm.analysis.estimators import probe_fidelity

    rng = np.random.default_rng(0)
    keys = [{"kind": "pretrained", "method": "mae", "model": m, "task": t} for m in ("a", "b") for t in ("mean", "x")]
    ref_reps = rng.normal(0.8, 0.01, (4, 200))
    shift = np.array([[-0.02], [-0.03], [0.01], [-0.01]])
    paper = _points([k | {"auc": 0.8 + s[0]} for k, s in zip(keys, shift)], ref_reps + shift)
    ref = _points([k | {"auc": 0.8} for k in keys][::-1], ref_reps[::-1])  # another row order: matched by keys
    per, summ = probe_fidelity(paper, ref)
    assert np.allclose(per["diff"], shift[:, 0])
    assert np.allclose(per["diff_lo"], shift[:, 0]) and np.allclose(per["diff_hi"], shift[:, 0])  # paired: no spread
    mean = summ.set_index("task").loc["mean"]
    assert mean["n_models"] == 2 and mean["n_lower"] == 1 and mean["diff"] == pytest.approx(-0.005)
    assert probe_fidelity(None, ref)[0].empty


def test_summary_rows_per_estimator_from_a_real_mlflow_run(mlflow_uri) -> None:
    from biovfm import tracking
    from biovfm.analysis.collect import split_estimators, summary_from_runs

    run = tracking.Run(mlflow_uri, "test", name="evaluate x", tags={"stage": "evaluate", "grid_id": "mae/a", "kind": "pretrained",
                       "method": "mae", "model": "a", "primary_probe": "logreg"}, params={})
    metrics = {"auc.t1": 0.9, "acc.t1": 0.8}
    for name, auc in (("logreg", 0.9), ("paper", 0.85), ("logreg_10pct", 0.8), ("knn", 0.7)):
        metrics |= {f"auc_{name}.t1": auc, f"acc_{name}.t1": auc - 0.1}
    run.log_metrics(metrics | {"majority_acc.t1": 0.5})
    run.finish()
    s = summary_from_runs(tracking.fetch_runs(mlflow_uri, [run.run_id]))
    got = {(r.probe, r.label_fraction): (r.auc, r.primary) for r in s.itertuples()}
    assert got == {("logreg", 1.0): (0.9, True), ("paper", 1.0): (0.85, False), ("logreg", 0.1): (0.8, False),
                   ("knn", 1.0): (0.7, False)}
    assert (s["majority_acc"] == 0.5).all()
    parts = split_estimators(s, {})
    assert set(parts) == {"logreg", "paper", "logreg_10pct", "knn", "primary"}
    assert parts["primary"][0]["auc"].tolist() == [0.9]


def test_the_paper_head_also_reaches_the_bayes_optimal_auc() -> None:
    from biovfm.evaluate.probe import fit_probe

    delta = 1.5
    x, y = _gaussian_binary({"train": 3000, "val": 500, "test": 20000}, delta, 20, 0.5, seed=1)
    r = fit_probe(x, y, TASKS["breastmnist"], normalized=True)  # LayerNorm of 20 Gaussians would lower the optimum
    assert abs(r.auc - bayes_auc(delta)) < 0.01, (r.auc, bayes_auc(delta))


def test_on_small_imbalanced_tasks_the_paper_head_stays_near_the_reference() -> None:
    """500 train / 80 val, 20% positives, 200 features: the paper's head, on average over tasks, is not worse than
    the converged reference by more than the tolerance, and its accuracy not below the lower of the reference's and
    the majority class's."""
    from biovfm.evaluate.job import majority_acc
    from biovfm.evaluate.probe import fit_probe, normalize_features

    diffs = []
    for seed in range(4):
        x, y = _gaussian_binary({"train": 500, "val": 80, "test": 2000}, 1.2, 200, 0.2, seed=10 + seed)
        x = {s: normalize_features(a, s) for s, a in x.items()}
        ref = fit_logreg(x, y, TASKS["breastmnist"])
        head = fit_probe(x, y, TASKS["breastmnist"], normalized=True)
        diffs.append(head.auc - ref.auc)
        floor = min(ref.acc, majority_acc(y["train"], y["test"], TASKS["breastmnist"]))
        assert head.acc >= floor - 0.03, (head.acc, ref.acc, seed)  # 2,000 test images: 3 standard errors
    assert np.mean(diffs) > -0.02, diffs


def test_below_majority_flags_only_accuracies_whose_interval_is_under_the_majority_class() -> None:
    import pandas as pd

    from biovfm.analysis.estimators import below_majority

    rows = [{"kind": "pretrained", "method": "mae", "model": m, "task": "breastmnist", "auc": 0.6, "acc": acc,
             "acc_lo": acc - 0.04, "acc_hi": acc + 0.04} for m, acc in (("a", 0.70), ("b", 0.70), ("c", 0.66))]
    pts = _points(rows, np.zeros((3, 5)))
    summary = pd.DataFrame({"task": ["breastmnist"], "majority_acc": [0.73]})
    got = below_majority(summary, {"logreg_10pct": pts})
    assert got["model"].tolist() == ["c"] and got["label_fraction"].tolist() == [0.1]
    no_binary = _points([r | {"task": "pathmnist"} for r in rows], np.zeros((3, 5)))  # a study without a binary task
    summary = pd.DataFrame({"task": ["pathmnist"], "majority_acc": ["0.2"]})  # as read back from a CSV of strings
    assert below_majority(summary, {"logreg": no_binary}).empty
