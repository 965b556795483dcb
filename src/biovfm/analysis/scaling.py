"""The scaling analysis proper: points with bootstrap intervals, fits along each axis, the extrapolation
check, per-task slopes, the data comparison and the compute view. Tables in, tables out.

``points`` has one row per grid point x task (plus task ``"mean"``, the unweighted mean over tasks) with
the seed-averaged AUC/ACC and their 95% bootstrap intervals; ``reps`` holds the matching AUC replicates
(rows aligned with ``points``), paired across models because every model of a task shares its resamples.
Fit intervals come from refitting each replicate, so they carry the test-set (and seed) uncertainty.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from biovfm.analysis import laws
from biovfm.analysis.bootstrap import N_BOOT, percentile_ci, seed_resampled_mean
from biovfm.analysis.fits import GRID_KEYS, MEAN_TASK, normalize_summary, task_order

AXES = {  # axis -> (x column, series keys, kinds fitted)
    "params": ("params_encoder", ("kind", "method", "modality", "data_size"), ("pretrained", "random_init")),
    # the paper's x: the MAE pretraining model's parameters, decoder included (31.2/47.4/111.66/329.24 M for T/S/B/L)
    "params_paper": ("params_paper", ("kind", "method", "modality", "data_size"), ("pretrained", "random_init")),
    "images": ("data_size", ("kind", "method", "model", "modality"), ("pretrained",)),
    "compute": ("train_flops", ("kind", "method", "modality", "data_size"), ("pretrained",)),
}
PARAM_AXES = ("params", "params_paper")
AXIS_LABELS = {"params": "encoder parameters", "params_paper": "parameters as the paper counts them", "images": "pretraining images", "compute": "training FLOPs"}
POINT_KEYS = (*GRID_KEYS, "params_encoder", "params_paper", "train_flops", "train_steps")
FIT_PARAMS = {laws.LOGLOG: ("slope", "intercept"), laws.SATURATING: ("a", "b", "c")}


@dataclass
class Points:
    table: pd.DataFrame  # one row per grid point x task
    reps: np.ndarray  # AUC bootstrap replicates, len(table) x n_boot (NaN rows where no scores were found)

    def select(self, mask: np.ndarray | pd.Series) -> "Points":
        m = np.asarray(mask, dtype=bool)
        return Points(self.table[m].reset_index(drop=True), self.reps[m])


# ----------------------------------------------------------------------------- points
def build_points(summary: pd.DataFrame, replicates: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
                 n_boot: int = N_BOOT) -> Points:
    """Seed-averaged AUC/ACC per grid point x task (and the task mean) with percentile intervals.

    ``replicates[(mlflow_run_id, task)] = (auc_reps, acc_reps)`` from :mod:`biovfm.analysis.bootstrap`.
    With several seeds, each replicate also resamples the seeds.
    """
    df = normalize_summary(summary)
    for col in POINT_KEYS:
        if col not in df.columns:
            df[col] = 0
    nan = np.full(n_boot, np.nan)
    for k, (a, _) in replicates.items():
        if len(a) != n_boot:
            raise ValueError(f"replicates of {k} have {len(a)} resamples, expected n_boot={n_boot}")
    rows, auc_reps = [], []
    for key, g in df.groupby(list(POINT_KEYS), sort=False, dropna=False):
        base = dict(zip(POINT_KEYS, key))
        seeds = sorted(g["seed"].unique())
        tasks = task_order(g["task"])
        per_seed_auc = {t: [] for t in tasks}
        per_seed_acc = {t: [] for t in tasks}
        for s in seeds:
            gs = g[g["seed"] == s].set_index("task")
            for t in tasks:
                a, c = replicates.get((gs.loc[t, "mlflow_run_id"], t), (nan, nan)) if t in gs.index else (nan, nan)
                per_seed_auc[t].append(a)
                per_seed_acc[t].append(c)
        gid = "|".join(map(str, key))
        for t in [MEAN_TASK, *tasks]:
            if t == MEAN_TASK:
                point_auc = g.groupby("seed")["auc"].mean().mean()
                point_acc = g.groupby("seed")["acc"].mean().mean()
                ra = np.mean([np.stack(per_seed_auc[u]) for u in tasks], axis=0)
                rc = np.mean([np.stack(per_seed_acc[u]) for u in tasks], axis=0)
            else:
                point_auc, point_acc = g.loc[g["task"] == t, "auc"].mean(), g.loc[g["task"] == t, "acc"].mean()
                ra, rc = np.stack(per_seed_auc[t]), np.stack(per_seed_acc[t])
            ra = seed_resampled_mean(ra, n_boot, f"{gid}|{t}")
            rc = seed_resampled_mean(rc, n_boot, f"{gid}|{t}")
            (alo, ahi), (clo, chi) = percentile_ci(ra), percentile_ci(rc)
            rows.append({**base, "task": t, "n_seeds": len(seeds), "auc": point_auc, "auc_lo": alo, "auc_hi": ahi,
                         "acc": point_acc, "acc_lo": clo, "acc_hi": chi})
            auc_reps.append(ra)
    table = pd.DataFrame(rows)
    return Points(table, np.array(auc_reps).reshape(len(table), n_boot))


# ----------------------------------------------------------------------------- fits
def _series(points: Points, axis: str):
    """(series descriptor, task, x, Points of that series sorted by x) for every fittable series."""
    xcol, keys, kinds = AXES[axis]
    tab = points.table
    ok = tab["kind"].isin(kinds) & (tab[xcol] > 0)
    sub = points.select(ok)
    for key, idx in sub.table.groupby([*keys, "task"], sort=False, dropna=False).groups.items():
        idx = np.asarray(sorted(idx, key=lambda i: sub.table.at[i, xcol]))
        desc = dict(zip([*keys, "task"], key))
        part = Points(sub.table.loc[idx].reset_index(drop=True), sub.reps[idx])
        # several points at one x (e.g. compute shared by two data sizes) are averaged
        g = part.table.assign(_r=range(len(idx))).groupby(xcol, sort=True)
        xs = np.array(list(g.groups), dtype=float)
        auc = g["auc"].mean().to_numpy(float)
        reps = np.stack([part.reps[list(r)].mean(axis=0) for r in g["_r"].apply(list)])
        yield desc, xs, auc, reps


def _ci(v: np.ndarray) -> tuple[float, float]:
    lo, hi = percentile_ci(np.asarray(v, dtype=float))
    return float(lo), float(hi)


def _fit_row(form: str, x: np.ndarray, auc: np.ndarray, reps: np.ndarray, axis: str) -> dict:
    row: dict = {"form": form, "n_points": int(len(x))}
    if not laws.enough_points(form, x):
        row["note"] = f"needs >= {laws.MIN_POINTS[form]} distinct {AXIS_LABELS[axis]} (has {len(x)})"
        return row
    p = laws.fit(form, x, auc)
    have_reps = np.isfinite(reps).all(axis=1).any()
    rp = laws.fit_replicates(form, x, reps.T) if have_reps else None
    for name in FIT_PARAMS[form]:
        row[name] = p[name]
        if rp is not None:
            row[f"{name}_lo"], row[f"{name}_hi"] = _ci(rp[name])
    if form == laws.SATURATING:
        row["x_ref"] = p["x_ref"]
    row["r2"] = laws.r2(form, p, x, auc)
    row["loo_rmse"] = laws.loo_rmse(form, x, auc)
    notes = []
    if len(x) == laws.MIN_POINTS[form]:
        notes.append(f"{len(x)} points: exact fit, no residual degrees of freedom")
    row.update(_extrapolation(form, x, auc, reps, axis, notes))
    row["note"] = "; ".join(notes)
    return row


def _extrapolation(form: str, x: np.ndarray, auc: np.ndarray, reps: np.ndarray, axis: str, notes: list[str]) -> dict:
    """Fit without the largest x, predict it; the paired difference's interval says whether the law held."""
    if not laws.enough_points(form, x[:-1]):
        notes.append(f"extrapolation check needs >= {laws.MIN_POINTS[form] + 1} distinct {AXIS_LABELS[axis]}")
        return {}
    p = laws.fit(form, x[:-1], auc[:-1])
    out = {"x_largest": float(x[-1]), "pred_largest": float(laws.predict(form, p, x[-1:])[0]),
           "obs_largest": float(auc[-1])}
    out["extrap_error"] = out["pred_largest"] - out["obs_largest"]
    if np.isfinite(reps).all(axis=1).any():
        pr = laws.predict_replicates(form, laws.fit_replicates(form, x[:-1], reps[:-1].T), x[-1])
        out["pred_lo"], out["pred_hi"] = _ci(pr)
        out["obs_lo"], out["obs_hi"] = _ci(reps[-1])
        out["extrap_lo"], out["extrap_hi"] = _ci(pr - reps[-1])
        out["extrap_holds"] = bool(out["extrap_lo"] <= 0.0 <= out["extrap_hi"])
    return out


FIT_COLUMNS = ["axis", "kind", "method", "model", "modality", "data_size", "task", "form", "selected", "n_points",
               "slope", "slope_lo", "slope_hi", "intercept", "intercept_lo", "intercept_hi",
               "a", "a_lo", "a_hi", "b", "b_lo", "b_hi", "c", "c_lo", "c_hi", "x_ref", "r2", "loo_rmse",
               "x_largest", "pred_largest", "pred_lo", "pred_hi", "obs_largest", "obs_lo", "obs_hi",
               "extrap_error", "extrap_lo", "extrap_hi", "extrap_holds", "note"]


def fit_table(points: Points, axes: tuple[str, ...] = tuple(AXES)) -> pd.DataFrame:
    """One row per axis x series x task x form, with the selected form per series and task.

    Selection: the lower leave-one-out RMSE; when neither form can be cross-validated the paper's
    log-log form is kept and the note says so. Columns: :data:`FIT_COLUMNS` (the axis' own variable is
    blank in its series columns).
    """
    rows = []
    for axis in axes:
        for desc, x, auc, reps in _series(points, axis):
            forms = [{"axis": axis, **desc, **_fit_row(form, x, auc, reps, axis)} for form in laws.FORMS]
            loo = [f.get("loo_rmse", np.nan) for f in forms]
            if np.isfinite(loo).any():
                pick = int(np.nanargmin(loo))
            else:
                pick = 0
                forms[0]["note"] = "; ".join(filter(None, [forms[0].get("note", ""),
                                                           "form not selected by held-out error (too few points)"]))
            for i, f in enumerate(forms):
                f["selected"] = bool(i == pick and FIT_PARAMS[f["form"]][0] in f)
            rows += forms
    out = pd.DataFrame(rows).reindex(columns=FIT_COLUMNS)
    order = {t: i for i, t in enumerate([MEAN_TASK, *task_order(set(out["task"].dropna()) - {MEAN_TASK})])}
    out["_t"] = out["task"].map(order)
    out = out.sort_values(["axis", "kind", "method", "modality", "_t"], kind="stable").drop(columns="_t")
    return out.reset_index(drop=True)


def main_series(points: Points) -> pd.DataFrame:
    """Per method: the series the headline figures use (the most common modality, the largest data size)."""
    pre = points.table[(points.table["kind"] == "pretrained") & (points.table["task"] == MEAN_TASK)]
    rows = []
    for method, g in pre.groupby("method", sort=True):
        mod = g["modality"].value_counts().sort_index().idxmax()
        rows.append({"method": method, "modality": mod, "data_size": int(g.loc[g["modality"] == mod, "data_size"].max())})
    return pd.DataFrame(rows, columns=["method", "modality", "data_size"])


def task_slopes(fits: pd.DataFrame, points: Points) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Per method (main series): the log-log slope vs parameters of every task with its interval (Figures C/D),
    and the slope replicates per method (tasks x B) for correlation intervals (Figure F)."""
    main = main_series(points)
    rows, reps = [], {}
    for _, m in main.iterrows():
        sel = fits[(fits["axis"] == "params") & (fits["kind"] == "pretrained") & (fits["method"] == m["method"])
                   & (fits["modality"] == m["modality"]) & (fits["data_size"] == m["data_size"])
                   & (fits["form"] == laws.LOGLOG) & (fits["task"] != MEAN_TASK)]
        rows.append(sel[["method", "modality", "data_size", "task", "slope", "slope_lo", "slope_hi", "n_points", "note"]])
        tab = points.table
        series = ((tab["kind"] == "pretrained") & (tab["method"] == m["method"]) & (tab["modality"] == m["modality"])
                  & (tab["data_size"] == m["data_size"]))
        per_task = []
        for t in sel["task"]:
            s = points.select(series & (tab["task"] == t))
            order = np.argsort(s.table["params_encoder"].to_numpy(float))
            if len(order) >= 2 and np.isfinite(s.reps).all():
                per_task.append(laws.loglog_replicates(s.table["params_encoder"].to_numpy(float)[order], s.reps[order].T)[0])
            else:
                per_task.append(np.full(points.reps.shape[1], np.nan))
        reps[m["method"]] = np.array(per_task).reshape(len(sel), points.reps.shape[1])
    cols = ["method", "modality", "data_size", "task", "slope", "slope_lo", "slope_hi", "n_points", "note"]
    return (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)), reps


def correlation_intervals(slopes: pd.DataFrame, slope_reps: dict[str, np.ndarray], stats: pd.DataFrame,
                          factors: tuple[str, ...]) -> pd.DataFrame:
    """Bootstrap interval of Pearson r(per-task slope, factor): r recomputed on each slope replicate."""
    rows = []
    for method, g in slopes.groupby("method", sort=True):
        merged = g.reset_index(drop=True).merge(stats, on="task", how="left")
        reps = slope_reps.get(method)
        for f in factors:
            if f not in merged:
                continue
            v = merged[f].to_numpy(float)
            lo = hi = np.nan
            if reps is not None and len(v) >= 3 and np.nanstd(v) > 0 and np.isfinite(reps).all():
                vc = (v - v.mean()) / v.std()
                rc = reps - reps.mean(axis=0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = (vc @ rc) / (len(v) * rc.std(axis=0))
                lo, hi = _ci(r)
            rows.append({"method": method, "factor": f, "r_lo": lo, "r_hi": hi})
    return pd.DataFrame(rows, columns=["method", "factor", "r_lo", "r_hi"])


# ----------------------------------------------------------------------------- data comparison (Figure E)
def data_comparison(points: Points, mixes: dict[str, list[str]]) -> pd.DataFrame:
    """Mean AUC of every pretraining corpus a (method, model) saw: single modality, size-matched mixes, full.

    Only (method, model) pairs pretrained on more than one corpus appear. ``mixes`` is params' ``modalities``
    (grid name -> corpus modalities), which says whether a corpus is a single modality or a mix.
    """
    tab = points.table
    pre = tab[(tab["kind"] == "pretrained") & (tab["task"] == MEAN_TASK)].copy()
    if pre.empty:
        return pd.DataFrame(columns=["method", "model", "modality", "data_size", "corpus", "auc", "auc_lo", "auc_hi"])
    pre["n_mod"] = pre["modality"].map(lambda m: len(mixes.get(m, [m])))
    rows = []
    for (method, model), g in pre.groupby(["method", "model"], sort=True):
        if len(g) < 2 or g["modality"].nunique() < 2 and g["data_size"].nunique() < 2:
            continue
        g = g.sort_values(["n_mod", "data_size"])
        for _, r in g.iterrows():
            kind = "single modality" if r["n_mod"] == 1 else "mixed"
            rows.append({"method": method, "model": model, "modality": r["modality"], "data_size": int(r["data_size"]),
                         "corpus": f"{r['modality']} n={int(r['data_size'])} ({kind})", "auc": r["auc"],
                         "auc_lo": r["auc_lo"], "auc_hi": r["auc_hi"]})
    return pd.DataFrame(rows, columns=["method", "model", "modality", "data_size", "corpus", "auc", "auc_lo", "auc_hi"])


# ----------------------------------------------------------------------------- compute view
def compute_frontier(points: Points) -> pd.DataFrame:
    """Pretrained grid points (task mean) by training FLOPs; ``frontier`` marks those no cheaper run beats."""
    tab = points.table
    pre = tab[(tab["kind"] == "pretrained") & (tab["task"] == MEAN_TASK) & (tab["train_flops"] > 0)]
    cols = ["method", "model", "modality", "data_size", "params_encoder", "train_flops", "auc", "auc_lo", "auc_hi"]
    out = []
    for method, g in pre.groupby("method", sort=True):
        g = g.sort_values(["train_flops", "auc"], ascending=[True, False])[cols].copy()
        best = -np.inf
        flags = []
        for a in g["auc"]:
            flags.append(bool(a > best))
            best = max(best, a)
        g["frontier"] = flags
        out.append(g)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=[*cols, "frontier"])


def recommend(points: Points, budgets_x: tuple[float, ...] = (1.0, 4.0, 16.0)) -> pd.DataFrame:
    """For compute budgets (multiples of the largest run's training FLOPs, and each grid model's own cost):
    the model size and data size the fitted laws recommend, with the predicted mean AUC.

    Law: ``1 - AUC = e + A N^-alpha + B D^-beta`` over the method's pretrained points (N encoder
    parameters, D pretraining images), and compute ``C(N)`` from a log-log fit of the measured training
    FLOPs against N. The grid trains a fixed number of steps, so D does not change the compute: the data
    term only says whether a larger pool pays (the largest grid size is recommended when beta > 0).
    """
    tab = points.table
    pre = tab[(tab["kind"] == "pretrained") & (tab["task"] == MEAN_TASK) & (tab["train_flops"] > 0)]
    rows = []
    for method, g in pre.groupby("method", sort=True):
        n, d, c, auc = (g[k].to_numpy(float) for k in ("params_encoder", "data_size", "train_flops", "auc"))
        base = {"method": method}
        if np.unique(n).size < 2 or len(g) < 5 or np.unique(d).size < 2:
            rows.append({**base, "note": "needs >= 2 model sizes, >= 2 data sizes and >= 5 points for the joint law"})
            continue
        law = laws.joint_fit(n, d, auc)
        cf = np.polyfit(np.log(n), np.log(c), 1)  # ln C = k ln N + m
        n_of_c = lambda budget: float(np.exp((np.log(budget) - cf[1]) / cf[0]))  # noqa: E731
        d_best = float(d.max()) if law["B"] > 0 else float(d.min())
        models = g.drop_duplicates("params_encoder").sort_values("params_encoder")
        budgets = [(f"{r['model']} (grid)", float(g.loc[g["model"] == r["model"], "train_flops"].mean()),
                    float(r["params_encoder"])) for _, r in models.iterrows()]  # measured cost, exact size
        budgets += [(f"{x:g}x largest run", x * float(c.max()), None) for x in budgets_x if x > 1]
        for label, budget, n_grid in budgets:
            n_star = n_grid if n_grid is not None else n_of_c(budget)
            near = models.iloc[int(np.argmin(np.abs(np.log(models["params_encoder"].to_numpy(float) / n_star))))]
            rows.append({**base, "budget": label, "train_flops": budget, "params_encoder": n_star,
                         "nearest_grid_model": near["model"], "data_size": d_best,
                         "pred_auc": float(laws.joint_predict(law, n_star, d_best)),
                         "extrapolated": bool(n_star > n.max() * 1.01),
                         "law": (f"1-AUC = {law['e']:.4f} + {law['A']:.4f}(N/{law['N0']:.3g})^-{law['alpha']:.3f}"
                                 f" + {law['B']:.4f}(D/{law['D0']:.3g})^-{law['beta']:.3f}"),
                         "note": ""})
    cols = ["method", "budget", "train_flops", "params_encoder", "nearest_grid_model", "data_size", "pred_auc",
            "extrapolated", "law", "note"]
    return pd.DataFrame(rows).reindex(columns=cols)
