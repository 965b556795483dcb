"""Scaling fits: exact recovery on power-law data, degenerate inputs, seed/task averaging, table shapes."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from biovfm.analysis.fits import (
    data_size_slopes,
    loglog_fit,
    mean_auc_table,
    model_size_slopes,
    task_auc_table,
)

SIZES = {"pico": 1_000_000, "nano": 3_000_000, "micro": 9_000_000}
DATA = (1000, 4000)
TASKS3 = ("pathmnist", "chestmnist", "dermamnist")
TASK_C = {"pathmnist": 0.70, "chestmnist": 0.55, "dermamnist": 0.62}  # AUC prefactors (0-1 scale)
SLOPE = {"mae": 0.010, "dino": 0.006}  # model-size exponents
DATA_SLOPE = {"mae": 0.004, "dino": 0.002}
RANDOM_SLOPE = 0.003


def _row(run_id, kind, method, model, modality, data_size, seed, task, auc, params) -> dict:
    return dict(run_id=run_id, kind=kind, method=method, model=model, modality=modality, data_size=data_size,
                seed=seed, task=task, auc=auc, acc=auc - 0.1, params_encoder=params, params_paper=params + 7,
                flops_per_image=2.0 * params, images_seen=64_000 if kind == "pretrained" else 0,
                train_steps=1000 if kind == "pretrained" else 0)


def power_law_summary(tasks=TASKS3, methods=("mae", "dino"), sizes=SIZES, data=DATA) -> pd.DataFrame:
    """AUC = c_task * N**b_method * D**g_method exactly; MAE has 2 seeds at +-1% (mean unchanged)."""
    rows = []
    for method in methods:
        seeds = {0: 1.01, 1: 0.99} if method == "mae" else {0: 1.0}
        for model, n in sizes.items():
            for d in data:
                rid = f"{method}-{model}-all-{d}"
                for seed, f in seeds.items():
                    for t in tasks:
                        auc = TASK_C[t] * n ** SLOPE[method] * d ** DATA_SLOPE[method] * f
                        rows.append(_row(rid, "pretrained", method, model, "all", d, seed, t, auc, n))
    for model, n in sizes.items():
        for t in tasks:
            rows.append(_row(f"random-{model}", "random_init", "random", model, "", 0, 0, t,
                             0.9 * TASK_C[t] * n ** RANDOM_SLOPE, n))
    for t in tasks:
        rows.append(_row("raw", "raw_pixels", "raw", "", "", 0, 0, t, 0.6, 0))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- loglog_fit
def test_loglog_fit_recovers_exact_power_law() -> None:
    x = np.array([1e6, 3e6, 1e7, 3e7])
    y = 42.0 * x ** 0.0191
    fit = loglog_fit(x, y)
    assert fit["slope"] == pytest.approx(0.0191, abs=1e-12)
    assert fit["intercept"] == pytest.approx(np.log(42.0), abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["n_points"] == 4 and fit["note"] == ""


def test_loglog_fit_noisy_is_close() -> None:
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 3e8, 12)
    y = 60.0 * x ** 0.02 * np.exp(rng.normal(0.0, 0.002, x.size))
    fit = loglog_fit(x, y)
    assert fit["slope"] == pytest.approx(0.02, abs=0.002)
    assert fit["intercept"] == pytest.approx(np.log(60.0), abs=0.05)
    assert 0.9 < fit["r2"] < 1.0


def test_loglog_fit_paper_mae_means() -> None:
    """The paper's MAE mean AUCs (section 4.1) refit to its printed slope 0.0191."""
    fit = loglog_fit([31.2e6, 47.4e6, 111.66e6, 329.24e6], [89.44, 91.91, 93.41, 94.02])
    assert fit["slope"] == pytest.approx(0.0191, abs=2e-4)


@pytest.mark.parametrize(
    "x, y",
    [([5e6], [90.0]), ([5e6, 5e6, 5e6], [90.0, 91.0, 89.0]), ([], []), ([0.0, -1.0], [90.0, 91.0])],
)
def test_loglog_fit_degenerate_gives_nan_and_note(x, y) -> None:
    fit = loglog_fit(x, y)
    assert np.isnan(fit["slope"]) and np.isnan(fit["intercept"]) and np.isnan(fit["r2"])
    assert "needs >= 2 model sizes" in fit["note"]


def test_loglog_fit_drops_unloggable_points_and_says_so() -> None:
    fit = loglog_fit([1e6, 2e6, 4e6, 0.0, 8e6], [10.0, 10.0 * 2 ** 0.1, 10.0 * 4 ** 0.1, 50.0, np.nan])
    assert fit["slope"] == pytest.approx(0.1)
    assert fit["n_points"] == 3
    assert "dropped 2" in fit["note"]


def test_loglog_fit_edge_notes() -> None:
    assert "exact fit" in loglog_fit([1.0, 2.0], [3.0, 4.0])["note"]
    flat = loglog_fit([1.0, 2.0, 4.0], [5.0, 5.0, 5.0])
    assert flat["slope"] == 0.0 and np.isnan(flat["r2"]) and "constant" in flat["note"]
    assert "needs >= 2 data sizes" in loglog_fit([1.0], [1.0], x_name="data sizes")["note"]
    with pytest.raises(ValueError):
        loglog_fit([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- mean / task tables
def _hand_summary() -> pd.DataFrame:
    rows = [
        # run A, two seeds, two tasks
        _row("A", "pretrained", "mae", "pico", "all", 100, 0, "pathmnist", 0.80, 10),
        _row("A", "pretrained", "mae", "pico", "all", 100, 0, "chestmnist", 0.60, 10),
        _row("A", "pretrained", "mae", "pico", "all", 100, 1, "pathmnist", 0.90, 10),
        _row("A", "pretrained", "mae", "pico", "all", 100, 1, "chestmnist", 0.70, 10),
        # raw pixels, one seed
        _row("R", "raw_pixels", "raw", "", "", 0, 0, "pathmnist", 0.50, 0),
        _row("R", "raw_pixels", "raw", "", "", 0, 0, "chestmnist", 0.40, 0),
    ]
    return pd.DataFrame(rows)


def test_mean_auc_table_averages_tasks_then_seeds() -> None:
    tab = mean_auc_table(_hand_summary())
    assert list(tab["kind"]) == ["pretrained", "raw_pixels"]
    a = tab.iloc[0]
    assert a["run_id"] == "A" and a["n_seeds"] == 2 and a["n_tasks"] == 2 and a["seeds"] == "0,1"
    assert a["mean_auc"] == pytest.approx(0.75)  # seed means 0.70 and 0.80
    assert a["mean_auc_std"] == pytest.approx(np.std([0.70, 0.80], ddof=1))
    assert a["mean_acc"] == pytest.approx(0.65)
    assert a["params_paper"] == 17 and a["train_steps"] == 1000
    r = tab.iloc[1]
    assert r["mean_auc"] == pytest.approx(0.45) and r["n_seeds"] == 1 and np.isnan(r["mean_auc_std"])


def test_mean_auc_table_per_seed_run_ids_and_csv_roundtrip() -> None:
    """Distinct run_ids per seed merge into one grid point; NaN model/modality from CSV keep baselines."""
    df = _hand_summary()
    df.loc[df["seed"] == 1, "run_id"] = "A-s1"
    df = pd.read_csv(io.StringIO(df.to_csv(index=False)))
    assert df["modality"].isna().any()
    tab = mean_auc_table(df)
    assert len(tab) == 2
    assert tab.iloc[0]["run_id"] == "A,A-s1" and tab.iloc[0]["mean_auc"] == pytest.approx(0.75)
    assert tab.iloc[1]["modality"] == ""


def test_task_auc_table_seed_means_in_benchmark_order() -> None:
    tab = task_auc_table(_hand_summary())
    a = tab[tab["run_id"] == "A"]
    assert list(a["task"]) == ["pathmnist", "chestmnist"]  # TASKS order
    assert a["auc"].tolist() == pytest.approx([0.85, 0.65])
    assert (a["n_seeds"] == 2).all()


def test_bad_tables_raise_clearly() -> None:
    df = _hand_summary()
    with pytest.raises(ValueError, match="duplicate"):
        mean_auc_table(pd.concat([df, df.iloc[:1]]))
    with pytest.raises(ValueError, match="lacks column"):
        mean_auc_table(df.drop(columns="auc"))
    with pytest.raises(ValueError, match="unknown kind"):
        mean_auc_table(df.assign(kind="finetuned"))


# ----------------------------------------------------------------------------- slopes
def test_model_size_slopes_rows_and_exact_slopes() -> None:
    slopes = model_size_slopes(power_law_summary())
    assert list(slopes.columns) == ["kind", "method", "modality", "data_size", "task",
                                    "slope", "intercept", "r2", "n_points", "note"]
    # 2 methods x 2 data sizes + 1 random-init series, each with 3 tasks + "mean"; no raw pixels
    assert len(slopes) == 5 * 4
    assert set(slopes["kind"]) == {"pretrained", "random_init"}
    series = slopes[["kind", "method", "data_size"]].drop_duplicates().itertuples(index=False)
    assert [tuple(s) for s in series] == [("pretrained", "dino", 1000), ("pretrained", "dino", 4000),
                                          ("pretrained", "mae", 1000), ("pretrained", "mae", 4000),
                                          ("random_init", "random", 0)]
    assert list(slopes["task"][:4]) == ["mean", "pathmnist", "chestmnist", "dermamnist"]
    assert (slopes["n_points"] == 3).all()
    for method, b in SLOPE.items():
        got = slopes.loc[slopes["method"] == method, "slope"]
        assert got.to_numpy() == pytest.approx(b, abs=1e-9)
    assert slopes.loc[slopes["kind"] == "random_init", "slope"].to_numpy() == pytest.approx(RANDOM_SLOPE)
    # intercept on the AUC x 100 scale: ln(100 * c * D**g) for a task fit
    row = slopes[(slopes["method"] == "mae") & (slopes["data_size"] == 4000) & (slopes["task"] == "pathmnist")]
    expected = np.log(100 * TASK_C["pathmnist"] * 4000 ** DATA_SLOPE["mae"])
    assert row["intercept"].item() == pytest.approx(expected)


def test_model_size_slopes_other_x_column() -> None:
    slopes = model_size_slopes(power_law_summary(), x="params_paper")
    assert len(slopes) == 20 and slopes["slope"].notna().all()


def test_model_size_slopes_single_size_gives_note() -> None:
    slopes = model_size_slopes(power_law_summary(sizes={"pico": 1_000_000}))
    assert slopes["slope"].isna().all()
    assert slopes["note"].str.contains("needs >= 2 model sizes").all()


def test_data_size_slopes_rows_and_exact_slopes() -> None:
    slopes = data_size_slopes(power_law_summary())
    assert list(slopes.columns) == ["method", "model", "modality", "task",
                                    "slope", "intercept", "r2", "n_points", "note"]
    assert len(slopes) == 2 * 3 * 4  # methods x models x (3 tasks + mean); baselines excluded
    assert list(slopes["model"].drop_duplicates()) == ["pico", "nano", "micro"]  # by parameter count
    for method, g in DATA_SLOPE.items():
        got = slopes.loc[slopes["method"] == method, "slope"]
        assert got.to_numpy() == pytest.approx(g, abs=1e-9)
    assert (slopes["n_points"] == 2).all()
    single = data_size_slopes(power_law_summary(data=(4000,)))
    assert single["slope"].isna().all() and single["note"].str.contains("needs >= 2 data sizes").all()


def test_slopes_on_baselines_only_table_are_empty_not_errors() -> None:
    base = power_law_summary()
    base = base[base["kind"] != "pretrained"]
    assert data_size_slopes(base).empty
    assert set(model_size_slopes(base)["kind"]) == {"random_init"}
