"""The analysis tables: points with intervals, fits along each axis, extrapolation check, data and compute views."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biovfm.analysis import scaling

B = 400
TASKS3 = ("pathmnist", "chestmnist", "dermamnist")
C = {"pathmnist": 0.70, "chestmnist": 0.55, "dermamnist": 0.62}
SIZES = {"femto": 2e5, "pico": 8e5, "nano": 3.2e6, "micro": 1.28e7}


def study(auc_fn, sizes=SIZES, data=(500, 4500), methods=("mae",), seeds=(0,), extra=()):
    """Summary rows + paired replicates (a shared test-set noise per task and resample, plus a little of each
    model's own) for pretrained grid points, random init per size and raw pixels."""
    rng = np.random.default_rng(0)
    shared = {t: rng.normal(0, 0.01, B) for t in TASKS3}
    rows, reps = [], {}

    def add(kind, method, model, modality, d, seed, n, f):
        rid = f"{kind}-{method}-{model}-{modality}-{d}-{seed}"
        for t in TASKS3:
            auc = f(t, n, d) + (0.002 * seed)
            rows.append(dict(run_id=rid, kind=kind, method=method, model=model, modality=modality, data_size=d,
                             seed=seed, task=t, auc=auc, acc=auc - 0.1, params_encoder=n, params_paper=n,
                             flops_per_image=6 * n, train_flops=6 * n * 1e4 if kind == "pretrained" else 0.0,
                             images_seen=1e4, train_steps=100 if kind == "pretrained" else 0, mlflow_run_id=rid))
            reps[(rid, t)] = (auc + shared[t] + rng.normal(0, 0.002, B), auc - 0.1 + shared[t])
    for method in methods:
        for model, n in sizes.items():
            for d in data:
                for s in seeds:
                    add("pretrained", method, model, "all", d, s, n, auc_fn)
    for method, model, modality, d in extra:
        add("pretrained", method, model, modality, d, 0, sizes[model], lambda t, n, d: auc_fn(t, n, d) - 0.01)
    for model, n in sizes.items():
        add("random_init", "random", model, "", 0, 0, n, lambda t, n, d: 0.9 * C[t] * n ** 0.003)
    add("raw_pixels", "raw", "", "", 0, 0, 0, lambda t, n, d: 0.6)
    return pd.DataFrame(rows), reps


def power(t, n, d):
    return C[t] * (n / 1e5) ** 0.01 * (d / 500) ** 0.004


def test_points_average_tasks_and_seeds_with_intervals() -> None:
    summary, reps = study(power, seeds=(0, 1))
    pts = scaling.build_points(summary, reps, n_boot=B)
    t = pts.table
    one = t[(t["kind"] == "pretrained") & (t["model"] == "pico") & (t["data_size"] == 500)]
    assert set(one["task"]) == {"mean", *TASKS3} and (one["n_seeds"] == 2).all()
    mean = one.set_index("task")["auc"]
    assert mean["mean"] == pytest.approx(np.mean([mean[x] for x in TASKS3]))
    assert (t["auc_lo"] <= t["auc"]).all() and (t["auc"] <= t["auc_hi"]).all()
    assert pts.reps.shape == (len(t), B)


def test_fit_table_recovers_exponents_with_intervals_and_selects_one_form() -> None:
    summary, reps = study(power)
    fits = scaling.fit_table(scaling.build_points(summary, reps, n_boot=B))
    ll = fits[(fits["axis"] == "params") & (fits["form"] == "loglog") & (fits["kind"] == "pretrained")]
    assert ll["slope"].to_numpy() == pytest.approx(0.01, abs=1e-9)
    assert ((ll["slope_lo"] <= 0.01) & (0.01 <= ll["slope_hi"])).all()
    data = fits[(fits["axis"] == "images") & (fits["form"] == "loglog")]
    assert data["slope"].to_numpy() == pytest.approx(0.004, abs=1e-9)
    assert "needs >= 3 distinct pretraining images" in data.merge(
        fits[(fits["axis"] == "images") & (fits["form"] == "saturating")], on=["method", "model", "task"])["note_y"].iloc[0]
    per = fits.groupby(["axis", "kind", "method", "model", "modality", "data_size", "task"], dropna=False)["selected"]
    assert (per.sum() == 1).all()  # exactly one form chosen per series and task
    assert {"compute"} <= set(fits["axis"])


def test_too_few_points_give_notes_not_errors() -> None:
    summary, reps = study(power, sizes={"pico": 8e5}, data=(500,))
    fits = scaling.fit_table(scaling.build_points(summary, reps, n_boot=B))
    mean = fits[(fits["task"] == "mean") & (fits["axis"] == "params") & (fits["kind"] == "pretrained")]
    assert mean["slope"].isna().all() and mean["note"].str.contains("needs >= 2 distinct encoder parameters").any()
    assert scaling.recommend(scaling.build_points(summary, reps, n_boot=B))["note"].str.contains("needs").all()


def test_extrapolation_check_flags_a_law_that_does_not_hold() -> None:
    sizes = {**SIZES, "milli": 5.12e7}
    holds = scaling.fit_table(scaling.build_points(*study(power, sizes=sizes), n_boot=B))

    def broken(t, n, d):  # the power law until the largest model, which collapses
        return power(t, n, d) - (0.08 if n > 2e7 else 0.0)

    fails = scaling.fit_table(scaling.build_points(*study(broken, sizes=sizes), n_boot=B))

    def flag(f):
        r = f[(f["axis"] == "params") & (f["task"] == "mean") & (f["form"] == "loglog") & (f["kind"] == "pretrained")]
        return r["extrap_holds"].tolist(), r["extrap_error"].tolist()

    ok, err_ok = flag(holds)
    bad, err_bad = flag(fails)
    assert all(ok) and np.abs(err_ok).max() < 1e-9
    assert not any(bad) and min(err_bad) > 0.07


def test_task_slopes_and_correlation_intervals() -> None:
    def by_task(t, n, d):
        return C[t] * (n / 1e5) ** {"pathmnist": 0.002, "chestmnist": 0.02, "dermamnist": 0.01}[t]

    summary, reps = study(by_task)
    pts = scaling.build_points(summary, reps, n_boot=B)
    slopes, slope_reps = scaling.task_slopes(scaling.fit_table(pts), pts)
    s = slopes.set_index("task")["slope"]
    assert s["chestmnist"] > s["dermamnist"] > s["pathmnist"]
    stats = pd.DataFrame({"task": list(TASKS3), "dbi": [1.0, 3.0, 2.0]})  # ordered like the slopes
    ci = scaling.correlation_intervals(slopes, slope_reps, stats, ("dbi",))
    assert ci["r_lo"].iloc[0] > 0.5 and ci["r_hi"].iloc[0] <= 1.0 + 1e-9


def test_data_comparison_frontier_and_recommendation() -> None:
    summary, reps = study(power, methods=("mae", "dino"), extra=[("mae", "nano", "xray", 500)])
    pts = scaling.build_points(summary, reps, n_boot=B)
    cmp_ = scaling.data_comparison(pts, {"all": ["ct", "xray"], "xray": ["xray"]})
    nano = cmp_[(cmp_["method"] == "mae") & (cmp_["model"] == "nano")]
    assert nano["corpus"].tolist() == ["xray n=500 (single modality)", "all n=500 (mixed)", "all n=4500 (mixed)"]
    front = scaling.compute_frontier(pts)
    mae = front[front["method"] == "mae"]
    assert mae["frontier"].any() and mae.loc[mae["frontier"], "auc"].is_monotonic_increasing
    rec = scaling.recommend(pts)
    grid = rec[rec["budget"].str.contains("grid")]
    assert (grid["nearest_grid_model"].tolist()[:4] == list(SIZES)) and (grid["data_size"] == 4500).all()
    big = rec[rec["budget"].str.contains("16x")]
    assert big["extrapolated"].all() and (big["pred_auc"] > grid.groupby("method")["pred_auc"].max().reindex(big["method"]).to_numpy()).all()
