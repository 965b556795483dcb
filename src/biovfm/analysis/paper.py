"""The paper's recovered numbers as data, and the comparison of our results with them.

Source: ``shared/reference/paper.md`` (BioVFM-21M, arXiv 2505.09329), sections 1.1, 3.1 and 4.1-4.5.
The paper's own tables were not retrievable; the numbers come from the authors' analysis notebook:

* per-task AUC x100 (section 4.2) is **digitised** from the notebook's figures (precision per task in
  :data:`PX_PRECISION`, AUC x100 per pixel; typical error 0.5-1 px); markers occluded in the figure
  (:data:`OCCLUDED`) were checked by solving the printed slope for the hidden point;
* mean AUC (section 4.1) is digitised from the mean-AUC panel (about +-0.02);
* slopes (4.3), the data experiment (4.4) and the factor correlations (4.5) are **printed** in the
  notebook (quoted).

Conventions: AUC on the 0-100 scale; methods ``dino`` (BioVFM-D, DINOv2) and ``mae`` (BioVFM-M);
models ``tiny/small/base/large`` (ViT-T/S/B/L, patch 16 at 224 px). The slopes are OLS of
``ln(AUC x 100)`` on ``ln(x)`` with ``x`` = :data:`X_PARAMS_M` (the MAE pretraining model's
trainable parameters incl. decoder, in millions, reused for DINOv2).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from biovfm.analysis.fits import MEAN_TASK

# ----------------------------------------------------------------------------------------- the grid
METHODS = ("dino", "mae")
METHOD_NAMES = {"dino": "BioVFM-D", "mae": "BioVFM-M"}  # the paper's names (BioVFM-D = DINOv2)
MODELS = ("tiny", "small", "base", "large")
MODEL_LETTERS = {"tiny": "T", "small": "S", "base": "B", "large": "L"}
# Section 1.1 [Q]: the notebook's `model_params` (M), used as x for MAE and for DINOv2.
X_PARAMS_M = {"tiny": 31.2, "small": 47.4, "base": 111.66, "large": 329.24}
PAPER_IMAGE_SIZE = 224
PAPER_SOURCE = "medmnist"

# Notebook `auc_list` order (section 4.2).
TASK_ORDER = ("dermamnist", "pneumoniamnist", "breastmnist", "chestmnist", "octmnist", "retinamnist",
              "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist", "pathmnist")

# ------------------------------------------------------------------------- section 4.2: per-task AUC
AUC_COLUMNS = ("D-T", "D-S", "D-B", "D-L", "M-T", "M-S", "M-B", "M-L", "BiomedCLIP")
_PER_TASK: dict[str, tuple[float, ...]] = {
    #                 D-T    D-S    D-B    D-L    M-T    M-S    M-B    M-L    BiomedCLIP
    "dermamnist":     (89.70, 94.61, 95.34, 95.8,  89.21, 92.7,  94.93, 95.68, 93.49),
    "pneumoniamnist": (98.44, 98.46, 98.73, 99.12, 95.53, 96.55, 98.07, 98.64, 98.71),
    "breastmnist":    (89.29, 91.38, 90.50, 92.71, 86.00, 87.34, 91.85, 92.31, 92.07),
    "chestmnist":     (74.52, 77.10, 77.8,  79.20, 70.15, 74.31, 77.88, 78.66, 77.42),
    "octmnist":       (95.15, 98.85, 99.33, 99.25, 81.42, 92.25, 98.07, 98.06, 97.83),
    "retinamnist":    (83.93, 85.81, 83.29, 85.38, 79.93, 82.26, 82.54, 82.29, 81.45),
    "bloodmnist":     (99.46, 99.87, 99.92, 99.94, 98.98, 99.48, 99.82, 99.92, 99.89),
    "tissuemnist":    (85.64, 88.18, 89.29, 90.84, 83.03, 86.00, 86.29, 88.70, 87.25),
    "organamnist":    (99.11, 99.64, 99.78, 99.70, 98.37, 98.99, 99.29, 99.51, 99.21),
    "organcmnist":    (98.73, 99.42, 99.38, 99.50, 97.33, 98.24, 98.72, 98.96, 98.60),
    "organsmnist":    (97.30, 97.90, 98.20, 98.28, 95.74, 96.62, 95.8,  97.05, 96.83),
    "pathmnist":      (99.14, 99.22, 99.24, 99.57, 97.78, 98.33, 97.6,  98.42, 99.63),
}
# AUC x100 per pixel of each task's panel (the digitisation's resolution).
PX_PRECISION = {"dermamnist": 0.017, "pneumoniamnist": 0.008, "breastmnist": 0.016, "chestmnist": 0.022,
                "octmnist": 0.044, "retinamnist": 0.013, "bloodmnist": 0.002, "tissuemnist": 0.018,
                "organamnist": 0.003, "organcmnist": 0.005, "organsmnist": 0.006, "pathmnist": 0.005}
# Markers hidden in the figure (value recovered from the printed slope): less precise.
OCCLUDED = frozenset({("dermamnist", "D-L"), ("dermamnist", "M-S"), ("chestmnist", "D-B"), ("bloodmnist", "D-L"),
                      ("organsmnist", "M-B"), ("pathmnist", "M-B")})

# ------------------------------------------------------------------------------ section 4.1: mean AUC
# Digitised from the mean-AUC panel (about +-0.02); the per-task table averages to within 0.02 of these.
MEAN_AUC = {"dino": (92.52, 94.20, 94.23, 94.93), "mae": (89.44, 91.91, 93.41, 94.02)}
BIOMEDCLIP_MEAN_AUC = 93.54  # ViT-B/16 off the shelf, same probe, plotted at x = 111.66

# ------------------------------------------------------------------------------ section 4.3: slopes
MEAN_SLOPES = {"dino": 0.0088, "mae": 0.0191}  # printed on the mean-AUC figure [Q]
# Printed per-task slopes (4 decimals) [Q]: task -> (DINOv2, MAE).
TASK_SLOPES: dict[str, tuple[float, float]] = {
    "chestmnist": (0.0224, 0.0452), "tissuemnist": (0.0224, 0.0240), "dermamnist": (0.0223, 0.0269),
    "octmnist": (0.0141, 0.0692), "breastmnist": (0.0124, 0.0318), "organsmnist": (0.0038, 0.0040),
    "pneumoniamnist": (0.0031, 0.0134), "retinamnist": (0.0025, 0.0094), "organcmnist": (0.0024, 0.0063),
    "organamnist": (0.0020, 0.0044), "pathmnist": (0.0017, 0.0015), "bloodmnist": (0.0016, 0.0037),
}

# ------------------------------------------------------------------- section 4.4: data experiment
# Mean AUC over the 12 tasks by pretraining data [Q]; model and algorithm of these runs unknown.
DATA_EXPERIMENT = {"BioVFM-US": 93.25, "BioVFM-0.2M": 94.22, "BioVFM-21M": 94.42}

# ------------------------------------------------------------------- section 4.5: factor correlations
# Pearson r over the 12 tasks between a task factor and the per-task slope [Q]: factor -> (DINOv2, MAE).
# Keys are the column names of biovfm.analysis.taskstats; the notebook's names are in FACTOR_NOTEBOOK_NAMES.
FACTOR_CORRELATIONS: dict[str, tuple[float, float]] = {
    "n_samples": (0.51, 0.33), "dbi": (0.47, 0.61), "n_classes": (0.05, -0.24), "gzip_median": (-0.22, -0.31),
}
FACTOR_NOTEBOOK_NAMES = {"n_samples": "num_samples", "dbi": "dbi", "n_classes": "num_classes",
                         "gzip_median": "gzip_median"}
FACTOR_LABELS = {"n_samples": "# Samples", "dbi": "DBI", "n_classes": "# Classes", "gzip_median": "Compressibility"}

# ------------------------------------------------------------------- section 3.1: MedMNIST splits
# (train, val, test) from medmnist.INFO [Q]; the paper's `num_samples` is their total (verified in 4.5).
MEDMNIST_SPLITS: dict[str, tuple[int, int, int]] = {
    "pathmnist": (89996, 10004, 7180), "chestmnist": (78468, 11219, 22433), "dermamnist": (7007, 1003, 2005),
    "octmnist": (97477, 10832, 1000), "pneumoniamnist": (4708, 524, 624), "retinamnist": (1080, 120, 400),
    "breastmnist": (546, 78, 156), "bloodmnist": (11959, 1712, 3421), "tissuemnist": (165466, 23640, 47280),
    "organamnist": (34581, 6491, 17778), "organcmnist": (13000, 2392, 8268), "organsmnist": (13940, 2452, 8829),
}

COMPARISON_COLUMNS = ["method", "model", "task", "ours", "ours_lo", "ours_hi", "paper", "diff", "paper_in_ci"]


def _column(method: str, model: str) -> str:
    return f"{METHOD_NAMES[method][-1]}-{MODEL_LETTERS[model]}"


def per_task_table() -> pd.DataFrame:
    """Section 4.2 as printed: index task (notebook order), columns :data:`AUC_COLUMNS`, AUC x100."""
    return pd.DataFrame.from_dict(_PER_TASK, orient="index", columns=list(AUC_COLUMNS)).loc[list(TASK_ORDER)]


def paper_auc() -> pd.DataFrame:
    """Long form of sections 4.1-4.2: columns method, model, task, auc (x100), source.

    One row per (method, model, task) for the 12 tasks (``source = "per-task figure"``), plus the
    ``task = "mean"`` rows from the mean-AUC panel (``source = "mean panel"``). BiomedCLIP is not in
    it (see :data:`AUC_COLUMNS` / :data:`BIOMEDCLIP_MEAN_AUC`).
    """
    rows = []
    for method in METHODS:
        for i, model in enumerate(MODELS):
            col = _column(method, model)
            for task in TASK_ORDER:
                rows.append({"method": method, "model": model, "task": task,
                             "auc": _PER_TASK[task][AUC_COLUMNS.index(col)], "source": "per-task figure"})
            rows.append({"method": method, "model": model, "task": MEAN_TASK, "auc": MEAN_AUC[method][i],
                         "source": "mean panel"})
    return pd.DataFrame(rows, columns=["method", "model", "task", "auc", "source"])


def paper_slopes() -> pd.DataFrame:
    """Section 4.3: columns method, task, slope (per-task rows, then ``task = "mean"``)."""
    rows = [{"method": m, "task": t, "slope": TASK_SLOPES[t][j]} for j, m in enumerate(METHODS) for t in TASK_ORDER]
    rows += [{"method": m, "task": MEAN_TASK, "slope": MEAN_SLOPES[m]} for m in METHODS]
    return pd.DataFrame(rows, columns=["method", "task", "slope"])


def paper_factor_correlations() -> pd.DataFrame:
    """Section 4.5: columns method, factor (taskstats column name), label (the figure's), r."""
    rows = [{"method": m, "factor": f, "label": FACTOR_LABELS[f], "r": rs[j]}
            for j, m in enumerate(METHODS) for f, rs in FACTOR_CORRELATIONS.items()]
    return pd.DataFrame(rows, columns=["method", "factor", "label", "r"])


def paper_comparison(ours: pd.DataFrame) -> pd.DataFrame:
    """Our AUCs next to the paper's, one row per (method, model, task) that the paper has.

    ``ours``: columns method (``mae``|``dino``), model (``tiny``|``small``|``base``|``large``), task
    (a MedMNIST flag or ``"mean"``), auc and optionally auc_lo, auc_hi (a confidence interval), all
    on the 0-1 scale. ``mae`` maps to BioVFM-M, ``dino`` to BioVFM-D; ``mean`` rows are compared
    with the mean-AUC panel (section 4.1). Rows with no paper counterpart (other methods, models or
    tasks) are dropped; two rows for the same (method, model, task) raise ValueError (filter the
    grid point, e.g. one data size and modality, first).

    Returns columns :data:`COMPARISON_COLUMNS`: ours/ours_lo/ours_hi/paper/diff on the x100 scale,
    ``diff = ours - paper``, ``paper_in_ci`` True when ``ours_lo <= paper <= ours_hi`` (False when
    the interval is missing). Ordered by method, model (T..L), then task (notebook order, mean last).
    """
    missing = [c for c in ("method", "model", "task", "auc") if c not in ours.columns]
    if missing:
        raise ValueError(f"paper_comparison: `ours` lacks column(s) {missing}; has {list(ours.columns)}")
    df = ours.copy()
    for c in ("auc_lo", "auc_hi"):
        if c not in df.columns:
            df[c] = np.nan
    df = df[df["method"].isin(METHODS) & df["model"].isin(MODELS)
            & df["task"].isin(TASK_ORDER + (MEAN_TASK,))]
    dup = df.duplicated(["method", "model", "task"], keep=False)
    if dup.any():
        keys = sorted({tuple(k) for k in df.loc[dup, ["method", "model", "task"]].itertuples(index=False)})
        raise ValueError(f"paper_comparison: several rows for (method, model, task) {keys[:3]}"
                         f"{' ...' if len(keys) > 3 else ''}; filter to one grid point (data size, modality; mean "
                         "over seeds)")
    paper = paper_auc()[["method", "model", "task", "auc"]].rename(columns={"auc": "paper"})
    out = df.merge(paper, on=["method", "model", "task"], how="inner")
    out["ours"] = out["auc"].astype(float) * 100
    out["ours_lo"] = out["auc_lo"].astype(float) * 100
    out["ours_hi"] = out["auc_hi"].astype(float) * 100
    out["diff"] = out["ours"] - out["paper"]
    out["paper_in_ci"] = ((out["ours_lo"] <= out["paper"]) & (out["paper"] <= out["ours_hi"])).astype(bool)
    order = {t: i for i, t in enumerate(TASK_ORDER + (MEAN_TASK,))}
    out = out.assign(_m=out["method"].map(METHODS.index), _s=out["model"].map(MODELS.index),
                     _t=out["task"].map(order))
    out = out.sort_values(["_m", "_s", "_t"], ignore_index=True)
    return out[COMPARISON_COLUMNS]


SLOPE_COLUMNS = ["method", "estimator", "modality", "data_size", "n_points", "slope_encoder", "slope_encoder_lo",
                 "slope_encoder_hi", "slope_paper_axis", "slope_paper_axis_lo", "slope_paper_axis_hi", "paper_slope"]


def slope_comparison(fits: pd.DataFrame, main: pd.DataFrame, primary: str) -> pd.DataFrame:
    """Our mean-AUC log-log slope per method (its main series) on both parameter axes, beside the paper's slope,
    which is on the paper's axis (:data:`X_PARAMS_M`): per estimator, the primary first, then the paper's head.

    ``fits``: :func:`biovfm.analysis.scaling.fit_table` rows of every estimator (columns ``probe`` and
    ``label_fraction``); ``main``: the main series per method (method, modality, data_size)."""
    rows = []
    sel = fits[(fits["task"] == MEAN_TASK) & (fits["form"] == "loglog") & (fits["kind"] == "pretrained")
               & (fits["label_fraction"] == 1.0)]
    for _, m in main.iterrows():
        for probe in dict.fromkeys([primary, "paper"]):
            f = sel[(sel["method"] == m["method"]) & (sel["modality"] == m["modality"])
                    & (sel["data_size"] == m["data_size"]) & (sel["probe"] == probe)]
            if f.empty:
                continue
            row = {"method": m["method"], "estimator": probe + (" (primary)" if probe == primary else ""),
                   "modality": m["modality"], "data_size": int(m["data_size"]),
                   "paper_slope": MEAN_SLOPES.get(m["method"], np.nan)}
            for axis, col in (("params", "slope_encoder"), ("params_paper", "slope_paper_axis")):
                a = f[f["axis"] == axis]
                if len(a):
                    r = a.iloc[0]
                    row |= {col: r["slope"], f"{col}_lo": r.get("slope_lo"), f"{col}_hi": r.get("slope_hi"),
                            "n_points": int(r["n_points"])}
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=SLOPE_COLUMNS)


PROTOCOL_DIFFERENCES = (
    "Features are extracted once per checkpoint and cached; the paper's probe sees augmented images each epoch.",
    "The primary probe here is a converged L2 logistic regression with C chosen on validation AUC; the paper's head "
    "(LN, BN, Linear, AdamW, 100 epochs, best validation-loss epoch) is reported beside it (probe 'paper').",
    "The paper's head here adds an L2 penalty tuned on validation AUC, trains in whitened coordinates (population "
    "statistics instead of train-mode BN), keeps its last epoch and takes at least 700 steps: without these it scored "
    "0.05 AUC below the converged reference on the same features. evaluate.probe {whiten: false, select_l2: loss, "
    "select_epoch: best_loss, min_steps: 0} restores the paper's protocol (with the L2 grid).",
    "The pretraining corpus and schedule are ours (the paper pretrains on BioVFM-21M for a schedule it does not fully "
    "report).",
    "Encoder parameters are our x axis; the paper's axis counts the MAE decoder too (31.2/47.4/111.66/329.24 M), and "
    "the paper reuses it for DINOv2: both slopes are shown.",
)


def comparable(source: str, image_size: int) -> tuple[bool, str]:
    """Whether a run can be set against the paper's numbers; if not, a one-line reason for the report.

    Comparable means real MedMNIST+ data (``data.source = medmnist``) evaluated at 224 px, the paper's
    protocol (section 3). Model names are checked by :func:`paper_comparison` (only ViT-T/S/B/L map).
    """
    reasons = []
    if source != PAPER_SOURCE:
        reasons.append(f"data source is {source!r}, not real MedMNIST+ (the paper's benchmark)")
    if int(image_size) != PAPER_IMAGE_SIZE:
        reasons.append(f"images are {int(image_size)} px, the paper evaluates at {PAPER_IMAGE_SIZE} px")
    if reasons:
        return False, "; ".join(reasons) + "."
    return True, ("Comparable with the paper: real MedMNIST+ at 224 px; differences also reflect the pretraining "
                  "corpus and schedule, which the paper does not report.")
