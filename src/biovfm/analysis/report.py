"""A self-contained HTML report of the study: headline numbers, every figure (embedded), the fits with
their intervals, the extrapolation check, the compute recommendation, the comparison with the paper,
and what is missing. One file, no scripts, no network: open it in any browser or attach it to a paper."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from biovfm.analysis.fits import AUC_SCALE, MEAN_TASK
from biovfm.analysis.paper import PROTOCOL_DIFFERENCES
from biovfm.io import write_text

CAPTIONS = {
    "mean_auc_vs_params": ("A. Mean AUC vs model size",
                           "Mean linear-probe test AUC over the tasks against encoder parameters, per method and "
                           "pretraining set. Error bars: 95% bootstrap intervals over the test set (and seeds). Dashed: the "
                           "paper's log-log power law, slope and 95% CI in the legend; dotted: the saturating law where "
                           "held-out error selects it. Grey: random-init encoders; long dashes: the raw-pixel probe."),
    "task_grid": ("B. Per-task AUC vs model size", "The same for every task, one panel each."),
    "task_slopes": ("C/D. Per-task slopes", "Log-log slope of AUC vs parameters per task, sorted, with 95% CIs, for "
                    "the largest pretraining set of each method. Wide intervals crossing 0: the task does not "
                    "resolve a trend at this test-set size."),
    "data_comparison": ("E. Pretraining data", "Mean AUC of one (method, model) pretrained on a single modality, on a "
                        "size-matched mix of modalities, and on the full corpus."),
    "auc_vs_data_size": ("Mean AUC vs pretraining images", "One line per method and model; dotted: random init of "
                         "the same size. The step count is fixed, so more images means fewer repeats, not more compute."),
    "factor_correlations": ("F. Task factors vs scaling slope", "Pearson r between a task characteristic and the "
                            "per-task slope (95% CI from refitting slopes on test-set resamples); η for categorical "
                            "factors. With 12 tasks, r must lie beyond ±0.58 for p < 0.05."),
    "compute_frontier": ("Compute view", "Mean AUC vs measured pretraining FLOPs; the frontier joins runs no cheaper "
                         "run beats; crosses: the joint law's prediction at the recommended model size per budget."),
    "label_efficiency": ("Label efficiency", "Mean test AUC of the primary probe trained on a stratified, nested "
                         "fraction of each task's training labels (validation and test sets whole), per model size; dotted: "
                         "random-init encoders of the same size; dashed: raw pixels; stars: kNN with all labels."),
    "extrapolation": ("Extrapolation check", "Each law fitted without the largest point predicts it. A ✗ marks a "
                      "law whose paired 95% interval of (predicted - observed) excludes 0: do not plan a bigger "
                      "run with it."),
}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}.bad{color:#b00}figure{margin:1.5em 0}figcaption{font-size:13px;color:#444}"""
LEAKED_SHOWN = 20  # corpus images left out as val/test copies listed in the report (report.json lists more)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"
    return html.escape(str(v))


def _table(df: pd.DataFrame, cols: list[str] | None = None, left: tuple[str, ...] = ()) -> str:
    if df is None or len(df) == 0:
        return "<p class='note'>(empty)</p>"
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    head = "".join(f"<th class='{'l' if c in left else ''}'>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td class='{'l' if c in left else ''}'>{_fmt(r[c])}</td>" for c in cols) + "</tr>"
                   for r in df[cols].to_dict("records"))
    return f"<table><tr>{head}</tr>{body}</table>"


def _ci(v: float, lo: float, hi: float, scale: float = 1.0, nd: int = 4) -> str:
    if v is None or pd.isna(v):
        return "n/a"
    s = f"{scale * v:.{nd}f}"
    return s + (f" [{scale * lo:.{nd}f}, {scale * hi:.{nd}f}]" if lo is not None and not pd.isna(lo) else "")


def _headline(points: pd.DataFrame, fits: pd.DataFrame) -> str:
    mean = fits[(fits["axis"] == "params") & (fits["task"] == MEAN_TASK) & (fits["kind"] == "pretrained")]
    rows = []
    for _, r in mean[(mean["form"] == "loglog") & (mean["n_points"] >= 2)].iterrows():
        sat = mean[(mean["method"] == r["method"]) & (mean["modality"] == r["modality"]) &
                   (mean["data_size"] == r["data_size"]) & (mean["form"] == "saturating")]
        chosen = "saturating" if len(sat) and bool(sat["selected"].iloc[0]) else "loglog"
        holds = r.get("extrap_holds")
        rows.append({"method": r["method"], "corpus": f"{r['modality']} n={int(r['data_size'])}",
                     "slope [95% CI]": _ci(r["slope"], r.get("slope_lo"), r.get("slope_hi")),
                     "R²": r["r2"], "selected form": chosen,
                     "extrapolation holds": "" if pd.isna(holds) else ("yes" if holds else "NO"), "note": r["note"]})
    best = points[(points["task"] == MEAN_TASK)].sort_values("auc", ascending=False).head(8)
    best = best.assign(**{"mean AUC ×100 [95% CI]": [_ci(a, lo, hi, AUC_SCALE, 2) for a, lo, hi in
                                                    zip(best["auc"], best["auc_lo"], best["auc_hi"])]})
    return ("<h2>Headline</h2><h3>Mean-AUC slope vs encoder parameters</h3>"
            + _table(pd.DataFrame(rows), left=("method", "corpus", "selected form", "note"))
            + "<h3>Best models by mean AUC</h3>"
            + _table(best, ["kind", "method", "model", "modality", "data_size", "mean AUC ×100 [95% CI]"],
                     left=("kind", "method", "model", "modality", "mean AUC ×100 [95% CI]")))


def _slopes_section(slopes: pd.DataFrame | None) -> str:
    """Our mean-AUC slope on both parameter axes beside the paper's (which is on the paper's axis)."""
    if slopes is None or slopes.empty:
        return ""
    rows = [{"method": r["method"], "estimator": r["estimator"], "corpus": f"{r['modality']} n={int(r['data_size'])}",
             "points": r["n_points"],
             "slope vs encoder parameters [95% CI]": _ci(r["slope_encoder"], r["slope_encoder_lo"], r["slope_encoder_hi"]),
             "slope vs the paper's axis [95% CI]": _ci(r["slope_paper_axis"], r["slope_paper_axis_lo"],
                                                      r["slope_paper_axis_hi"]),
             "paper (ViT-T..L, 224 px)": r["paper_slope"]} for _, r in slopes.iterrows()]
    return ("<h3>Slopes on both parameter axes, beside the paper's</h3><p class='note'>The paper fits ln(100 AUC) on "
            "ln(parameters of the MAE pretraining model, decoder included: 31.2/47.4/111.66/329.24 M), for DINOv2 too; "
            "the paper's-axis column uses the same count for our ladder. Slopes compare across studies only on the "
            "same axis and a comparable ladder: on a ladder of small encoders the fixed-size decoder dominates the "
            "paper's count, its range is narrow and its slopes are large and uncertain.</p>"
            + _table(pd.DataFrame(rows), left=("method", "estimator", "corpus")))


def _fidelity_section(t: dict[str, Any]) -> str:
    """The probe-fidelity check: the paper's head against the converged reference, on the same features."""
    summ = t.get("probe_fidelity_summary")
    if summ is None or summ.empty:
        return ""
    mean = summ[summ["task"] == MEAN_TASK].iloc[0]
    per = t["probe_fidelity"]
    per_model = per[per["task"] == MEAN_TASK]
    bad = t.get("below_majority", pd.DataFrame())
    floor = ("<p class='note'>No estimator scored below the majority-class accuracy on a binary task (beyond the 95% "
             "interval of its accuracy).</p>" if bad.empty
             else "<p class='bad'>Below the majority-class accuracy on a binary task (the whole 95% interval of the "
             "accuracy under it):</p>" + _table(bad, left=("kind", "method", "model", "modality", "task", "probe")))
    return ("<h2>Probe fidelity: the paper's head against the reference probe</h2>"
            f"<p>On the same cached features, the paper's head (LN, BN, Linear, AdamW) scores "
            f"{AUC_SCALE * mean['diff']:+.2f} AUC×100 [{AUC_SCALE * mean['diff_lo']:+.2f}, {AUC_SCALE * mean['diff_hi']:+.2f}] "
            f"against the converged L2 logistic regression (C tuned on validation AUC), averaged over "
            f"{int(mean['n_models'])} evaluated models; it is lower on {int(mean['n_lower'])} of them. The primary "
            f"estimator of this report is <b>{html.escape(str(t.get('primary_probe', '')))}</b>. Intervals: paired "
            "bootstrap over the test set.</p>"
            + _table(summ, left=("task",))
            + "<h3>Per evaluated model (task mean)</h3>"
            + _table(per_model, left=("kind", "method", "model", "modality", "task")) + floor)


def _leaked_list(corpus: dict) -> str:
    """The corpus images left out because they equal a validation/test image (which file:split[i] equals which)."""
    shown = [(f"{name}:{e['image']}", e["equals"]) for name, s in corpus["sources"].items()
             for e in s.get("leaked_images", [])][:LEAKED_SHOWN]
    if not shown:
        return ""
    more = corpus["leakage"]["val_test"] - len(shown)
    return ("<p>Left out of the corpus as copies of evaluation images (validation/test):</p><ul class='note'>"
            + "".join(f"<li><code>{html.escape(image)}</code> = <code>{html.escape(equals)}</code></li>"
                      for image, equals in shown)
            + (f"<li>and {more} more: data/processed/corpus/report.json lists them</li>" if more > 0 else "") + "</ul>")


def _data_section(corpus: dict | None, stats: pd.DataFrame) -> str:
    """What the corpus left out, and the evaluation tasks' own copies across splits (the probe trains on train)."""
    parts = ["<h2>Data: the pretraining corpus and copies across splits</h2>"]
    if corpus:
        srcs = pd.DataFrame([{"source": n, "kind": s["kind"], "read": s["read"], "duplicates": s["duplicates"],
                              "left out (val/test copies)": s["leaked"], "on_leak": s.get("on_leak", corpus["on_leak"]),
                              "kept": s["kept"]} for n, s in corpus["sources"].items()])
        parts.append(f"<p class='note'>{corpus['n_images']} pretraining images at {corpus['image_size']} px. Every "
                     "image is checked against every split of every evaluation task: one equal to a validation/test "
                     "image is never kept; duplicates are copies of an earlier corpus image.</p>"
                     + _table(srcs, left=("source", "kind", "on_leak")) + _leaked_list(corpus))
    copies = [c for c in ("val_in_train", "test_in_train") if c in stats.columns]
    if copies:
        parts.append("<p class='note'>Validation and test images pixel-identical to a train image of the same task "
                     "(as the benchmark ships them; kept, so that results compare with published ones). The probe is "
                     "trained on the train split, so it has seen these test images with their labels.</p>"
                     + _table(stats[["task", "n_train", *copies]], left=("task",)))
    return "".join(parts) if len(parts) > 1 else ""


def write_report(path: str | Path, *, headline: dict, tables: dict[str, Any], figures: dict[str, Path],
                 missing: list[str], notes: list[str], study: dict, corpus: dict | None = None) -> Path:
    """Write the report atomically from the analysis tables (:func:`biovfm.analysis.collect.analyse`) and the
    corpus report (``data/processed/corpus/report.json``, if given); figures are embedded (base64 PNG), so the
    file stands alone."""
    points, fits, slopes = tables["points"].table, tables["fits"], tables["task_slopes"]
    correlations, data_comparison = tables["correlations"], tables["data_comparison"]
    recommendations, paper_comparison, paper_note = tables["recommendations"], tables["paper_comparison"], tables["paper_note"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>BioVFM-Scale report</title><style>{STYLE}</style>"
             "</head><body><h1>BioVFM-Scale: scaling study report</h1>"]
    parts.append(f"<p class='note'>Data: {html.escape(str(study.get('source', '?')))} at {study.get('image_size', '?')} px; "
                 f"{headline['n_models']} evaluated models; {points['task'].nunique() - 1} tasks. "
                 "All intervals are 95% percentile bootstrap intervals over the test set (1,000 paired resamples; "
                 "seeds resampled too where there are several).</p>")
    if missing:
        parts.append("<h2 class='bad'>Missing evaluations</h2><p>These jobs have no result (failed or not run); "
                     "the analysis below leaves them out:</p><ul>"
                     + "".join(f"<li><code>{html.escape(m)}</code></li>" for m in missing) + "</ul>")
    if notes:
        parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append(_headline(points, fits))
    parts.append(_slopes_section(tables.get("paper_slopes")))
    parts.append(_fidelity_section(tables))
    parts.append(_data_section(corpus, tables["task_stats"]))
    for key, png in figures.items():
        title, caption = CAPTIONS.get(key, (key, ""))
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(f"<figure><h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        if key == "task_slopes":
            parts.append(_table(slopes, left=("method", "modality", "task", "note")))
        if key == "factor_correlations":
            parts.append(_table(correlations, left=("method", "factor", "kind", "note")))
        if key == "data_comparison":
            parts.append(_table(data_comparison, ["method", "model", "corpus", "auc", "auc_lo", "auc_hi"],
                                left=("method", "model", "corpus")))
        if key == "compute_frontier":
            parts.append("<h3>Recommended model and data size per compute budget</h3>"
                         + _table(recommendations, left=("method", "budget", "nearest_grid_model", "law", "note")))
        if key == "label_efficiency":
            parts.append(f"<p>{html.escape(tables.get('label_sentence', ''))}</p>"
                         + _table(tables["label_efficiency"], left=("kind", "method", "model", "modality", "probe")))
        if key == "extrapolation":
            ex = fits[fits["task"] == MEAN_TASK]
            parts.append(_table(ex, ["axis", "kind", "method", "modality", "data_size", "form", "n_points", "x_largest",
                                     "pred_largest", "pred_lo", "pred_hi", "obs_largest", "obs_lo", "obs_hi",
                                     "extrap_error", "extrap_lo", "extrap_hi", "extrap_holds", "note"],
                                left=("axis", "kind", "method", "modality", "form", "note")))
    parts.append("<h2>Fits of the mean AUC (all axes and forms)</h2><p class='note'>Every task's fits are in "
                 "<code>results/fits.csv</code>. loglog: ln(100 AUC) = intercept + slope ln x. saturating: "
                 "1 - AUC = a (x/x_ref)^-b + c. selected: lower leave-one-out error.</p>")
    parts.append(_table(fits[fits["task"] == MEAN_TASK],
                        ["axis", "kind", "method", "model", "modality", "data_size", "form", "selected", "n_points",
                         "slope", "slope_lo", "slope_hi", "a", "b", "b_lo", "b_hi", "c", "c_lo", "c_hi", "r2",
                         "loo_rmse", "note"], left=("axis", "kind", "method", "model", "modality", "form", "note")))
    parts.append("<h2>Comparison with the paper</h2>")
    if len(paper_comparison):
        parts.append("<p class='note'>Our AUC ×100 with its 95% CI next to the paper's digitised values "
                     "(BioVFM-21M, linear probe at 224 px).</p>" + _table(paper_comparison, left=("method", "model", "task")))
    else:
        parts.append(f"<p class='note'>Not comparable: {html.escape(paper_note)}</p>")
    parts.append("<p class='note'>Protocol differences that remain, even at 224 px on MedMNIST+:</p><ul class='note'>"
                 + "".join(f"<li>{html.escape(d)}</li>" for d in PROTOCOL_DIFFERENCES) + "</ul>")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
    return Path(path)
