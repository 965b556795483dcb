"""The study's estimators side by side: the probe-fidelity check (the paper's head against the converged
reference), label efficiency (the primary probe on 1/10/100% of the training labels) and kNN.

Every model, task and estimator shares the test-set resamples of its task (:mod:`biovfm.analysis.bootstrap`),
so a difference between two estimators, or between a pretrained encoder and its random-init twin, is computed
replicate by replicate: its interval is a paired bootstrap interval.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from biovfm.analysis.bootstrap import percentile_ci
from biovfm.analysis.fits import MEAN_TASK, task_order
from biovfm.analysis.scaling import POINT_KEYS, Points

MODEL_KEYS = ("kind", "method", "model", "modality", "data_size")
FIDELITY_COLUMNS = [*MODEL_KEYS, "task", "paper", "reference", "diff", "diff_lo", "diff_hi"]
FIDELITY_SUMMARY_COLUMNS = ["task", "n_models", "paper", "reference", "diff", "diff_lo", "diff_hi", "n_lower",
                            "max_abs_diff"]
LABEL_COLUMNS = [*MODEL_KEYS, "params_encoder", "probe", "label_fraction", "auc", "auc_lo", "auc_hi", "gain_vs_random", "gain_lo",
                 "gain_hi", "gain_vs_raw", "raw_lo", "raw_hi"]


def paired(a: Points, b: Points, keys: tuple[str, ...] = (*POINT_KEYS, "task")) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows present in both, aligned: the merged table (``auc_a``, ``auc_b``) and the replicates of a - b."""
    ta = a.table[list(keys) + ["auc"]].reset_index().rename(columns={"index": "_ia", "auc": "auc_a"})
    tb = b.table[list(keys) + ["auc"]].reset_index().rename(columns={"index": "_ib", "auc": "auc_b"})
    m = ta.merge(tb, on=list(keys), how="inner")
    return m, a.reps[m["_ia"].to_numpy()] - b.reps[m["_ib"].to_numpy()]


def _ci_columns(diff_reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = percentile_ci(diff_reps, axis=1)
    return np.atleast_1d(lo), np.atleast_1d(hi)


def probe_fidelity(paper: Points | None, reference: Points | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's head minus the reference probe, per evaluated model and task (and the task mean), with the
    paired 95% interval; and per task over all models: the mean difference with its interval, how many models
    the paper's head scored lower on, and the largest difference. Empty when either estimator is missing."""
    if paper is None or reference is None or paper.table.empty or reference.table.empty:
        return pd.DataFrame(columns=FIDELITY_COLUMNS), pd.DataFrame(columns=FIDELITY_SUMMARY_COLUMNS)
    m, d = paired(paper, reference)
    lo, hi = _ci_columns(d)
    per = m[[*MODEL_KEYS, "task"]].assign(paper=m["auc_a"], reference=m["auc_b"], diff=m["auc_a"] - m["auc_b"],
                                          diff_lo=lo, diff_hi=hi)
    rows = []
    for task in [MEAN_TASK, *task_order(set(per["task"]) - {MEAN_TASK})]:
        idx = np.flatnonzero(per["task"].to_numpy() == task)
        g = per.iloc[idx]
        mlo, mhi = percentile_ci(np.nanmean(d[idx], axis=0))
        rows.append({"task": task, "n_models": len(g), "paper": g["paper"].mean(), "reference": g["reference"].mean(),
                     "diff": g["diff"].mean(), "diff_lo": float(mlo), "diff_hi": float(mhi),
                     "n_lower": int((g["diff"] < 0).sum()), "max_abs_diff": float(g["diff"].abs().max())})
    return per[FIDELITY_COLUMNS].reset_index(drop=True), pd.DataFrame(rows, columns=FIDELITY_SUMMARY_COLUMNS)


def below_majority(summary: pd.DataFrame, variants: dict[str, Points]) -> pd.DataFrame:
    """Binary-task results whose test accuracy is below the majority-class accuracy beyond test-set noise (the
    whole 95% bootstrap interval of the accuracy under it), per estimator: a probe that loses to a constant has
    not been fitted well. On a near-chance task a point estimate alone would flag half the models."""
    from biovfm.data.medmnist import BINARY, TASKS
    from biovfm.evaluate.scores import parse_variant

    cols = [*MODEL_KEYS, "task", "probe", "label_fraction", "acc", "acc_lo", "acc_hi", "majority_acc"]
    if "majority_acc" not in summary:
        return pd.DataFrame(columns=cols)
    majority = summary.dropna(subset=["majority_acc"]).groupby("task")["majority_acc"].first()
    rows = []
    for name, pts in variants.items():
        probe, fraction = parse_variant(name)
        tab = pts.table
        binary = tab["task"].map(lambda t: t in TASKS and TASKS[t].task == BINARY) & tab["task"].isin(majority.index)
        sel = tab[binary].assign(probe=probe, label_fraction=fraction)
        sel = sel.assign(majority_acc=sel["task"].map(majority).astype(float))  # float even when no task is binary
        rows.append(sel[sel["acc_hi"] < sel["majority_acc"] - 1e-12])
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
    return out.reindex(columns=cols)


def _baseline_gain(curve: pd.DataFrame, pts: Points, kind: str, same_model: bool) -> tuple[np.ndarray, ...]:
    """Pretrained minus a baseline (random init of the same model, or raw pixels) at each row's label fraction."""
    gain = np.full(len(curve), np.nan)
    lo, hi = gain.copy(), gain.copy()
    tab = pts.table
    for i, r in enumerate(curve.itertuples()):
        if r.kind != "pretrained":
            continue
        m = ((tab["kind"] == kind) & (tab["task"] == MEAN_TASK) & (tab["label_fraction"] == r.label_fraction)
             & (tab["probe"] == r.probe))
        if same_model:
            m &= tab["model"] == r.model
        j = np.flatnonzero(m.to_numpy())
        if len(j):
            gain[i] = r.auc - tab["auc"].iloc[j[0]]
            lo[i], hi[i] = percentile_ci(pts.reps[r.Index] - pts.reps[j[0]])
    return gain, lo, hi


def label_efficiency(variants: dict[str, Points], primary_probe: str) -> tuple[pd.DataFrame, Points]:
    """Mean AUC per evaluated model at every label fraction of the primary probe (and kNN, at all labels), with
    the pretrained encoders' gain over their random-init twin and over raw pixels (paired intervals)."""
    from biovfm.evaluate.scores import parse_variant

    parts, reps = [], []
    for name, pts in variants.items():
        probe, fraction = parse_variant(name)
        if probe not in (primary_probe, "knn"):
            continue
        mean = (pts.table["task"] == MEAN_TASK).to_numpy()
        parts.append(pts.table[mean].assign(probe=probe, label_fraction=fraction))
        reps.append(pts.reps[mean])
    if not parts:
        return pd.DataFrame(columns=LABEL_COLUMNS), Points(pd.DataFrame(columns=LABEL_COLUMNS), np.zeros((0, 0)))
    both = Points(pd.concat(parts, ignore_index=True), np.concatenate(reps))
    curve = both.table
    curve["gain_vs_random"], curve["gain_lo"], curve["gain_hi"] = _baseline_gain(curve, both, "random_init", True)
    curve["gain_vs_raw"], curve["raw_lo"], curve["raw_hi"] = _baseline_gain(curve, both, "raw_pixels", False)
    order = curve.sort_values(["probe", "kind", "method", "modality", "data_size", "params_encoder", "label_fraction"],
                              kind="stable").index.to_numpy()
    both = Points(curve.loc[order].reset_index(drop=True), both.reps[order])
    return both.table.reindex(columns=LABEL_COLUMNS), both


def label_gain_sentence(curve: pd.DataFrame, primary_probe: str) -> str:
    """What pretraining buys at each label fraction, in numbers: the mean gain over random init of the same size."""
    pre = curve[(curve["kind"] == "pretrained") & (curve["probe"] == primary_probe)].dropna(subset=["gain_vs_random"])
    if pre.empty:
        return "No pretrained encoder has a random-init twin at these label fractions: no gain to report."
    by = pre.groupby("label_fraction")["gain_vs_random"].agg(["mean", "min", "max", "size"]).sort_index()
    parts = [f"{100 * f:g}% of the labels: {100 * r['mean']:+.2f} AUC×100 on average (from {100 * r['min']:+.2f} to "
             f"{100 * r['max']:+.2f}, {int(r['size'])} encoders)" for f, r in by.iterrows()]
    few, full = by["mean"].iloc[0], by["mean"].iloc[-1]
    verdict = ("Pretraining pays most with the fewest labels" if few > full else
               "Here pretraining does not pay more with fewer labels")
    peak = by["mean"].idxmax()
    return (f"Gain of pretrained encoders over random-init encoders of the same size (mean AUC, {primary_probe} "
            f"probe): " + "; ".join(parts) + f". {verdict} ({100 * few:+.2f} at {100 * by.index[0]:g}% vs "
            f"{100 * full:+.2f} at {100 * by.index[-1]:g}%); the gain is largest at {100 * peak:g}% of the labels "
            f"({100 * by['mean'].max():+.2f}).")
