"""Aggregate stage: the tidy summary table, read from the MLflow runs that this DAG's outputs name."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from biovfm import tracking
from biovfm.io import read_json, write_json, write_text

SUMMARY_COLUMNS = ["run_id", "kind", "method", "model", "modality", "data_size", "seed", "task", "auc", "acc",
                   "params_encoder", "params_paper", "flops_per_image", "images_seen", "train_steps", "mlflow_run_id"]


def summary_from_runs(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluated model x task, from MLflow evaluation runs (params are strings, metrics floats)."""
    rows = []
    for r in runs:
        tags, m = r["tags"], r["metrics"]
        kind = tags["kind"]
        for key, auc in m.items():
            if not key.startswith("auc."):
                continue
            task = key[len("auc."):]
            rows.append({
                "run_id": tags["grid_id"], "kind": kind,
                "method": tags.get("method", ""),
                "model": tags.get("model", ""),
                "modality": tags.get("modality", ""),
                "data_size": int(float(tags.get("data_size", 0))), "seed": int(float(tags.get("seed", 0))),
                "task": task, "auc": auc, "acc": m[f"acc.{task}"],
                "params_encoder": int(m.get("params_encoder", 0)), "params_paper": int(m.get("params_paper", 0)),
                "flops_per_image": m.get("flops_per_image", 0.0), "images_seen": int(m.get("images_seen", 0)),
                "train_steps": int(m.get("train_steps", 0)), "mlflow_run_id": r["run_id"],
            })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS).sort_values(["kind", "method", "model", "data_size", "seed", "task"], ignore_index=True)


def aggregate(eval_jsons: list[str | Path], uri: str, out_dir: str | Path) -> dict[str, Any]:
    from biovfm.analysis import figures, fits

    t0 = time.perf_counter()
    out = Path(out_dir)
    evals = [read_json(p) for p in eval_jsons]
    runs = tracking.fetch_runs(uri, [e["mlflow_run_id"] for e in evals])
    summary = summary_from_runs(runs)
    write_text(out / "summary.csv", summary.to_csv(index=False))
    means = fits.mean_auc_table(summary)
    write_text(out / "mean_auc.csv", means.to_csv(index=False))
    slopes = fits.model_size_slopes(summary)
    write_text(out / "slopes.csv", slopes.to_csv(index=False))
    data_slopes = fits.data_size_slopes(summary)
    write_text(out / "data_slopes.csv", data_slopes.to_csv(index=False))
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures.plot_mean_auc_vs_params(summary, fig_dir / "mean_auc_vs_params.png")
    figures.plot_task_grid(summary, fig_dir / "task_grid.png")
    figures.plot_auc_vs_data_size(summary, fig_dir / "auc_vs_data_size.png")
    headline = headline_numbers(means, slopes)
    headline["aggregate_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out / "summary.json", headline)
    print(f"[aggregate] {len(runs)} evaluation runs, {len(summary)} rows -> {out / 'summary.csv'}", flush=True)
    return headline


def headline_numbers(means: pd.DataFrame, slopes: pd.DataFrame) -> dict[str, Any]:
    """The DVC metric: mean AUC per evaluated model and the mean-AUC slope per series."""
    mean_col = "mean_auc"
    by_run = {str(r["run_id"]): round(float(r[mean_col]), 5) for _, r in means.iterrows()}
    mean_slopes = slopes[slopes["task"] == "mean"]
    slope_rows = {}
    for _, r in mean_slopes.iterrows():
        key = f"{r['kind']}/{r['method']}/{r['modality'] or '-'}/n{int(r['data_size'])}"
        slope_rows[key] = None if pd.isna(r["slope"]) else round(float(r["slope"]), 5)
    return {"mean_auc": by_run, "slope_mean_auc_vs_params": slope_rows, "n_models": len(by_run)}
