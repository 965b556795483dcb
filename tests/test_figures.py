"""Figures and report: each figure writes a real PNG + same-stem SVG, also for degenerate grids; the report builds."""
from __future__ import annotations

import functools
import struct
from pathlib import Path

import pandas as pd
import pytest

from biovfm.analysis.collect import analyse, draw
from biovfm.analysis.report import write_report
from test_scaling import B, SIZES, TASKS3, power, study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATS = pd.DataFrame({"task": list(TASKS3), "n_samples": [100, 300, 200], "dbi": [1.0, 2.0, 3.0],
                      "n_classes": [9, 14, 7], "gzip_median": [0.5, 0.6, 0.4], "pixel_entropy": [6.0, 5.0, 7.0],
                      "imbalance": [1.2, 3.0, 6.0], "modality": ["histology", "xray", "dermoscopy"],
                      "label_type": ["multi-class", "multi-label, binary-class", "multi-class"]})
STUDY = {"source": "synthetic", "image_size": 28, "modalities": {"all": ["ct", "xray"], "xray": ["xray"]}}


@functools.lru_cache(maxsize=None)
def _tables(sizes: tuple, data: tuple, methods: tuple, extra: tuple) -> dict:
    summary, reps = study(power, sizes=dict(sizes), data=data, methods=methods, extra=extra)
    return analyse(summary, reps, STATS, STUDY, n_boot=B)


def tables(sizes=SIZES, data=(500, 4500), methods=("mae",), extra=()) -> dict:
    """Analysis tables of a fixture study, computed once per set of arguments (figures never modify them)."""
    return _tables(tuple(sizes.items()), tuple(data), tuple(methods), tuple(tuple(e) for e in extra))


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


def _check_all(figs: dict, out: Path) -> None:
    assert len(figs) == 9
    for png in figs.values():
        _check_outputs((png, png.with_suffix(".svg")), png, min_w=600, min_h=250)


def test_every_figure_and_the_report_from_a_full_fixture(tmp_path: Path) -> None:
    t = tables(methods=("mae", "dino"), extra=[("mae", "nano", "xray", 500)])
    figs = draw(t, tmp_path / "figs")
    _check_all(figs, tmp_path)
    for png in figs.values():
        assert png.stat().st_size > 15_000, png  # drew something, not an empty frame
    html = write_report(tmp_path / "report.html", headline={"n_models": 10}, tables=t, figures=figs,
                        missing=["results/runs/dino/micro/all/n4500/s0/eval.json"], notes=[], study=STUDY).read_text()
    for title in ("A. Mean AUC", "B. Per-task", "C/D.", "E. Pretraining data", "F. Task factors", "Compute view",
                  "Extrapolation check", "Label efficiency", "Missing evaluations", "dino/micro/all/n4500",
                  "Not comparable"):
        assert title in html, title
    assert html.count("data:image/png;base64,") == 9 and "<script" not in html


@pytest.mark.parametrize(
    "sizes, data",
    [({"nano": 3.2e6}, (500, 4500)), ({"nano": 3.2e6}, (4500,)), (SIZES, (4500,))],
    ids=["one-size", "one-size-one-data", "one-data"],
)
def test_figures_from_degenerate_grids(sizes, data, tmp_path: Path) -> None:
    _check_all(draw(tables(sizes=sizes, data=data), tmp_path), tmp_path)


def test_figure_rejects_bad_inputs(tmp_path: Path) -> None:
    from biovfm.analysis.figures import plot_mean_auc_vs_params

    t = tables()
    with pytest.raises(ValueError, match="empty"):
        plot_mean_auc_vs_params(t["points"].table.iloc[:0], t["fits"], tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_mean_auc_vs_params(t["points"], t["fits"], tmp_path / "a.svg")


def test_figures_and_report_rerun_identically(tmp_path: Path) -> None:
    """Deterministic output (no dates in SVG/HTML): reruns do not churn DVC-tracked files."""
    t = tables()

    def run(d: Path) -> dict[str, bytes]:
        figs = draw(t, d)
        write_report(d / "r.html", headline={"n_models": 1}, tables=t, figures=figs, missing=[], notes=[], study=STUDY)
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}

    assert run(tmp_path / "a") == run(tmp_path / "b")


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


def test_paper_comparison_for_a_comparable_run() -> None:
    """Real MedMNIST at 224 px with the paper's ViT-T..L: our AUCs sit next to the paper's, one row per model
    and task of each method's main series (the largest data size), even with several data sizes."""
    summary, reps = study(power, sizes={"tiny": 5.5e6, "small": 2.2e7, "base": 8.6e7, "large": 3.0e8},
                          methods=("mae", "dino"))
    t = analyse(summary, reps, STATS, {"source": "medmnist", "image_size": 224, "modalities": {}}, n_boot=B)
    cmp_ = t["paper_comparison"]
    assert len(cmp_) == 2 * 4 * (len(TASKS3) + 1)
    row = cmp_[(cmp_["method"] == "mae") & (cmp_["model"] == "large") & (cmp_["task"] == "chestmnist")].iloc[0]
    assert row["paper"] == 78.66 and row["diff"] == pytest.approx(row["ours"] - 78.66)
    assert t["paper_note"].startswith("Comparable")


def test_label_efficiency_figure_draws_every_fraction_baseline_and_knn(tmp_path: Path) -> None:
    from biovfm.analysis.figures import plot_label_efficiency

    rows = []
    for kind, method, model, n, base in (("pretrained", "mae", "pico", 500, 0.70), ("pretrained", "mae", "nano", 500, 0.72),
                                         ("pretrained", "dino", "pico", 500, 0.71), ("random_init", "", "pico", 0, 0.6),
                                         ("random_init", "", "nano", 0, 0.61), ("raw_pixels", "", "", 0, 0.65)):
        for probe, f in (("logreg", 0.01), ("logreg", 0.1), ("logreg", 1.0), ("knn", 1.0)):
            auc = base - (0.1 if f == 0.01 else 0.05 if f == 0.1 else 0) - (0.03 if probe == "knn" else 0)
            rows.append({"kind": kind, "method": method, "model": model, "modality": "all" if method else "",
                         "data_size": n, "params_encoder": {"pico": 2e5, "nano": 6e5}.get(model, 0), "probe": probe,
                         "label_fraction": f, "auc": auc, "auc_lo": auc - 0.01, "auc_hi": auc + 0.01})
    png, svg = plot_label_efficiency(pd.DataFrame(rows), tmp_path / "label_efficiency.png")
    _check_outputs((png, svg), png, min_w=600, min_h=250)
    text = svg.read_text()
    for label in ("1%", "10%", "100%", "nano kNN", "raw pixels", "pico random init", "MAE", "DINO"):
        assert label in text, label
