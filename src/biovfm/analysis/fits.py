"""The paper's log-log fit and the tidy summary table's conventions (one row per evaluated model x seed x task).

Pure numpy/pandas so the aggregate stage and the tests can run without torch or a display.

Conventions (paper section 7.6):

* AUC is reported and fitted on the 0-100 scale: every fit below is OLS of ``ln(AUC x 100)`` on
  ``ln(x)``. The slope (scaling exponent) does not depend on that scale; the intercept does.
* ``x`` is used as stored in the table (encoder parameters as a raw count, pretraining images as a
  count), so the intercept is ``ln`` of the fitted AUC x 100 at one parameter / one image.
* Seeds are averaged before any fit, and task means are unweighted means over the tasks
  (:mod:`biovfm.analysis.scaling` builds those points and their bootstrap intervals).

A grid point (one "evaluated model") is identified by its descriptors ``kind, method, model,
modality, data_size`` (plus size and step counts), so the code works whether ``run_id`` names a
grid point shared by its seeds or is distinct per seed.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from biovfm.data.medmnist import TASKS

AUC_SCALE = 100.0
KINDS = ("pretrained", "random_init", "raw_pixels", "external")
STR_COLUMNS = ("run_id", "kind", "method", "model", "modality", "task")
GRID_KEYS = ("kind", "method", "model", "modality", "data_size")
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


def task_order(tasks: Iterable[str]) -> list[str]:
    """Benchmark order of TASKS first, unknown flags after (alphabetically)."""
    present = set(tasks)
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))
