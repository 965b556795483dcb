"""The paper's digitised numbers (biovfm.analysis.paper) reproduce its printed means, slopes and correlations."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from biovfm.analysis import paper as P
from biovfm.analysis.fits import loglog_fit
from biovfm.data.medmnist import TASKS

COLS = {"dino": ["D-T", "D-S", "D-B", "D-L"], "mae": ["M-T", "M-S", "M-B", "M-L"]}


def ols_slope(y, x):
    """The package's own fit of the paper's form (OLS of ln AUC on ln x), on the paper's x-values."""
    return loglog_fit(np.asarray(x, float), np.asarray(y, float))["slope"]


def test_table_shape_and_tasks():
    t = P.per_task_table()
    assert list(t.index) == list(P.TASK_ORDER) and list(t.columns) == list(P.AUC_COLUMNS)
    assert set(t.index) == set(TASKS) == set(P.TASK_SLOPES) == set(P.MEDMNIST_SPLITS) == set(P.PX_PRECISION)
    assert t.notna().all().all() and ((t > 50) & (t < 100)).all().all()
    assert list(P.X_PARAMS_M.values()) == [31.2, 47.4, 111.66, 329.24]


@pytest.mark.parametrize("method", P.METHODS)
def test_refit_reproduces_printed_slopes(method):
    t = P.per_task_table()
    x = list(P.X_PARAMS_M.values())
    j = P.METHODS.index(method)
    for task in P.TASK_ORDER:
        assert ols_slope(t.loc[task, COLS[method]], x) == pytest.approx(P.TASK_SLOPES[task][j], abs=3e-4), task
    # The mean panel and the mean of the per-task values agree, and both refit to the printed mean slope.
    means = t[COLS[method]].mean().to_numpy()
    assert means == pytest.approx(np.array(P.MEAN_AUC[method]), abs=0.03)
    assert ols_slope(P.MEAN_AUC[method], x) == pytest.approx(P.MEAN_SLOPES[method], abs=1e-4)
    assert ols_slope(means, x) == pytest.approx(P.MEAN_SLOPES[method], abs=1e-4)


def test_biomedclip_and_data_experiment():
    assert P.per_task_table()["BiomedCLIP"].mean() == pytest.approx(P.BIOMEDCLIP_MEAN_AUC, abs=0.03)
    assert list(P.DATA_EXPERIMENT.values()) == [93.25, 94.22, 94.42]


def test_factor_correlations_from_counts():
    """Section 4.5: num_samples = train+val+test and num_classes reproduce the printed r."""
    totals = [sum(P.MEDMNIST_SPLITS[t]) for t in P.TASK_ORDER]
    classes = [TASKS[t].n_labels for t in P.TASK_ORDER]
    for j, m in enumerate(P.METHODS):
        slopes = [P.TASK_SLOPES[t][j] for t in P.TASK_ORDER]
        assert pearsonr(totals, slopes)[0] == pytest.approx(P.FACTOR_CORRELATIONS["n_samples"][j], abs=0.005)
        assert pearsonr(classes, slopes)[0] == pytest.approx(P.FACTOR_CORRELATIONS["n_classes"][j], abs=0.005)
    f = P.paper_factor_correlations()
    assert len(f) == 8 and f.set_index(["method", "factor"]).loc[("mae", "dbi"), "r"] == 0.61


def test_long_tables():
    a = P.paper_auc()
    assert len(a) == 2 * 4 * 13 and not a.duplicated(["method", "model", "task"]).any()
    assert a.set_index(["method", "model", "task"]).loc[("dino", "large", "mean"), "auc"] == 94.93
    assert a.set_index(["method", "model", "task"]).loc[("mae", "base", "pathmnist"), "auc"] == 97.6
    s = P.paper_slopes()
    assert len(s) == 26 and s.set_index(["method", "task"]).loc[("mae", "octmnist"), "slope"] == 0.0692


def test_paper_comparison_mapping():
    ours = pd.DataFrame([
        {"method": "dino", "model": "large", "task": "pathmnist", "auc": 0.9950, "auc_lo": 0.9940, "auc_hi": 0.9970},
        {"method": "mae", "model": "tiny", "task": "mean", "auc": 0.90, "auc_lo": 0.895, "auc_hi": 0.899},
        {"method": "mae", "model": "tiny", "task": "chestmnist", "auc": 0.70, "auc_lo": np.nan, "auc_hi": np.nan},
        {"method": "mae", "model": "pico", "task": "pathmnist", "auc": 0.9, "auc_lo": 0.8, "auc_hi": 0.95},
        {"method": "random", "model": "tiny", "task": "pathmnist", "auc": 0.9, "auc_lo": 0.8, "auc_hi": 0.95},
        {"method": "dino", "model": "base", "task": "mytask", "auc": 0.9, "auc_lo": 0.8, "auc_hi": 0.95},
    ])
    c = P.paper_comparison(ours)
    assert list(c.columns) == P.COMPARISON_COLUMNS
    assert [tuple(r) for r in c[["method", "model", "task"]].itertuples(index=False)] == [
        ("dino", "large", "pathmnist"), ("mae", "tiny", "chestmnist"), ("mae", "tiny", "mean")]
    r = c.iloc[0]
    assert r["ours"] == pytest.approx(99.50) and r["paper"] == 99.57 and r["diff"] == pytest.approx(-0.07)
    assert r["ours_lo"] == pytest.approx(99.40) and bool(r["paper_in_ci"])
    assert c.iloc[1]["paper"] == 70.15 and not c.iloc[1]["paper_in_ci"]  # no interval
    assert c.iloc[2]["paper"] == 89.44 and not c.iloc[2]["paper_in_ci"]  # 89.44 outside [89.5, 89.9]
    assert c["paper_in_ci"].dtype == bool
    no_ci = P.paper_comparison(ours[["method", "model", "task", "auc"]])
    assert no_ci["ours_lo"].isna().all() and len(no_ci) == 3
    with pytest.raises(ValueError, match="several rows"):
        P.paper_comparison(pd.concat([ours, ours.iloc[:1]]))
    with pytest.raises(ValueError, match="lacks column"):
        P.paper_comparison(ours.drop(columns="auc"))


def test_comparable():
    assert P.comparable("medmnist", 224)[0]
    ok, why = P.comparable("synthetic", 28)
    assert not ok and "synthetic" in why and "28 px" in why and "\n" not in why
    ok, why = P.comparable("medmnist", 64)
    assert not ok and "64 px" in why and "synthetic" not in why
