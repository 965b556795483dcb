"""Paper-style scaling figures from the tidy summary table (reads tables only, never checkpoints).

Every function takes the summary table and an output ``.png`` path, writes the PNG (150 dpi) and an
SVG with the same stem, each atomically (temp file in the same folder, then ``os.replace``), and
returns ``(png_path, svg_path)``. Figures are built on ``matplotlib.figure.Figure`` with an explicit
Agg canvas: no pyplot global state, no display, safe inside Snakemake jobs.

Encodings shared by the figures: AUC on the 0-100 scale (as the paper and the fits); one colour per
method; the largest pretraining set drawn bold with its dashed power-law fit, smaller sets thinner
and faded; random-init encoders grey; the raw-pixel probe a dashed horizontal line; error bars are
the std over seeds where several seeds exist. A series with a single point is drawn without a fit
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

from biovfm.analysis.fits import AUC_SCALE, loglog_fit, mean_auc_table, task_auc_table, task_order
from biovfm.io import atomic_path

DPI = 150
METHOD_COLORS = {"mae": "#E8604C", "dino": "#F0A030"}  # the paper's salmon/orange, darkened for contrast
METHOD_LABELS = {"mae": "MAE", "dino": "DINO", "dinov2": "DINOv2"}
FALLBACK_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
RANDOM_COLOR = "#7f7f7f"
RAW_COLOR = "#404040"
RAW_DASHES = (0, (8, 3))  # long dashes: tell the raw-pixel line from the (short-dashed) fits
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


def _yerr(std: pd.Series) -> np.ndarray | None:
    """Std over seeds on the 0-100 scale, or None when no point has several seeds."""
    v = AUC_SCALE * std.to_numpy(float)
    return np.nan_to_num(v) if np.isfinite(v).any() else None


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


def _check_nonempty(summary: pd.DataFrame) -> None:
    if len(summary) == 0:
        raise ValueError("summary table is empty: nothing to plot")


# ----------------------------------------------------------------------------- AUC vs model size
def _size_panel(ax, tab: pd.DataFrame, ycol: str, methods: list[str], legend_size: float,
                tick_names: bool, legend_outside: bool) -> None:
    """Draw one AUC-vs-encoder-size panel from a seed-averaged table (mean table or one task's rows).

    ``tab`` has kind, method, modality, data_size, model, params_encoder, ``ycol`` and ``ycol_std``.
    """
    std = f"{ycol}_std"
    pre = tab[(tab["kind"] == "pretrained") & (tab["params_encoder"] > 0)]
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
            x, y = s["params_encoder"].to_numpy(float), AUC_SCALE * s[ycol].to_numpy(float)
            fit = loglog_fit(x, y)
            mod = f" {modality}" if multi_mod else ""
            label = f"{_method_label(method)}{mod} (n={_fmt_count(ds)}), {_slope_text(fit)}"
            ax.errorbar(x / 1e6, y, yerr=_yerr(s[std]), color=color, marker="o" if main else ".",
                        ms=6 if main else 4, lw=2.0 if main else 1.0, alpha=1.0 if main else 0.45,
                        capsize=2, label=label, zorder=3 if main else 2)
            if main and np.isfinite(fit["slope"]):
                xf = np.geomspace(x.min(), x.max(), 50)
                ax.plot(xf / 1e6, np.exp(fit["intercept"]) * xf ** fit["slope"], ls="--", lw=1.2,
                        color=color, zorder=2)
                drew_fit = True
            xs_all += list(x)
            names.update(zip(x, s["model"]))
    rnd = tab[(tab["kind"] == "random_init") & (tab["params_encoder"] > 0)]
    for _, g in rnd.groupby(["method", "modality", "data_size"], sort=True):
        s = g.sort_values("params_encoder")
        x, y = s["params_encoder"].to_numpy(float), AUC_SCALE * s[ycol].to_numpy(float)
        fit = loglog_fit(x, y)
        ax.errorbar(x / 1e6, y, yerr=_yerr(s[std]), color=RANDOM_COLOR, marker="s", ms=5, lw=1.5,
                    capsize=2, label=f"Random init, {_slope_text(fit)}", zorder=2)
        if np.isfinite(fit["slope"]):
            xf = np.geomspace(x.min(), x.max(), 50)
            ax.plot(xf / 1e6, np.exp(fit["intercept"]) * xf ** fit["slope"], ls="--", lw=1.0,
                    color=RANDOM_COLOR, zorder=1)
            drew_fit = True
        xs_all += list(x)
        names.update((k, v) for k, v in zip(x, s["model"]) if k not in names)
    raw = tab[tab["kind"] == "raw_pixels"]
    if len(raw):
        yr = AUC_SCALE * float(raw[ycol].mean())
        ax.axhline(yr, ls=RAW_DASHES, lw=1.2, color=RAW_COLOR, label=f"Raw-pixel probe ({yr:.2f})", zorder=1)
    if not (len(pre) or len(rnd) or len(raw)):
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xscale("log")
    if xs_all:
        ticks = sorted(set(xs_all))
        ax.xaxis.set_major_locator(FixedLocator([t / 1e6 for t in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{t / 1e6:.3g}" + (f"\n{names[t]}" if tick_names and names.get(t) else "")
                            for t in ticks])
        lo, hi = min(ticks) / 1e6, max(ticks) / 1e6
        ax.set_xlim(lo / 1.3, hi * 1.3)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = _legend_entries(ax)
    if drew_fit:
        handles.append(Line2D([], [], color="k", ls="--", lw=1.0))
        labels.append("power-law fit")
    if handles:
        kw = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0)) if legend_outside else dict(loc="best")
        ax.legend(handles, labels, fontsize=legend_size, framealpha=0.85, **kw)


def plot_mean_auc_vs_params(summary: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Paper Figure A: mean test AUC over tasks vs encoder parameters, with power-law fits and baselines."""
    _check_nonempty(summary)
    tab = mean_auc_table(summary)
    methods = sorted(tab.loc[tab["kind"] == "pretrained", "method"].unique())
    n_tasks = int(tab["n_tasks"].max())
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((9.5, 5.2))
        ax = fig.add_subplot()
        _size_panel(ax, tab, "mean_auc", methods, legend_size=8, tick_names=True, legend_outside=True)
        ax.set_xlabel("Encoder parameters (M)")
        uneven = " (uneven task counts!)" if tab["n_tasks"].nunique() > 1 else ""
        ax.set_ylabel(f"Mean test AUC ×100 ({n_tasks} tasks){uneven}")
        ax.set_title(f"Linear-probe mean AUC vs encoder size (pretraining: {_steps_text(tab)})")
        return _save(fig, out_png)


def plot_task_grid(summary: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Paper Figure B: one AUC-vs-encoder-size panel per task (benchmark order), slopes in each legend."""
    _check_nonempty(summary)
    tab = task_auc_table(summary)
    methods = sorted(tab.loc[tab["kind"] == "pretrained", "method"].unique())
    tasks = task_order(tab["task"])  # the study's tasks: MedMNIST ones in benchmark order, then custom ones
    ncols = 4
    nrows = int(np.ceil(len(tasks) / ncols))
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((4.3 * ncols, 3.5 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, task in zip(axes, tasks):
            _size_panel(ax, tab[tab["task"] == task], "auc", methods, legend_size=5.5, tick_names=False,
                        legend_outside=False)
            ax.set_ylabel(f"{TASK_LABELS.get(task, task)} AUC ×100")
            ax.tick_params(labelsize=8)
        for ax in axes[len(tasks):]:
            ax.set_visible(False)
        fig.supxlabel("Encoder parameters (M)")
        fig.suptitle(f"Linear-probe test AUC per task vs encoder size (pretraining: {_steps_text(tab)})")
        return _save(fig, out_png)


# ----------------------------------------------------------------------------- AUC vs data size
def plot_auc_vs_data_size(summary: pd.DataFrame, out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Mean AUC vs pretraining images: one line per (method, model), coloured by model size.

    Random-init encoders of each size are dotted horizontal references in the size's colour, so the
    gain from pretraining data reads directly off each line.
    """
    _check_nonempty(summary)
    tab = mean_auc_table(summary)
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
        fig = _new_figure((9.5, 5.2))
        ax = fig.add_subplot()
        xs: set[float] = set()
        for (method, modality, model), g in pre.groupby(["method", "modality", "model"], sort=False):
            s = g.sort_values("data_size")
            x, y = s["data_size"].to_numpy(float), AUC_SCALE * s["mean_auc"].to_numpy(float)
            fit = loglog_fit(x, y, x_name="data sizes")
            mod = f" {modality}" if multi_mod else ""
            ax.errorbar(x, y, yerr=_yerr(s["mean_auc_std"]), color=color[model],
                        marker=MARKERS[methods.index(method) % len(MARKERS)], ms=6, lw=1.8, capsize=2,
                        label=f"{_method_label(method)}{mod} {model}, {_slope_text(fit)}")
            xs.update(x)
        for _, r in rnd.iterrows():
            yr = AUC_SCALE * r["mean_auc"]
            ax.axhline(yr, ls=":", lw=1.4, color=color.get(r["model"], RANDOM_COLOR),
                       label=f"Random init {r['model']} ({yr:.2f})")
        if len(raw):
            yr = AUC_SCALE * float(raw["mean_auc"].mean())
            ax.axhline(yr, ls=RAW_DASHES, lw=1.2, color=RAW_COLOR, label=f"Raw-pixel probe ({yr:.2f})")
        if not (len(pre) or len(rnd) or len(raw)):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
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
        ax.set_ylabel(f"Mean test AUC ×100 ({int(tab['n_tasks'].max())} tasks)")
        ax.set_title(f"Linear-probe mean AUC vs pretraining data ({_steps_text(tab)})")
        handles, labels = _legend_entries(ax)
        if handles:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, framealpha=0.85)
        return _save(fig, out_png)


def plot_task_examples(task_npzs: list[str | os.PathLike], out_png: str | os.PathLike, per_task: int = 10) -> tuple[Path, Path]:
    """A montage of training images per evaluation task with their labels: what the probes are asked to tell apart."""
    from biovfm.data.medmnist import load_npz

    fig = _new_figure((per_task * 0.9, len(task_npzs) * 1.0 + 0.4))
    axes = fig.subplots(len(task_npzs), per_task, squeeze=False)
    for row, path in zip(axes, task_npzs):
        data = load_npz(path)
        flag = Path(path).stem.rsplit("_", 1)[0]
        for ax in row[len(data["train_images"]):]:  # a small custom task may have fewer training images
            ax.set_visible(False)
        for j, ax in enumerate(row[:len(data["train_images"])]):
            im, lab = data["train_images"][j], data["train_labels"][j]
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            text = ",".join(str(i) for i in np.flatnonzero(lab)) or "none" if len(lab) > 1 else str(lab[0])
            ax.set_title(text, fontsize=6, pad=2)
        row[0].set_ylabel(flag, fontsize=7)
    fig.suptitle("Evaluation tasks: training images with labels (multi-label: positive label indices)", fontsize=9)
    return _save(fig, out_png)
