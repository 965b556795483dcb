"""The paper's log-log fit: exact recovery on power-law data, degenerate inputs; the summary table's checks."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from biovfm.analysis.fits import loglog_fit, normalize_summary

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


# ----------------------------------------------------------------------------- table checks
def test_bad_tables_raise_clearly() -> None:
    df = power_law_summary()
    with pytest.raises(ValueError, match="duplicate"):
        normalize_summary(pd.concat([df, df.iloc[:1]]))
    with pytest.raises(ValueError, match="lacks column"):
        normalize_summary(df.drop(columns="auc"))
    with pytest.raises(ValueError, match="unknown kind"):
        normalize_summary(df.assign(kind="finetuned"))


def test_csv_roundtrip_keeps_baselines() -> None:
    """Empty model/modality strings become NaN through CSV; normalize_summary turns them back into ''."""
    df = pd.read_csv(io.StringIO(power_law_summary().to_csv(index=False)))
    out = normalize_summary(df)
    assert (out.loc[out["kind"] == "raw_pixels", "model"] == "").all()
