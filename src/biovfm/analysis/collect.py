"""Aggregate stage: tables, fits, figures and the report, from the MLflow runs that this DAG's outputs name.

Reads each evaluation's ``eval.json`` (for its MLflow run) and ``scores.npz`` (test scores, for the
bootstrap); everything else is derived here. Evaluations that are missing (a failed job, a partial
run) are listed in the report instead of stopping the analysis.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biovfm import tracking
from biovfm.analysis import scaling
from biovfm.analysis.bootstrap import N_BOOT, metric_replicates
from biovfm.analysis.fits import MEAN_TASK
from biovfm.evaluate.scores import parse_variant, read_variant_scores, scores_path, variant_name
from biovfm.io import read_json, write_json, write_text

SUMMARY_COLUMNS = ["run_id", "kind", "method", "model", "modality", "data_size", "seed", "task", "probe",
                   "label_fraction", "primary", "auc", "acc", "majority_acc", "params_encoder", "params_paper",
                   "flops_per_image", "train_flops", "images_seen", "train_steps", "mlflow_run_id"]
FACTORS = ("n_samples", "dbi", "n_classes", "gzip_median", "pixel_entropy", "imbalance")
LEGACY_VARIANT = "paper"  # a run of an older version logged one estimator, the paper's head, as auc.<task>


def _run_variants(metrics: dict[str, float]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{variant: {task: (auc, acc)}}`` from an evaluation run's metrics (``auc_<variant>.<task>``)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for key, auc in metrics.items():
        head, _, task = key.rpartition(".")
        if head.startswith("auc_") and f"acc_{head[4:]}.{task}" in metrics:
            out.setdefault(head[4:], {})[task] = (auc, metrics[f"acc_{head[4:]}.{task}"])
    if not out:
        out[LEGACY_VARIANT] = {k[4:]: (v, metrics[f"acc.{k[4:]}"]) for k, v in metrics.items() if k.startswith("auc.")}
    return out


def summary_from_runs(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluated model x task x estimator (probe and label fraction), from MLflow evaluation runs
    (params are strings, metrics floats). ``primary`` marks the study's estimator at all labels."""
    rows = []
    for r in runs:
        tags, m = r["tags"], r["metrics"]
        primary = tags.get("primary_probe", LEGACY_VARIANT)
        for variant, per_task in _run_variants(m).items():
            probe, fraction = parse_variant(variant)
            for task, (auc, acc) in per_task.items():
                rows.append({
                    "run_id": tags["grid_id"], "kind": tags["kind"],
                    "method": tags.get("method", ""),
                    "model": tags.get("model", ""),
                    "modality": tags.get("modality", ""),
                    "data_size": int(float(tags.get("data_size", 0))), "seed": int(float(tags.get("seed", 0))),
                    "task": task, "probe": probe, "label_fraction": fraction, "primary": variant == primary,
                    "auc": auc, "acc": acc, "majority_acc": m.get(f"majority_acc.{task}", np.nan),
                    "params_encoder": int(m.get("params_encoder", 0)), "params_paper": int(m.get("params_paper", 0)),
                    "flops_per_image": m.get("flops_per_image", 0.0), "train_flops": m.get("train_flops", 0.0),
                    "images_seen": int(m.get("images_seen", 0)), "train_steps": int(m.get("train_steps", 0)),
                    "mlflow_run_id": r["run_id"],
                })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS).sort_values(
        ["kind", "method", "model", "data_size", "seed", "task", "probe", "label_fraction"],
        ascending=[True] * 7 + [False], ignore_index=True)


Replicates = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (MLflow run, task) -> (AUC, ACC) replicates


def _task_replicates(job: tuple) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """One task's bootstrap (a worker process's unit of work) and its seconds."""
    t0 = time.perf_counter()
    y, named, task_type, task, n_boot = job
    return metric_replicates(y, named, task_type, key=task, n_boot=n_boot), time.perf_counter() - t0


def bootstrap_replicates(evals: list[tuple[Path, dict]], task_types: dict[str, str], n_boot: int = N_BOOT,
                         workers: int = 1) -> tuple[dict[str, Replicates], list[str]]:
    """AUC/ACC replicates per estimator variant and (MLflow run, task) from each evaluation's scores.npz, task by
    task so that every model and estimator of a task shares its resamples (paired); tasks run in ``workers``
    processes (the replicates do not depend on it). Returns the replicates by variant and notes on what was
    missing."""
    by_task: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    notes = []
    for path, ev in evals:
        sp = scores_path(path)
        if not sp.exists():
            notes.append(f"{sp} missing: no intervals for {ev['run_id']}")
            continue
        for variant, per_task in read_variant_scores(path, list(ev["tasks"])).items():
            for task, (s, y) in per_task.items():
                by_task.setdefault(task, {})[(ev["mlflow_run_id"], variant)] = s
                if task in labels and not np.array_equal(labels[task], y):
                    raise ValueError(f"{sp}: test labels of {task} differ from another evaluation's; "
                                     "the bootstrap pairs models on one test set (rerun the evaluations)")
                labels[task] = y
    reps: dict[str, Replicates] = {}
    jobs = [(labels[task], {f"{run}|{variant}": s for (run, variant), s in scores.items()}, task_types[task], task,
             n_boot) for task, scores in by_task.items()]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:  # spawn: a forked copy of a process with torch/OpenMP state can hang
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")))
            results = pool.map(_task_replicates, jobs)
        else:
            results = map(_task_replicates, jobs)
        for (task, scores), (got, seconds) in zip(by_task.items(), results):
            for (run, variant) in scores:
                reps.setdefault(variant, {})[(run, task)] = got[f"{run}|{variant}"]
            print(f"[aggregate] bootstrap {task}: {len(scores)} models x estimators x {n_boot} resamples of "
                  f"{len(labels[task])} test images in {seconds:.1f}s", flush=True)
    return reps, notes


def _task_types(evals: list[tuple[Path, dict]]) -> dict[str, str]:
    from biovfm.data.medmnist import TASKS

    types = {t: info.task for t, info in TASKS.items()}
    for _, ev in evals:  # custom tasks carry their type in eval.json
        for task, r in ev["tasks"].items():
            if "task_type" in r:
                types[task] = r["task_type"]
    return types


def _estimator_columns(summary: pd.DataFrame) -> pd.DataFrame:
    """A summary with the estimator columns (a table without them holds one estimator: the primary)."""
    defaults = {"probe": LEGACY_VARIANT, "label_fraction": 1.0, "primary": True}
    return summary.assign(**{k: v for k, v in defaults.items() if k not in summary.columns})


def split_estimators(summary: pd.DataFrame, reps: dict) -> dict[str, tuple[pd.DataFrame, Replicates]]:
    """Summary rows and bootstrap replicates per estimator variant, plus ``"primary"``: the rows marked primary.

    ``reps`` is :func:`bootstrap_replicates`' ``{variant: {(run, task): replicates}}``; a flat
    ``{(run, task): replicates}`` is taken as the replicates of a one-estimator summary."""
    summary = _estimator_columns(summary)
    flat = not reps or all(isinstance(k, tuple) for k in reps)
    out: dict[str, tuple[pd.DataFrame, Replicates]] = {}
    prim_rows, prim_reps = [], {}
    for (probe, fraction), g in summary.groupby(["probe", "label_fraction"], sort=True):
        name = variant_name(probe, fraction)
        r = reps if flat else reps.get(name, {})
        out[name] = (g.reset_index(drop=True), r)
        p = g[g["primary"].astype(bool)]
        if len(p):
            prim_rows.append(p)
            prim_reps |= r  # the primary rows are one variant's: its replicates are theirs
    out["primary"] = (pd.concat(prim_rows, ignore_index=True) if prim_rows else summary.iloc[:0], prim_reps)
    return out


def primary_probe(summary: pd.DataFrame) -> str:
    """The name of the study's primary estimator (the probe of the rows marked primary)."""
    s = _estimator_columns(summary)
    probes = s.loc[s["primary"].astype(bool), "probe"].unique()
    return str(probes[0]) if len(probes) else LEGACY_VARIANT


def analyse(summary: pd.DataFrame, reps: dict, stats: pd.DataFrame, study: dict, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Every analysis table from the summary, the bootstrap replicates and the task characteristics (pure).

    The scaling analysis (points, fits, slopes, figures) reads the primary estimator; the other estimators (the
    paper's head, the label fractions, kNN) feed the probe-fidelity check, label efficiency and their own fits."""
    from biovfm.analysis import estimators, paper
    from biovfm.analysis.taskstats import factor_correlations

    parts = split_estimators(summary, reps)
    prim_summary, prim_reps = parts.pop("primary")
    primary = primary_probe(summary)
    points = scaling.build_points(prim_summary, prim_reps, n_boot)
    fits = scaling.fit_table(points).assign(probe=primary, label_fraction=1.0)
    variants = {name: scaling.build_points(s, r, n_boot) for name, (s, r) in parts.items()}
    variant_fits = pd.concat([scaling.fit_table(v, axes=scaling.PARAM_AXES).assign(
        probe=parse_variant(name)[0], label_fraction=parse_variant(name)[1])
        for name, v in variants.items() if name != primary] or [pd.DataFrame(columns=fits.columns)], ignore_index=True)
    slopes, slope_reps = scaling.task_slopes(fits, points)
    corr = pd.DataFrame()
    if len(stats) and len(slopes):
        corr = factor_correlations(slopes[["task", "method", "slope"]], stats)
        corr = corr.merge(scaling.correlation_intervals(slopes, slope_reps, stats, FACTORS), on=["method", "factor"], how="left")
    comparable, why = paper.comparable(study.get("source", ""), int(study.get("image_size", 0)))
    fidelity, fidelity_summary = estimators.probe_fidelity(variants.get("paper"), variants.get("logreg"))
    label_curve, _ = estimators.label_efficiency(variants, primary)
    paper_points = variants.get("paper", points)  # the paper comparison reads the paper's head
    return {"points": points, "fits": fits, "variant_fits": variant_fits, "task_slopes": slopes, "correlations": corr,
            "task_stats": stats, "primary_probe": primary,
            "data_comparison": scaling.data_comparison(points, study.get("modalities", {})),
            "compute_frontier": scaling.compute_frontier(points), "recommendations": scaling.recommend(points),
            "paper_comparison": paper.paper_comparison(_main_points(paper_points)) if comparable else pd.DataFrame(),
            "paper_slopes": paper.slope_comparison(pd.concat([fits, variant_fits], ignore_index=True),
                                                   scaling.main_series(points), primary),
            "paper_note": why, "probe_fidelity": fidelity, "probe_fidelity_summary": fidelity_summary,
            "below_majority": estimators.below_majority(_estimator_columns(summary), variants),
            "label_efficiency": label_curve,
            "label_sentence": estimators.label_gain_sentence(label_curve, primary) if len(label_curve) else ""}


def _main_points(points: scaling.Points) -> pd.DataFrame:
    """Pretrained points of each method's main series (one row per model and task): what the paper reports."""
    main = scaling.main_series(points)
    return points.table.merge(main.assign(kind="pretrained"), on=["kind", "method", "modality", "data_size"])


def draw(t: dict[str, Any], fig_dir: Path) -> dict[str, Path]:
    """Every figure (PNG + SVG) of the analysis tables; returns the PNG paths by figure name."""
    from biovfm.analysis import figures

    points, fits = t["points"], t["fits"]
    made = {
        "mean_auc_vs_params": figures.plot_mean_auc_vs_params(points, fits, fig_dir / "mean_auc_vs_params.png"),
        "task_grid": figures.plot_task_grid(points, fits, fig_dir / "task_grid.png"),
        "task_slopes": figures.plot_task_slopes(t["task_slopes"], fig_dir / "task_slopes.png"),
        "data_comparison": figures.plot_data_comparison(t["data_comparison"], fig_dir / "data_comparison.png"),
        "auc_vs_data_size": figures.plot_auc_vs_data_size(points, fig_dir / "auc_vs_data_size.png"),
        "factor_correlations": figures.plot_factor_correlations(t["correlations"], t["task_slopes"], t["task_stats"],
                                                                fig_dir / "factor_correlations.png"),
        "compute_frontier": figures.plot_compute_frontier(t["compute_frontier"], t["recommendations"],
                                                          fig_dir / "compute_frontier.png"),
        "extrapolation": figures.plot_extrapolation(fits, fig_dir / "extrapolation.png"),
    }
    made["label_efficiency"] = figures.plot_label_efficiency(t["label_efficiency"], fig_dir / "label_efficiency.png")
    return {k: v[0] for k, v in made.items()}


TABLES = ("task_slopes", "correlations", "data_comparison", "compute_frontier", "recommendations", "paper_comparison",
          "paper_slopes", "probe_fidelity", "probe_fidelity_summary", "below_majority", "label_efficiency")


def aggregate(eval_jsons: list[str | Path], uri: str, out_dir: str | Path, study: dict | None = None,
              task_stats: str | Path | None = None, n_boot: int = N_BOOT,
              corpus_report: str | Path | None = None, experiment: str | None = None, workers: int = 1) -> dict[str, Any]:
    """The aggregate stage: read, analyse, draw, report. ``study`` holds params' data.source,
    data.image_size and modalities; eval.json files that do not exist are reported as missing. The corpus
    report (the preprocess stage's report.json) tells the report what the corpus left out. With ``experiment``,
    an MLflow run of the stage holds the report, figures and tables as artifacts and the headline as metrics."""
    from biovfm.analysis import report

    t0, started_ms = time.perf_counter(), int(time.time() * 1000)
    study = study or {}
    out = Path(out_dir)
    present = [Path(p) for p in eval_jsons if Path(p).exists()]
    missing = [str(p) for p in eval_jsons if not Path(p).exists()]
    if not present:
        raise FileNotFoundError(f"no evaluation results among {len(eval_jsons)} expected eval.json files; "
                                "run the evaluate jobs first (snakemake --cores all)")
    evals = [(p, read_json(p)) for p in present]
    runs = tracking.fetch_eval_runs(uri, [e for _, e in evals])
    summary = summary_from_runs(runs)
    write_text(out / "summary.csv", summary.to_csv(index=False))
    reps, notes = bootstrap_replicates(evals, _task_types(evals), n_boot, workers)
    stats = pd.read_csv(task_stats) if task_stats else pd.DataFrame({"task": []})
    t = analyse(summary, reps, stats, study, n_boot)
    write_text(out / "tables" / "points.csv", t["points"].table.to_csv(index=False))
    for name in TABLES:
        write_text(out / "tables" / f"{name}.csv", t[name].to_csv(index=False))
    write_text(out / "fits.csv", pd.concat([t["fits"], t["variant_fits"]], ignore_index=True).to_csv(index=False))
    figs = draw(t, out / "figures")
    headline = headline_numbers(t["points"], t["fits"], t["recommendations"])
    headline |= estimator_numbers(t)
    headline["missing_evaluations"] = missing
    report.write_report(out / "report.html", headline=headline, tables=t, figures=figs, missing=missing, notes=notes,
                        study=study, corpus=read_json(corpus_report) if corpus_report else None)
    write_json(out / "summary.json", headline)
    if experiment:
        log_aggregate_run(uri, experiment, out, headline, [r["run_id"] for r in runs], started_ms)
    print(f"[aggregate] {len(runs)} evaluation runs ({len(missing)} missing), {len(summary)} rows, "
          f"{len(t['fits'])} fits in {time.perf_counter() - t0:.1f}s -> {out / 'report.html'}", flush=True)
    return headline


def headline_metrics(headline: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers as MLflow metrics: per series the mean-AUC slope (and interval) on both parameter axes,
    per model its mean AUC, the paper head's mean gap to the reference, the number of models."""
    m: dict[str, float] = {"n_models": headline["n_models"]}
    for key, s in headline["slope_mean_auc_vs_params"].items():
        m |= {f"slope.{key}": s["slope"], f"slope_lo.{key}": s["lo"], f"slope_hi.{key}": s["hi"]}
        if "paper_axis" in s:
            m[f"slope_paper_axis.{key}"] = s["paper_axis"]["slope"]
    m |= {f"mean_auc.{name}": v["auc"] for name, v in headline["mean_auc"].items()}
    fid = headline.get("probe_fidelity_paper_minus_reference", {}).get(MEAN_TASK)
    if fid:
        m |= {"paper_minus_reference.mean": fid["diff"], "paper_minus_reference.lo": fid["lo"],
              "paper_minus_reference.hi": fid["hi"]}
    return {k: float(v) for k, v in m.items() if v is not None}


def log_aggregate_run(uri: str, experiment: str, out: Path, headline: dict[str, Any], eval_run_ids: list[str],
                      started_ms: int) -> str | None:
    """One MLflow run for the aggregate stage: the report, figures, tables and summaries as artifacts, the headline
    as metrics, tagged with the evaluation runs it read. Logged once per content: rebuilding the same aggregate
    (e.g. from DVC-pulled outputs) finds its run and leaves the store as it was. Tracking must not fail the
    stage: a warning at worst."""
    try:
        key = tracking.job_key("aggregate", "aggregate", tracking.fingerprint(
            {"headline": headline, "evaluation_runs": sorted(eval_run_ids)}))
        if (done := tracking.finished_run(uri, experiment, key)) is not None:
            print(f"[aggregate] MLflow already holds this aggregate (run {done}); not logged again", flush=True)
            return done
        run = tracking.Run(uri, experiment, name="aggregate", tags={"stage": "aggregate", "grid_id": "aggregate",
                                                                    "n_evaluations": str(len(eval_run_ids))},
                           params={"evaluation_runs": ",".join(sorted(eval_run_ids))[:6000]}, key=key,
                           start_time=started_ms)
        run.log_metrics(headline_metrics(headline))
        files = [(out / name, "") for name in ("report.html", "summary.csv", "summary.json", "fits.csv")]
        files += [(f, "tables") for f in sorted((out / "tables").glob("*.csv"))]
        files += [(f, "figures") for f in sorted((out / "figures").glob("*.png"))]
        run.log_artifacts((f, d) for f, d in files if f.is_file())
        run.finish()
        return run.run_id
    except Exception as e:  # noqa: BLE001 - the outputs on disk are complete; MLflow is a view of them
        print(f"[aggregate] warning: aggregate run not logged to MLflow ({type(e).__name__}: {e})", flush=True)
        return None


def estimator_numbers(t: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of the estimators: the paper's head minus the reference (per task and mean, with paired
    intervals) and the task-mean AUC of every model at each label fraction and with kNN."""
    fid = {r["task"]: {"diff": _r(r["diff"]), "lo": _r(r["diff_lo"]), "hi": _r(r["diff_hi"]), "n_models": int(r["n_models"]),
                       "n_lower": int(r["n_lower"])} for _, r in t["probe_fidelity_summary"].iterrows()}
    curves: dict[str, dict[str, float | None]] = {}
    for _, r in t["label_efficiency"].iterrows():
        name = "/".join(str(v) for v in (r["kind"], r["method"] or "-", r["model"] or "-", r["modality"] or "-",
                                         f"n{int(r['data_size'])}"))
        label = "knn" if r["probe"] == "knn" else f"{100 * r['label_fraction']:g}%"
        curves.setdefault(name, {})[label] = _r(r["auc"])
    return {"primary_probe": t["primary_probe"], "probe_fidelity_paper_minus_reference": fid,
            "label_efficiency_mean_auc": curves, "label_efficiency": t.get("label_sentence", "")}


def _r(v: Any, nd: int = 5) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), nd)


def headline_numbers(points: scaling.Points, fits: pd.DataFrame, recs: pd.DataFrame) -> dict[str, Any]:
    """The DVC metric: mean AUC (with interval) per evaluated model, and per method the mean-AUC slope vs
    parameters with its interval, the selected law and whether the law predicted the largest model."""
    tab = points.table[points.table["task"] == MEAN_TASK]
    mean_auc = {}
    for _, r in tab.iterrows():
        name = "/".join(str(v) for v in (r["kind"], r["method"], r["model"] or "-", r["modality"] or "-", f"n{int(r['data_size'])}"))
        mean_auc[name] = {"auc": _r(r["auc"]), "lo": _r(r["auc_lo"]), "hi": _r(r["auc_hi"])}
    slopes = {}
    sel = fits[(fits["axis"] == "params") & (fits["task"] == MEAN_TASK)]
    paper_axis = fits[(fits["axis"] == "params_paper") & (fits["task"] == MEAN_TASK) & (fits["form"] == "loglog")]
    for _, r in sel[sel["form"] == "loglog"].iterrows():
        key = f"{r['kind']}/{r['method']}/{r['modality'] or '-'}/n{int(r['data_size'])}"
        chosen = sel[(sel["kind"] == r["kind"]) & (sel["method"] == r["method"]) & (sel["modality"] == r["modality"])
                     & (sel["data_size"] == r["data_size"]) & (sel["selected"] == True)]  # noqa: E712
        slopes[key] = {"slope": _r(r["slope"]), "lo": _r(r.get("slope_lo")), "hi": _r(r.get("slope_hi")),
                       "selected_form": chosen["form"].iloc[0] if len(chosen) else None,
                       "extrapolation_holds": None if pd.isna(r.get("extrap_holds")) else bool(r["extrap_holds"])}
        pa = paper_axis[(paper_axis["kind"] == r["kind"]) & (paper_axis["method"] == r["method"])
                        & (paper_axis["modality"] == r["modality"]) & (paper_axis["data_size"] == r["data_size"])]
        if len(pa):
            slopes[key]["paper_axis"] = {"slope": _r(pa["slope"].iloc[0]), "lo": _r(pa["slope_lo"].iloc[0]),
                                         "hi": _r(pa["slope_hi"].iloc[0])}
    return {"n_models": int(len(tab)), "mean_auc": mean_auc, "slope_mean_auc_vs_params": slopes,
            "recommendations": [{k: (v if not isinstance(v, float) else _r(v, 6)) for k, v in row.items()}
                                for row in recs.dropna(subset=["budget"]).to_dict("records")] if "budget" in recs else []}
