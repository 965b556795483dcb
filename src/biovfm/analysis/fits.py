"""Scaling fits on the tidy summary table (one row per evaluated model x seed x task).

Pure numpy/pandas so the aggregate stage and the tests can run without torch or a display.

Conventions (paper section 7.6):

* AUC is reported and fitted on the 0-100 scale: every fit below is OLS of ``ln(AUC x 100)`` on
  ``ln(x)``. The slope (scaling exponent) does not depend on that scale; the intercept does.
* ``x`` is used as stored in the table (encoder parameters as a raw count, pretraining images as a
  count), so the intercept is ``ln`` of the fitted AUC x 100 at one parameter / one image.
* Seeds are averaged before any fit; their spread is kept as ``*_std`` columns (sample std, ddof=1;
  NaN for a single seed).
* Task means are unweighted means over the tasks present for that model (``n_tasks`` says how many).

A grid point (one "evaluated model") is identified by its descriptors ``kind, method, model,
modality, data_size`` (plus ``params_encoder`` and ``train_steps`` when present), so the code works
whether ``run_id`` names a grid point shared by its seeds or is distinct per seed.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from biovfm.data.medmnist import TASKS

AUC_SCALE = 100.0
KINDS = ("pretrained", "random_init", "raw_pixels")
STR_COLUMNS = ("run_id", "kind", "method", "model", "modality", "task")
GRID_KEYS = ("kind", "method", "model", "modality", "data_size")
# Constant within a grid point; added to the grouping key when present so distinct setups never merge.
GRID_KEYS_OPTIONAL = ("params_encoder", "train_steps")
# Also constant within a grid point; carried along (first value) when present.
CARRIED = ("params_paper", "flops_per_image", "images_seen")
SIZE_SERIES_KEYS = ("kind", "method", "modality", "data_size")
DATA_SERIES_KEYS = ("method", "model", "modality")
FIT_COLUMNS = ("slope", "intercept", "r2", "n_points", "note")
MEAN_TASK = "mean"


def loglog_fit(x: Iterable[float], y: Iterable[float], x_name: str = "model sizes") -> dict:
    """OLS of ``ln(y)`` on ``ln(x)``: the paper's power-law fit ``y = exp(intercept) * x**slope``.

    Callers in this package pass ``y`` = AUC x 100 (the paper's scale; the slope is scale-invariant,
    the intercept is not). Pairs with a non-finite or non-positive value cannot be logged and are
    dropped (said in ``note``). With fewer than 2 distinct ``x`` the fit is undefined: NaNs and
    ``note = "needs >= 2 <x_name>"`` are returned instead of raising, so a one-size grid still
    aggregates. ``r2`` is NaN when ``y`` is constant (slope 0, nothing to explain).

    Returns ``dict(slope, intercept, r2, n_points, note)``; ``n_points`` counts the pairs used.
    """
    xa = np.asarray(x if hasattr(x, "__len__") else list(x), dtype=float).ravel()
    ya = np.asarray(y if hasattr(y, "__len__") else list(y), dtype=float).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in length: {xa.size} vs {ya.size}")
    ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    notes = []
    if (~ok).any():
        notes.append(f"dropped {int((~ok).sum())} non-positive/non-finite point(s)")
    lx, ly = np.log(xa[ok]), np.log(ya[ok])
    n = int(lx.size)
    nan = float("nan")
    if np.unique(lx).size < 2:
        notes.insert(0, f"needs >= 2 {x_name}")
        return dict(slope=nan, intercept=nan, r2=nan, n_points=n, note="; ".join(notes))
    dx, dy = lx - lx.mean(), ly - ly.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    intercept = float(ly.mean() - slope * lx.mean())
    ss_res = float(((ly - (intercept + slope * lx)) ** 2).sum())
    ss_tot = float((dy * dy).sum())
    if ss_tot <= 0.0:
        r2 = nan
        notes.append("constant y: r2 undefined")
    else:
        r2 = 1.0 - ss_res / ss_tot
    if np.unique(lx).size == 2:
        notes.append(f"only 2 {x_name}: exact fit, r2 trivial")
    return dict(slope=slope, intercept=intercept, r2=r2, n_points=n, note="; ".join(notes))


def normalize_summary(summary: pd.DataFrame, required: Iterable[str] = ()) -> pd.DataFrame:
    """Copy of ``summary`` with string columns made plain ``str``.

    A CSV round trip turns the baselines' empty ``model``/``modality`` into NaN, and pandas' groupby
    silently drops NaN keys, which would lose the baselines. Duplicate (run_id, seed, task) rows
    would be double-counted in task means, so they are an error.
    """
    need = {"run_id", "kind", "method", "model", "modality", "data_size", "seed", "task", "auc", *required}
    missing = sorted(need - set(summary.columns))
    if missing:
        raise ValueError(f"summary table lacks column(s) {missing}; has {list(summary.columns)}")
    df = summary.copy()
    for col in STR_COLUMNS:
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str)
    bad_kind = sorted(set(df["kind"]) - set(KINDS))
    if bad_kind:
        raise ValueError(f"unknown kind(s) {bad_kind}; expected one of {KINDS}")
    dup = df.duplicated(["run_id", "seed", "task"], keep=False)
    if dup.any():
        first = df.loc[dup, ["run_id", "seed", "task"]].iloc[0].tolist()
        raise ValueError(f"{int(dup.sum())} duplicate (run_id, seed, task) rows, e.g. {first}")
    return df


def _grid_keys(df: pd.DataFrame) -> list[str]:
    return list(GRID_KEYS) + [c for c in GRID_KEYS_OPTIONAL if c in df.columns]


def task_order(tasks: Iterable[str]) -> list[str]:
    """Benchmark order of TASKS first, unknown flags after (alphabetically)."""
    present = set(tasks)
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _sort_grid(df: pd.DataFrame) -> pd.DataFrame:
    kind_rank = df["kind"].map({k: i for i, k in enumerate(KINDS)})
    by = ["_kind", "method", "modality", "data_size"] + (["params_encoder"] if "params_encoder" in df else []) + ["model"]
    return df.assign(_kind=kind_rank).sort_values(by, kind="stable").drop(columns="_kind").reset_index(drop=True)


def _seed_stats(df: pd.DataFrame, keys: list[str], value_cols: dict[str, str]) -> pd.DataFrame:
    """Mean and sample std over seeds of per-seed values (``value_cols``: source -> output name)."""
    agg: dict[str, tuple[str, str]] = {"n_seeds": ("seed", "nunique")}
    for src, out in value_cols.items():
        agg[out] = (src, "mean")
        agg[f"{out}_std"] = (src, "std")  # ddof=1: NaN for a single seed
    return df.groupby(keys, sort=False, dropna=False).agg(**agg).reset_index()


def _carried(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per grid point: joined run_ids, the seeds, and the first value of the carried descriptors."""
    extra = {c: (c, "first") for c in CARRIED if c in df.columns}
    out = df.groupby(keys, sort=False, dropna=False).agg(
        run_id=("run_id", lambda s: ",".join(sorted(set(s)))),
        seeds=("seed", lambda s: ",".join(str(v) for v in sorted(set(s)))),
        **extra,
    )
    return out.reset_index()


def mean_auc_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated model: unweighted mean AUC and ACC over its tasks, averaged over seeds.

    Columns: run_id (comma-joined if seeds have distinct ids), the grid descriptors, seeds, n_seeds,
    n_tasks (fewest tasks of any seed), mean_auc, mean_auc_std, mean_acc, mean_acc_std (0-1 scale;
    std over seeds, NaN for one seed). ACC columns are NaN if the table has no ``acc``.
    """
    df = normalize_summary(summary)
    if "acc" not in df.columns:
        df["acc"] = np.nan
    keys = _grid_keys(df)
    per_seed = (
        df.groupby(keys + ["seed"], sort=False, dropna=False)
        .agg(auc=("auc", "mean"), acc=("acc", "mean"), n_tasks=("task", "nunique"))
        .reset_index()
    )
    stats = _seed_stats(per_seed, keys, {"auc": "mean_auc", "acc": "mean_acc"})
    n_tasks = per_seed.groupby(keys, sort=False, dropna=False)["n_tasks"].min().reset_index()
    out = _carried(df, keys).merge(stats, on=keys).merge(n_tasks, on=keys)
    front = ["run_id", *GRID_KEYS, *[c for c in (*GRID_KEYS_OPTIONAL, *CARRIED) if c in out]]
    cols = front + ["seeds", "n_seeds", "n_tasks", "mean_auc", "mean_auc_std", "mean_acc", "mean_acc_std"]
    return _sort_grid(out[cols])


def task_auc_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated model x task: AUC and ACC averaged over seeds, with their std over seeds.

    Columns: the grid descriptors, run_id, seeds, task, n_seeds, auc, auc_std, acc, acc_std (0-1 scale).
    """
    df = normalize_summary(summary)
    if "acc" not in df.columns:
        df["acc"] = np.nan
    keys = _grid_keys(df)
    stats = _seed_stats(df, keys + ["task"], {"auc": "auc", "acc": "acc"})
    out = _carried(df, keys).merge(stats, on=keys)
    order = {t: i for i, t in enumerate(task_order(out["task"]))}
    out = out.assign(_t=out["task"].map(order)).sort_values("_t", kind="stable").drop(columns="_t")
    return _sort_grid(out)


def _fit_rows(table: pd.DataFrame, series: list[str], x: str, y: str, x_name: str) -> list[dict]:
    rows = []
    for key, g in table.groupby(series, sort=False, dropna=False):
        fit = loglog_fit(g[x].to_numpy(float), AUC_SCALE * g[y].to_numpy(float), x_name=x_name)
        rows.append({**dict(zip(series, key)), **fit})
    return rows


def _slopes_frame(rows: list[dict], series: list[str], order_table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered like the grid (series), then 'mean' first and tasks in benchmark order."""
    cols = series + ["task", *FIT_COLUMNS]
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)[cols]
    series_rank = {k: i for i, k in enumerate(dict.fromkeys(map(tuple, order_table[series].to_numpy().tolist())))}
    task_rank = {t: i for i, t in enumerate([MEAN_TASK] + task_order(set(out["task"]) - {MEAN_TASK}))}
    out["_s"] = [series_rank.get(tuple(r), len(series_rank)) for r in out[series].to_numpy().tolist()]
    out["_t"] = out["task"].map(task_rank)
    out = out.sort_values(["_s", "_t"], kind="stable").drop(columns=["_s", "_t"]).reset_index(drop=True)
    out["n_points"] = out["n_points"].astype(int)
    return out


def model_size_slopes(summary: pd.DataFrame, x: str = "params_encoder") -> pd.DataFrame:
    """Log-log slope of AUC x 100 vs model size, per (kind, method, modality, data_size) series.

    One row per series and task, plus task ``"mean"`` (the mean-AUC fit of the paper's Figure A).
    Random-init series are included so a pretrained exponent can be read against the exponent the
    bare architecture already gives; raw pixels have no model size and are left out. Seeds are
    averaged first, so every model size is one point.

    Columns: kind, method, modality, data_size, task, slope, intercept, r2, n_points, note.
    """
    df = normalize_summary(summary, required=[x])
    df = df[df["kind"].isin(("pretrained", "random_init"))]
    series = list(SIZE_SERIES_KEYS)
    if df.empty:
        return _slopes_frame([], series, df)
    means = mean_auc_table(df)
    tasks = task_auc_table(df)
    # x must be a column of the aggregated tables; carry it from the summary if it is not a grid key.
    if x not in means.columns:
        xs = df.groupby(_grid_keys(df), dropna=False)[x].first().reset_index()
        means = means.merge(xs, on=_grid_keys(df))
        tasks = tasks.merge(xs, on=_grid_keys(df))
    rows = _fit_rows(means.assign(task=MEAN_TASK), series + ["task"], x, "mean_auc", "model sizes")
    rows += _fit_rows(tasks, series + ["task"], x, "auc", "model sizes")
    return _slopes_frame(rows, series, means)


def data_size_slopes(summary: pd.DataFrame) -> pd.DataFrame:
    """Log-log slope of AUC x 100 vs pretraining images, per pretrained (method, model, modality) series.

    One row per series and task, plus task ``"mean"`` (mean AUC over tasks). Baselines have no
    pretraining data and are left out. Note the grid trains for a fixed number of steps, so a larger
    corpus means fewer repeats of each image, not more compute.

    Columns: method, model, modality, task, slope, intercept, r2, n_points, note.
    """
    df = normalize_summary(summary)
    df = df[df["kind"] == "pretrained"]
    series = list(DATA_SERIES_KEYS)
    if df.empty:
        return _slopes_frame([], series, df)
    means = mean_auc_table(df)
    tasks = task_auc_table(df)
    rows = _fit_rows(means.assign(task=MEAN_TASK), series + ["task"], "data_size", "mean_auc", "data sizes")
    rows += _fit_rows(tasks, series + ["task"], "data_size", "auc", "data sizes")
    return _slopes_frame(rows, series, means)
