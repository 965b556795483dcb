"""Figures: each writes a real PNG + same-stem SVG, also for degenerate grids (one size / one data size)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biovfm.analysis.figures import plot_auc_vs_data_size, plot_mean_auc_vs_params, plot_task_grid
from biovfm.data.medmnist import TASKS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = {"pico": 1_500_000, "nano": 5_500_000, "micro": 21_000_000}
PLOTS = (plot_mean_auc_vs_params, plot_task_grid, plot_auc_vs_data_size)


def figure_summary(sizes: dict[str, int] = SIZES, data: tuple[int, ...] = (1000, 4000)) -> pd.DataFrame:
    """1 method (MAE, 2 seeds) x sizes x data sizes x 12 tasks, plus random init per size and raw pixels."""
    rng = np.random.default_rng(0)
    rows = []

    def add(run_id, kind, method, model, modality, d, seed, n, auc):
        for i, t in enumerate(TASKS):
            a = float(np.clip(auc - 0.01 * i + rng.normal(0, 0.003), 0.5, 0.999))
            rows.append(dict(run_id=run_id, kind=kind, method=method, model=model, modality=modality,
                             data_size=d, seed=seed, task=t, auc=a, acc=a - 0.1, params_encoder=n,
                             params_paper=n + 100_000, flops_per_image=2.0 * n,
                             images_seen=64_000 if kind == "pretrained" else 0,
                             train_steps=1000 if kind == "pretrained" else 0))

    for model, n in sizes.items():
        for d in data:
            for seed in (0, 1):
                add(f"mae-{model}-{d}", "pretrained", "mae", model, "all", d, seed, n,
                    0.6 * n ** 0.02 * d ** 0.005)
        add(f"random-{model}", "random_init", "random", model, "", 0, 0, n, 0.62 * n ** 0.01)
    add("raw", "raw_pixels", "raw", "", "", 0, 0, 0, 0.7)
    return pd.DataFrame(rows)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _check_outputs(paths, out_png: Path, min_w: int, min_h: int) -> None:
    png, svg = paths
    assert Path(png) == out_png and Path(svg) == out_png.with_suffix(".svg")
    w, h = _png_size(out_png)
    assert min_w <= w <= 6000 and min_h <= h <= 6000, (w, h)
    text = Path(svg).read_text()
    assert text.lstrip().startswith("<?xml") and "</svg>" in text
    leftovers = [p.name for p in out_png.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temp files left behind: {leftovers}"


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
def test_figure_from_full_fixture(plot, tmp_path: Path) -> None:
    out = tmp_path / "figs" / f"{plot.__name__}.png"
    _check_outputs(plot(figure_summary(), out), out, min_w=800, min_h=500)


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "sizes, data",
    [({"nano": 5_500_000}, (1000, 4000)), ({"nano": 5_500_000}, (4000,)), (SIZES, (4000,))],
    ids=["one-size", "one-size-one-data", "one-data"],
)
def test_figure_from_degenerate_fixture(plot, sizes, data, tmp_path: Path) -> None:
    out = tmp_path / f"{plot.__name__}.png"
    _check_outputs(plot(figure_summary(sizes, data), out), out, min_w=800, min_h=500)


def test_figure_baselines_only_and_missing_tasks(tmp_path: Path) -> None:
    """No pretrained runs yet, and only some tasks evaluated: still draws (early-pipeline tables)."""
    df = figure_summary()
    df = df[(df["kind"] != "pretrained") & df["task"].isin(list(TASKS)[:5])]
    for plot in PLOTS:
        out = tmp_path / f"{plot.__name__}.png"
        _check_outputs(plot(df, out), out, min_w=800, min_h=500)


def test_figure_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_mean_auc_vs_params(figure_summary().iloc[:0], tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_mean_auc_vs_params(figure_summary(), tmp_path / "a.svg")


def test_figure_rerun_overwrites_identically(tmp_path: Path) -> None:
    """Deterministic output (no dates in the SVG): reruns do not churn DVC-tracked figures."""
    out = tmp_path / "a.png"
    plot_mean_auc_vs_params(figure_summary(), out)
    first = (out.read_bytes(), out.with_suffix(".svg").read_bytes())
    plot_mean_auc_vs_params(figure_summary(), out)
    assert (out.read_bytes(), out.with_suffix(".svg").read_bytes()) == first


def test_task_examples_montage(tmp_path):
    from biovfm.analysis.figures import plot_task_examples
    from biovfm.data.synthetic import generate_task
    from biovfm.io import write_npz

    paths = []
    for flag in ("chestmnist", "pathmnist"):
        paths.append(tmp_path / f"{flag}_16.npz")
        write_npz(paths[-1], **generate_task(flag, 20, 20, 20, size=16, seed=0))
    png, svg = plot_task_examples(paths, tmp_path / "examples.png", per_task=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000 and svg.stat().st_size > 0
