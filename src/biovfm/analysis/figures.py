"""Paper-style scaling figures (A-F), the compute view and the extrapolation check, drawn from the
analysis tables (points with bootstrap intervals, fits); they read tables only, never checkpoints.

Every function takes its tables and an output ``.png`` path, writes the PNG (150 dpi) and an
SVG with the same stem, each atomically (temp file in the same folder, then ``os.replace``), and
returns ``(png_path, svg_path)``. Figures are built on ``matplotlib.figure.Figure`` with an explicit
Agg canvas: no pyplot global state, no display, safe inside Snakemake jobs.

Encodings shared by the figures: AUC on the 0-100 scale (as the paper and the fits); one colour per
method; the largest pretraining set drawn bold with its dashed power-law fit, smaller sets thinner
and faded; random-init encoders grey; the raw-pixel probe a dashed horizontal line; error bars are
95% bootstrap intervals over the test set (and seeds, where several exist). A series with a single point is drawn without a fit
and its legend entry says why.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from biovfm.analysis import laws
from biovfm.analysis.fits import AUC_SCALE, MEAN_TASK, loglog_fit, task_order
from biovfm.io import atomic_path

DPI = 150
METHOD_COLORS = {"mae": "#E8604C", "dino": "#F0A030"}  # the paper's salmon/orange, darkened for contrast
METHOD_LABELS = {"mae": "MAE", "dino": "DINO", "dinov2": "DINOv2"}
FALLBACK_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
RANDOM_COLOR = "#7f7f7f"
RAW_COLOR = "#404040"
RAW_DASHES = (0, (8, 3))  # long dashes: tell the raw-pixel line from the (short-dashed) fits
EXTERNAL_COLORS = ("#2a6fb0", "#3a9a5a", "#8a4fb0", "#b05a2a", "#2a9aa0", "#a02a6f")  # outside encoders' lines
EXTERNAL_DASHES = (0, (6, 2, 1, 2))  # dash-dot: a reference line, not a fit
TASK_LABELS = {
    "pathmnist": "PathMNIST", "chestmnist": "ChestMNIST", "dermamnist": "DermaMNIST",
    "octmnist": "OCTMNIST", "pneumoniamnist": "PneumoniaMNIST", "retinamnist": "RetinaMNIST",
    "breastmnist": "BreastMNIST", "bloodmnist": "BloodMNIST", "tissuemnist": "TissueMNIST",
    "organamnist": "OrganAMNIST", "organcmnist": "OrganCMNIST", "organsmnist": "OrganSMNIST",
}
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "svg.hashsalt": "biovfm"}
MARKERS = ("o", "s", "^", "D", "v", "P")


# ----------------------------------------------------------------------------- small helpers
def _fmt_count(n: float) -> str:
    """4000 -> '4000', 200000 -> '200k', 21000000 -> '21M': short legend/tick labels for data sizes."""
    n = float(n)
    for threshold, div, suffix in ((1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(n) >= threshold:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def _method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method.upper() if method else "?")


def _method_color(method: str, methods: list[str]) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    others = [m for m in methods if m not in METHOD_COLORS]
    return FALLBACK_COLORS[others.index(method) % len(FALLBACK_COLORS)] if method in others else FALLBACK_COLORS[0]


def _slope_text(fit: dict) -> str:
    if np.isfinite(fit["slope"]):
        return f"slope {fit['slope']:.4f}"
    return f"no fit ({fit['note'].split(';')[0]})"


def _steps_text(table: pd.DataFrame) -> str:
    """The fixed pretraining step count(s) for the title, taken from the table."""
    if "train_steps" not in table.columns:
        return "fixed steps"
    steps = table.loc[table["kind"] == "pretrained", "train_steps"].dropna()
    steps = sorted(steps[steps > 0].unique())
    if not steps:
        return "step count not recorded" if (table["kind"] == "pretrained").any() else "no pretrained runs"
    if len(steps) == 1:
        return f"fixed {int(steps[0]):,} steps"
    return f"fixed steps, {int(steps[0]):,}-{int(steps[-1]):,}"


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Write PNG + same-stem SVG atomically; SVG without a date so reruns give identical files."""
    png = Path(out_png)
    if png.suffix.lower() != ".png":
        raise ValueError(f"{png}: output path must end in .png (the SVG goes next to it)")
    svg = png.with_suffix(".svg")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    with atomic_path(svg) as tmp:
        fig.savefig(tmp, format="svg", metadata={"Date": None})
    return png, svg


def _legend_entries(ax) -> tuple[list, list[str]]:
    """Legend entries with data series (error-bar containers) first, reference lines after.

    matplotlib lists plain lines before containers, which would put the baselines above the data.
    """
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(handles)), key=lambda i: not isinstance(handles[i], ErrorbarContainer))
    return [handles[i] for i in order], [labels[i] for i in order]


def _err(t: pd.DataFrame) -> np.ndarray | None:
    """Asymmetric error bars (2 x n, 0-100 scale) from the bootstrap interval; None when no interval exists."""
    if "auc_lo" not in t or not np.isfinite(t["auc_lo"].to_numpy(float)).any():
        return None
    y = t["auc"].to_numpy(float)
    lo = np.nan_to_num(y - t["auc_lo"].to_numpy(float)).clip(0)
    hi = np.nan_to_num(t["auc_hi"].to_numpy(float) - y).clip(0)
    return AUC_SCALE * np.vstack([lo, hi])


def _fit_for(fits: pd.DataFrame, axis: str, form: str, **desc) -> dict | None:
    sel = fits[(fits["axis"] == axis) & (fits["form"] == form)]
    for k, v in desc.items():
        sel = sel[sel[k] == v]
    return None if sel.empty else sel.iloc[0].to_dict()


def _slope_label(f: dict | None) -> str:
    if f is None or not np.isfinite(f.get("slope", np.nan)):
        return "no fit" + (f" ({str(f['note']).split(';')[0]})" if f is not None and isinstance(f.get("note"), str) else "")
    ci = f" [{f['slope_lo']:.4f}, {f['slope_hi']:.4f}]" if np.isfinite(f.get("slope_lo", np.nan)) else ""
    return f"slope {f['slope']:.4f}{ci}"


def _draw_laws(ax, fits: pd.DataFrame, x: np.ndarray, color: str, **desc) -> bool:
    """The paper's log-log fit (dashed) and, when selected by held-out error, the saturating law (dotted)."""
    xf = np.geomspace(x.min(), x.max(), 60)
    drew = False
    f = _fit_for(fits, "params", laws.LOGLOG, **desc)
    if f is not None and np.isfinite(f.get("slope", np.nan)):
        ax.plot(xf / 1e6, AUC_SCALE * laws.loglog_predict(f, xf), ls="--", lw=1.2, color=color, zorder=2)
        drew = True
    s = _fit_for(fits, "params", laws.SATURATING, **desc)
    if s is not None and s.get("selected") == True and np.isfinite(s.get("a", np.nan)):  # noqa: E712 (numpy bool)
        ax.plot(xf / 1e6, AUC_SCALE * laws.saturating_predict(s, xf), ls=":", lw=1.4, color=color, zorder=2)
        drew = True
    return drew


# ----------------------------------------------------------------------------- AUC vs model size (A, B)
def _size_panel(ax, tab: pd.DataFrame, fits: pd.DataFrame, task: str, methods: list[str], legend_size: float,
                tick_names: bool, legend_outside: bool) -> None:
    """One AUC-vs-encoder-size panel for ``task`` from the points table (bootstrap error bars)."""
    tab = tab[tab["task"] == task]
    pre = tab[(tab["kind"] == "pretrained") & (tab["params_encoder"] > 0)]
    sizes_per = pre.groupby(["method", "modality"])["params_encoder"].transform("nunique")
    if (sizes_per > 1).any():
        pre = pre[sizes_per > 1]  # a corpus seen by one model size only (e.g. grid.extra) belongs to Figure E
    multi_mod = pre["modality"].nunique() > 1
    xs_all: list[float] = []
    drew_fit = False
    names: dict[float, str] = {}
    for (method, modality), g in pre.groupby(["method", "modality"], sort=True):
        color = _method_color(method, methods)
        sizes = sorted(g["data_size"].unique())
        for ds in sizes:
            s = g[g["data_size"] == ds].sort_values("params_encoder")
            main = ds == sizes[-1]
            x, y = s["params_encoder"].to_numpy(float), AUC_SCALE * s["auc"].to_numpy(float)
            desc = dict(kind="pretrained", method=method, modality=modality, data_size=ds, task=task)
            mod = f" {modality}" if multi_mod else ""
            label = f"{_method_label(method)}{mod} (n={_fmt_count(ds)}), {_slope_label(_fit_for(fits, 'params', laws.LOGLOG, **desc))}"
            ax.errorbar(x / 1e6, y, yerr=_err(s), color=color, marker="o" if main else ".",
                        ms=6 if main else 4, lw=2.0 if main else 1.0, alpha=1.0 if main else 0.45,
                        capsize=2, label=label, zorder=3 if main else 2)
            if main and len(x) > 1:
                drew_fit |= _draw_laws(ax, fits, x, color, **desc)
            xs_all += list(x)
            names.update(zip(x, s["model"]))
    rnd = tab[(tab["kind"] == "random_init") & (tab["params_encoder"] > 0)]
    for (method, modality, ds), g in rnd.groupby(["method", "modality", "data_size"], sort=True):
        s = g.sort_values("params_encoder")
        x, y = s["params_encoder"].to_numpy(float), AUC_SCALE * s["auc"].to_numpy(float)
        desc = dict(kind="random_init", method=method, modality=modality, data_size=ds, task=task)
        ax.errorbar(x / 1e6, y, yerr=_err(s), color=RANDOM_COLOR, marker="s", ms=5, lw=1.5, capsize=2,
                    label=f"Random init, {_slope_label(_fit_for(fits, 'params', laws.LOGLOG, **desc))}", zorder=2)
        xs_all += list(x)
        names.update((k, v) for k, v in zip(x, s["model"]) if k not in names)
    raw = tab[tab["kind"] == "raw_pixels"]
    if len(raw):
        yr = AUC_SCALE * float(raw["auc"].mean())
        ax.axhline(yr, ls=RAW_DASHES, lw=1.2, color=RAW_COLOR, label=f"Raw-pixel probe ({yr:.2f})", zorder=1)
    ext = tab[tab["kind"] == "external"]
    for i, (model, g) in enumerate(ext.groupby("model", sort=True)):  # outside encoders: reference lines
        ye = AUC_SCALE * float(g["auc"].mean())
        ax.axhline(ye, ls=EXTERNAL_DASHES, lw=1.3, color=EXTERNAL_COLORS[i % len(EXTERNAL_COLORS)],
                   label=f"{model} ({_fmt_count(g['params_encoder'].iloc[0])} params, {ye:.2f})", zorder=1)
    if not (len(pre) or len(rnd) or len(raw) or len(ext)):
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xscale("log")
    if xs_all:
        ticks = sorted(set(xs_all))
        ax.xaxis.set_major_locator(FixedLocator([t / 1e6 for t in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{t / 1e6:.3g}" + (f"\n{names[t]}" if tick_names and names.get(t) else "")
                            for t in ticks])
        ax.set_xlim(min(ticks) / 1e6 / 1.3, max(ticks) / 1e6 * 1.3)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = _legend_entries(ax)
    if drew_fit:
        handles += [Line2D([], [], color="k", ls="--", lw=1.0), Line2D([], [], color="k", ls=":", lw=1.4)]
        labels += ["log-log power law (paper)", "saturating law (where selected)"]
    if handles:
        kw = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0)) if legend_outside else dict(loc="best")
        ax.legend(handles, labels, fontsize=legend_size, framealpha=0.85, **kw)


def _methods(points: pd.DataFrame) -> list[str]:
    return sorted(points.loc[points["kind"] == "pretrained", "method"].unique())


def _check_points(points) -> pd.DataFrame:
    tab = getattr(points, "table", points)
    if len(tab) == 0:
        raise ValueError("points table is empty: nothing to plot")
    return tab


def plot_mean_auc_vs_params(points, fits: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Figure A: mean test AUC over tasks vs encoder parameters, power-law fits (slope with 95% CI) and baselines."""
    tab = _check_points(points)
    n_tasks = tab.loc[tab["task"] != MEAN_TASK, "task"].nunique()
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((10.5, 5.4))
        ax = fig.add_subplot()
        _size_panel(ax, tab, fits, MEAN_TASK, _methods(tab), legend_size=8, tick_names=True, legend_outside=True)
        ax.set_xlabel("Encoder parameters (M)")
        ax.set_ylabel(f"Mean test AUC ×100 ({n_tasks} tasks), 95% bootstrap CI")
        ax.set_title(f"Linear-probe mean AUC vs encoder size (pretraining: {_steps_text(tab)})")
        return _save(fig, out_png)


def plot_task_grid(points, fits: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Figure B: one AUC-vs-encoder-size panel per task (benchmark order), slopes with CIs in each legend."""
    tab = _check_points(points)
    tasks = task_order(set(tab["task"]) - {MEAN_TASK})
    ncols = 4
    nrows = max(1, int(np.ceil(len(tasks) / ncols)))
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((4.5 * ncols, 3.6 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, task in zip(axes, tasks):
            _size_panel(ax, tab, fits, task, _methods(tab), legend_size=5, tick_names=False, legend_outside=False)
            ax.set_ylabel(f"{TASK_LABELS.get(task, task)} AUC ×100")
            ax.tick_params(labelsize=8)
        for ax in axes[len(tasks):]:
            ax.set_visible(False)
        fig.supxlabel("Encoder parameters (M)")
        fig.suptitle(f"Linear-probe test AUC per task vs encoder size, 95% bootstrap CIs (pretraining: {_steps_text(tab)})")
        return _save(fig, out_png)


# ----------------------------------------------------------------------------- per-task slopes (C, D)
def plot_task_slopes(slopes: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Figures C/D: per-task log-log slopes vs parameters, sorted, one panel per method, 95% CIs."""
    methods = sorted(slopes["method"].unique()) if len(slopes) else []
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((5.2 * max(1, len(methods)), 0.35 * max(6, slopes["task"].nunique() if len(slopes) else 6) + 1.2))
        axes = fig.subplots(1, max(1, len(methods)), squeeze=False).ravel()
        if not methods:
            axes[0].text(0.5, 0.5, "no per-task slopes (needs >= 2 model sizes)", ha="center", va="center",
                         transform=axes[0].transAxes, color="0.4")
        cmap = matplotlib.colormaps["RdPu_r"]
        for ax, method in zip(axes, methods):
            g = slopes[slopes["method"] == method].sort_values("slope", ascending=True, na_position="first")
            y = np.arange(len(g))
            v = g["slope"].to_numpy(float)
            lo = np.nan_to_num(v - g["slope_lo"].to_numpy(float))
            hi = np.nan_to_num(g["slope_hi"].to_numpy(float) - v)
            colors = [cmap(0.15 + 0.6 * i / max(len(g) - 1, 1)) for i in range(len(g))][::-1]
            ax.barh(y, np.nan_to_num(v), xerr=np.vstack([lo, hi]), color=colors, edgecolor="0.3", lw=0.5,
                    capsize=2, error_kw={"lw": 0.8})
            ax.axvline(0, color="0.3", lw=0.8)
            ax.set_yticks(y, [TASK_LABELS.get(t, t) for t in g["task"]])
            r = g.iloc[0]
            ax.set_title(f"{_method_label(method)} ({r['modality']}, n={_fmt_count(r['data_size'])})")
            ax.set_xlabel("log-log slope of AUC vs parameters (95% CI)")
            ax.grid(True, axis="x", alpha=0.3)
        return _save(fig, out_png)


# ----------------------------------------------------------------------------- pretraining data (E)
def plot_data_comparison(data_cmp: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Figure E: mean AUC per pretraining corpus (single modality, size-matched mix, full), per method and model."""
    groups = list(data_cmp.groupby(["method", "model"], sort=True)) if len(data_cmp) else []
    single = [g for g in groups if g[1]["corpus"].str.contains("single").any()]
    if single:  # the paper's contrast: models that also saw a single-modality corpus
        groups = single
    elif groups:  # else the data-size contrast of each method's largest model
        largest = data_cmp.groupby("method")["model"].last().to_dict()
        groups = [g for g in groups if largest.get(g[0][0]) == g[0][1]]
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((max(6.5, 3.2 * len(groups) + 1.0), 4.6))
        axes = fig.subplots(1, max(1, len(groups)), squeeze=False).ravel()
        if groups:
            allg = pd.concat([g for _, g in groups])
            lo = np.nanmin(AUC_SCALE * allg[["auc", "auc_lo"]].to_numpy(float))
            hi = np.nanmax(AUC_SCALE * allg[["auc", "auc_hi"]].to_numpy(float))
        if not groups:
            axes[0].text(0.5, 0.5, "no (method, model) was pretrained on more than one corpus:\n"
                         "add a single-modality corpus to grid.extra (see params.yaml)", ha="center", va="center",
                         transform=axes[0].transAxes, color="0.4", fontsize=9)
            axes[0].set_xticks([])
        for ax, ((method, model), g) in zip(axes, groups):
            y = AUC_SCALE * g["auc"].to_numpy(float)
            err = _err(g)
            colors = ["#71BFB2" if "single" in c else _method_color(method, [method]) for c in g["corpus"]]
            alphas = np.linspace(0.55, 1.0, len(g))
            bars = ax.bar(range(len(g)), y, yerr=err, color=colors, edgecolor="0.3", lw=0.6, capsize=3)
            for b, a in zip(bars, alphas):
                b.set_alpha(float(a))
            for i, v in enumerate(y):
                ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(g)), [c.replace(" (", "\n(") for c in g["corpus"]], fontsize=7)
            ax.set_title(f"{_method_label(method)} {model}")
            ax.set_ylim(max(0.0, lo - 1.0), min(100.0, hi + 1.0))
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_ylabel("Mean test AUC ×100 (95% CI)")
        fig.suptitle("Pretraining data: single modality vs size-matched mix vs full corpus", fontsize=10)
        return _save(fig, out_png)


def plot_auc_vs_data_size(points, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Mean AUC vs pretraining images: one line per (method, model, corpus), coloured by model size,
    random-init encoders as dotted references in the size's colour."""
    tab = _check_points(points)
    tab = tab[tab["task"] == MEAN_TASK]
    pre = tab[(tab["kind"] == "pretrained") & (tab["data_size"] > 0)]
    rnd = tab[tab["kind"] == "random_init"]
    raw = tab[tab["kind"] == "raw_pixels"]
    methods = sorted(pre["method"].unique())
    sizes = (pd.concat([pre, rnd])[["model", "params_encoder"]].drop_duplicates("model")
             .sort_values("params_encoder")["model"].tolist())
    cmap = matplotlib.colormaps["viridis"]
    color = {m: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, m in enumerate(sizes)}
    multi_mod = pre["modality"].nunique() > 1
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((10.5, 5.4))
        ax = fig.add_subplot()
        xs: set[float] = set()
        for (method, modality, model), g in pre.groupby(["method", "modality", "model"], sort=False):
            s = g.sort_values("data_size")
            x, y = s["data_size"].to_numpy(float), AUC_SCALE * s["auc"].to_numpy(float)
            fit = loglog_fit(x, y, x_name="data sizes")
            mod = f" {modality}" if multi_mod else ""
            ax.errorbar(x, y, yerr=_err(s), color=color[model], marker=MARKERS[methods.index(method) % len(MARKERS)],
                        ms=6, lw=1.8, capsize=2, ls="-" if len(x) > 1 else "none",
                        label=f"{_method_label(method)}{mod} {model}, {_slope_text(fit)}")
            xs.update(x)
        for _, r in rnd.iterrows():
            yr = AUC_SCALE * r["auc"]
            ax.axhline(yr, ls=":", lw=1.4, color=color.get(r["model"], RANDOM_COLOR), label=f"Random init {r['model']} ({yr:.2f})")
        if len(raw):
            yr = AUC_SCALE * float(raw["auc"].mean())
            ax.axhline(yr, ls=RAW_DASHES, lw=1.2, color=RAW_COLOR, label=f"Raw-pixel probe ({yr:.2f})")
        ax.set_xscale("log")
        if xs:
            ticks = sorted(xs)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticklabels([_fmt_count(t) for t in ticks])
            ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("Pretraining images (fixed number of steps)")
        ax.set_ylabel("Mean test AUC ×100 (95% CI)")
        ax.set_title(f"Linear-probe mean AUC vs pretraining data ({_steps_text(tab)})")
        handles, labels = _legend_entries(ax)
        if handles:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, framealpha=0.85)
        return _save(fig, out_png)


def plot_label_efficiency(curve: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Mean AUC vs the fraction of training labels the probe saw, one panel per method: a line per model size
    (pretrained solid, its random-init twin dotted), raw pixels dashed black, kNN (all labels) as open stars."""
    probe_rows = curve[curve["probe"] != "knn"]
    knn = curve[curve["probe"] == "knn"]
    pre = probe_rows[probe_rows["kind"] == "pretrained"]
    methods = sorted(pre["method"].unique()) or [""]
    sizes = (probe_rows[probe_rows["kind"].isin(["pretrained", "random_init"])][["model", "params_encoder"]]
             .drop_duplicates("model")
             .sort_values("params_encoder")["model"].tolist())
    cmap = matplotlib.colormaps["viridis"]
    color = {m: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, m in enumerate(sizes)}
    main = pre.groupby("method")["data_size"].max().to_dict()  # the largest pretraining set per method
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((5.2 * len(methods) + 2.2, 4.6))
        axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
        for ax, method in zip(axes, methods):
            sel = pre[(pre["method"] == method) & (pre["data_size"] == main.get(method, 0))]
            for model, g in sel.groupby("model", sort=False):
                g = g.sort_values("label_fraction")
                ax.errorbar(g["label_fraction"], AUC_SCALE * g["auc"], yerr=_err(g), color=color[model], marker="o",
                            ms=5, lw=1.8, capsize=2, label=f"{model} pretrained")
                k = knn[(knn["kind"] == "pretrained") & (knn["method"] == method) & (knn["model"] == model)
                        & (knn["data_size"] == main.get(method, 0))]
                if len(k):
                    ax.plot([1.0], [AUC_SCALE * k["auc"].iloc[0]], marker="*", ms=11, mfc="none", color=color[model],
                            ls="none", label=f"{model} kNN")
            rnd = probe_rows[probe_rows["kind"] == "random_init"]
            for model, g in rnd.groupby("model", sort=False):
                g = g.sort_values("label_fraction")
                ax.plot(g["label_fraction"], AUC_SCALE * g["auc"], ls=":", lw=1.4, color=color.get(model, RANDOM_COLOR),
                        label=f"{model} random init")
            raw = probe_rows[probe_rows["kind"] == "raw_pixels"].sort_values("label_fraction")
            if len(raw):
                ax.plot(raw["label_fraction"], AUC_SCALE * raw["auc"], ls=RAW_DASHES, lw=1.2, color=RAW_COLOR,
                        label="raw pixels")
            ext = probe_rows[probe_rows["kind"] == "external"]
            for i, (model, g) in enumerate(ext.groupby("model", sort=True)):
                g = g.sort_values("label_fraction")
                ax.plot(g["label_fraction"], AUC_SCALE * g["auc"], ls=EXTERNAL_DASHES, lw=1.3,
                        color=EXTERNAL_COLORS[i % len(EXTERNAL_COLORS)], label=f"{model} (outside)")
            ax.set_xscale("log")
            fr = sorted(probe_rows["label_fraction"].unique())
            ax.xaxis.set_major_locator(FixedLocator(fr))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticklabels([f"{100 * f:g}%" for f in fr])
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("Training labels used by the probe")
            ax.set_title(f"{_method_label(method)}, {_fmt_count(main.get(method, 0))} pretraining images")
        axes[0].set_ylabel("Mean test AUC ×100 (95% CI)")
        handles, labels = _legend_entries(axes[-1])
        if handles:
            axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, framealpha=0.85)
        return _save(fig, out_png)


# ----------------------------------------------------------------------------- task factors (F)
FACTOR_LABELS = {"n_samples": "# Samples", "dbi": "DBI (class overlap)", "n_classes": "# Classes",
                 "gzip_median": "Compressibility", "pixel_entropy": "Pixel entropy", "imbalance": "Class imbalance",
                 "modality": "Modality (η)", "label_type": "Label type (η)"}


def plot_factor_correlations(corr: pd.DataFrame, slopes: pd.DataFrame, stats: pd.DataFrame,
                             out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Figure F: correlation of per-task slope with task characteristics (Pearson r with 95% bootstrap CI;
    correlation ratio η for the categorical factors), and the slopes by label type."""
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((12.5, 4.8))
        ax, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
        if corr is None or len(corr) == 0:
            for a in (ax, ax2):
                a.text(0.5, 0.5, "no correlations (needs per-task slopes and task statistics)", ha="center",
                       va="center", transform=a.transAxes, color="0.4", fontsize=9)
            return _save(fig, out_png)
        methods = sorted(corr["method"].unique())
        factors = [f for f in FACTOR_LABELS if f in set(corr["factor"])]
        first = corr[corr["method"] == methods[0]].set_index("factor")
        factors.sort(key=lambda f: -np.nan_to_num(first["r"].get(f, np.nan), nan=-9))
        w = 0.8 / len(methods)
        for i, m in enumerate(methods):
            c = corr[corr["method"] == m].set_index("factor").reindex(factors)
            r = c["r"].to_numpy(float)
            lo = c["r_lo"].to_numpy(float) if "r_lo" in c else np.full_like(r, np.nan)
            hi = c["r_hi"].to_numpy(float) if "r_hi" in c else np.full_like(r, np.nan)
            err = np.vstack([np.nan_to_num(r - lo).clip(0), np.nan_to_num(hi - r).clip(0)])
            xs = np.arange(len(factors)) + (i - (len(methods) - 1) / 2) * w
            ax.bar(xs, np.nan_to_num(r), w, yerr=err, capsize=2, color=_method_color(m, methods),
                   edgecolor="0.3", lw=0.5, label=_method_label(m))
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(factors)), [FACTOR_LABELS[f] for f in factors], rotation=20, ha="right")
        n = slopes["task"].nunique()
        ax.set_ylabel(f"r with per-task slope (n={n} tasks)")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title("Task factors vs scaling slope (95% CI over test-set resamples)")
        merged = slopes.merge(stats, on="task", how="left") if "label_type" in stats else slopes.assign(label_type="?")
        types = sorted(merged["label_type"].dropna().unique())
        for i, m in enumerate(methods):
            g = merged[merged["method"] == m]
            for j, t in enumerate(types):
                v = g.loc[g["label_type"] == t, "slope"].to_numpy(float)
                ax2.scatter(np.full(len(v), j + (i - (len(methods) - 1) / 2) * 0.2), v, color=_method_color(m, methods),
                            s=22, edgecolor="0.2", lw=0.4, label=_method_label(m) if j == 0 else None)
        ax2.set_xticks(range(len(types)), types, rotation=20, ha="right")
        ax2.axhline(0, color="0.3", lw=0.8)
        ax2.set_ylabel("per-task slope")
        ax2.set_title("Slopes by label type")
        ax2.grid(True, axis="y", alpha=0.3)
        return _save(fig, out_png)


# ----------------------------------------------------------------------------- compute view and extrapolation
def plot_compute_frontier(frontier: pd.DataFrame, recs: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Mean AUC vs total training FLOPs per method: every run (size = model, shade = data size), the
    compute-efficient frontier, and the fitted law's recommendation for larger budgets."""
    methods = sorted(frontier["method"].unique()) if len(frontier) else []
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((5.4 * max(1, len(methods)), 4.6))
        axes = fig.subplots(1, max(1, len(methods)), squeeze=False, sharey=True).ravel()
        if not methods:
            axes[0].text(0.5, 0.5, "no pretrained runs with recorded training FLOPs", ha="center", va="center",
                         transform=axes[0].transAxes, color="0.4")
        for ax, m in zip(axes, methods):
            g = frontier[frontier["method"] == m]
            color = _method_color(m, methods)
            ds = sorted(g["data_size"].unique())
            for k, d in enumerate(ds):
                s = g[g["data_size"] == d]
                ax.errorbar(s["train_flops"], AUC_SCALE * s["auc"], yerr=_err(s), fmt="o", color=color,
                            alpha=0.35 + 0.65 * (k + 1) / len(ds), ms=5, capsize=2, label=f"n={_fmt_count(d)}")
            for _, r in g.iterrows():
                ax.annotate(r["model"], (r["train_flops"], AUC_SCALE * r["auc"]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points", color="0.3")
            f = g[g["frontier"]].sort_values("train_flops")
            ax.step(f["train_flops"], AUC_SCALE * f["auc"], where="post", color="k", lw=1.2, label="frontier")
            rr = recs[(recs["method"] == m) & recs["pred_auc"].notna()] if len(recs) and "pred_auc" in recs else pd.DataFrame()
            if len(rr):
                ax.plot(rr["train_flops"], AUC_SCALE * rr["pred_auc"], "x--", color=color, lw=1, ms=6,
                        label="joint-law prediction")
            ax.set_xscale("log")
            ax.set_xlabel("Total pretraining FLOPs (measured)")
            ax.set_title(_method_label(m))
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("Mean test AUC ×100 (95% CI)")
        return _save(fig, out_png)


def plot_extrapolation(fits: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """The extrapolation check: each law fitted without the largest point predicts it (mean AUC; 95% CIs)."""
    sel = fits[(fits["task"] == MEAN_TASK) & fits["pred_largest"].notna()] if "pred_largest" in fits else fits.iloc[:0]
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((10.0, 0.42 * max(len(sel), 4) + 1.4))
        ax = fig.add_subplot()
        if sel.empty:
            ax.text(0.5, 0.5, "no extrapolation check: every axis needs >= 3 distinct values\n"
                    "(>= 4 for the saturating law)", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_axis_off()
            return _save(fig, out_png)
        sel = sel.reset_index(drop=True)
        y = np.arange(len(sel))[::-1]
        for i, r in sel.iterrows():
            yi = y[i]
            ax.errorbar(AUC_SCALE * r["obs_largest"], yi + 0.12, xerr=_pair(r, "obs"), fmt="o", color="k", ms=5,
                        capsize=2, label="observed" if i == 0 else None)
            color = "#2b8cbe" if r["form"] == laws.LOGLOG else "#e34a33"
            ax.errorbar(AUC_SCALE * r["pred_largest"], yi - 0.12, xerr=_pair(r, "pred"), fmt="s", color=color, ms=5,
                        capsize=2, mfc="white" if r.get("extrap_holds") == False else color)  # noqa: E712
        labels = [_series_label(r) + (" ✗" if r.get("extrap_holds") == False else "") for _, r in sel.iterrows()]  # noqa: E712
        ax.set_yticks(y, labels, fontsize=7)
        handles = [Line2D([], [], color="k", marker="o", ls="none", label="observed at the largest x"),
                   Line2D([], [], color="#2b8cbe", marker="s", ls="none", label="log-log prediction"),
                   Line2D([], [], color="#e34a33", marker="s", ls="none", label="saturating prediction"),
                   Line2D([], [], color="0.3", marker="s", mfc="white", ls="none", label="✗ interval of the error excludes 0")]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        ax.set_xlabel("Mean test AUC ×100 at the largest point (95% CI)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title("Extrapolation check: fit without the largest point, predict it")
        return _save(fig, out_png)


def _series_label(r: pd.Series) -> str:
    """'MAE all n=4.5k, params, loglog' or 'Random init, params, loglog': a fit's series in words."""
    if r["kind"] == "random_init":
        who = "Random init"
    else:
        corpus = [str(r["modality"] or "")]
        if not pd.isna(r["data_size"]) and r["axis"] != "images":
            corpus.append(f"n={_fmt_count(r['data_size'])}")
        if r["axis"] == "images" and isinstance(r.get("model"), str):
            corpus.append(r["model"])
        who = f"{_method_label(r['method'])} " + " ".join(c for c in corpus if c)
    return f"{who}, {r['axis']}, {r['form']}"


def _pair(r: pd.Series, pre: str) -> np.ndarray | None:
    lo, hi, v = r.get(f"{pre}_lo"), r.get(f"{pre}_hi"), r[f"{pre}_largest"]
    if lo is None or pd.isna(lo):
        return None
    return AUC_SCALE * np.array([[max(v - lo, 0.0)], [max(hi - v, 0.0)]])


def plot_task_examples(task_npzs: list[str | os.PathLike], out_png: str | os.PathLike, per_task: int = 10) -> tuple[Path, Path]:
    """A montage of training images per evaluation task with their labels: what the probes are asked to tell apart."""
    from biovfm.data.medmnist import load_npz

    fig = _new_figure((per_task * 0.9, len(task_npzs) * 1.0 + 0.4))
    axes = fig.subplots(len(task_npzs), per_task, squeeze=False)
    for row, path in zip(axes, task_npzs):
        data = load_npz(path, mmap=True)  # only the images shown are read, however large the task
        flag = Path(path).stem.rsplit("_", 1)[0]
        for ax in row[len(data["train_images"]):]:  # a small custom task may have fewer training images
            ax.set_visible(False)
        for j, ax in enumerate(row[:len(data["train_images"])]):
            im, lab = np.array(data["train_images"][j]), data["train_labels"][j]
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            text = ",".join(str(i) for i in np.flatnonzero(lab)) or "none" if len(lab) > 1 else str(lab[0])
            ax.set_title(text, fontsize=6, pad=2)
        row[0].set_ylabel(flag, fontsize=7)
    fig.suptitle("Evaluation tasks: training images with labels (multi-label: positive label indices)", fontsize=9)
    return _save(fig, out_png)
