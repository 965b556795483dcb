"""Linear-probe fidelity: the paper head (and variants of it) against an independent logistic regression.

For every (feature source, task) of a finished study the frozen features are extracted once, as the evaluate job
extracts them, and probed by

* ``fit_probe`` under several ``ProbeConfig`` variants (``paper``: the paper's protocol, ``probe.PAPER_PROBE``;
  ``default``: ``ProbeConfig()``; the others change some of the paper's choices, "+"-joined names from ``CHANGES``:
  the L2 value picked on validation AUC, the last epoch kept, a floor on optimiser steps, whitened training), and
* a reference: scikit-learn ``LogisticRegression`` (lbfgs, run to convergence) on StandardScaler-ed LayerNorm-ed
  features (the LN is the paper's frozen ``fc_norm``, part of the feature), C over 1e-4..1e3 in half-decades chosen
  on validation AUC (ties: lower validation log-loss); multi-label tasks one-vs-rest with one shared C.

It prints, per (source, task) and as means (per task; overall, encoders and raw pixels apart), each variant's
test AUC minus the reference's, and on binary tasks the test accuracy against the majority-class accuracy;
``--json`` keeps every number. Sources: the study's pretrained checkpoints
(``results/**/checkpoint.safetensors`` beside their ``run.json`` and ``config.json``) and, with ``--raw-pixels``,
the raw-pixel baseline's features. No network. Run from the study's directory, or pass it:

    PYTHONPATH=src python benchmarks/probe_fidelity.py /tmp/before --max-checkpoints 2 --raw-pixels
    PYTHONPATH=src python benchmarks/probe_fidelity.py . --max-checkpoints 0 --raw-pixels --tasks breastmnist
    PYTHONPATH=src python benchmarks/probe_fidelity.py . --variants paper whiten whiten+auc+last default
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from biovfm.config import ModelSpec
from biovfm.data.medmnist import BINARY, MULTI_LABEL, SPLITS, TASKS, TaskInfo, load_npz
from biovfm.evaluate import probe
from biovfm.evaluate.features import load_encoder
from biovfm.evaluate.job import split_features, task_path
from biovfm.evaluate.metrics import UndefinedAUCError, get_acc, get_auc
from biovfm.models.vit import default_device

C_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 7))  # 1e-4 .. 1e3, half-decades
MAX_ITER = 10_000
RAW = "raw/pixels"

# A variant is "paper" (the paper's protocol: probe.PAPER_PROBE; before that existed, ProbeConfig()), "default"
# (ProbeConfig() whatever its values), or "+"-joined changes to the paper's protocol from CHANGES, e.g. "whiten+last".
# A variant setting a field this ProbeConfig lacks is skipped (so the script also runs on an older probe).
CHANGES: dict[str, dict[str, Any]] = {
    "auc": {"select_l2": "auc"},  # (b) L2 value chosen on validation AUC, not loss
    "last": {"select_epoch": "last"},  # (a) last epoch, not the lowest-validation-loss one
    "steps": {"min_steps": 700},  # (c) at least 700 optimiser steps (the default's floor)
    "steps500": {"min_steps": 500},
    "steps1000": {"min_steps": 1000},
    "steps3k": {"min_steps": 3000},
    "whiten": {"whiten": True},  # the head trained in whitened coordinates (same model and objective)
    "ep300": {"epochs": 300},
    "batch32": {"batch_size": 32},
    "lr0.05": {"lr": 0.05},
}
# One change at a time, then the default less one change at a time.
DEFAULT_VARIANTS = ("paper", "auc", "last", "steps", "whiten", "auc+last+steps", "whiten+last+steps",
                    "whiten+auc+steps", "whiten+auc+last", "default")


# ----------------------------------------------------------------------------- configs


def paper_config() -> probe.ProbeConfig:
    """The paper's protocol in this checkout of the probe (a checkout before the fidelity fields: its default)."""
    return getattr(probe, "PAPER_PROBE", probe.ProbeConfig())


def variant_overrides(name: str) -> dict[str, Any]:
    """The ProbeConfig fields a variant name changes relative to the paper's protocol."""
    if name == "paper":
        return {}
    over: dict[str, Any] = {}
    for token in name.split("+"):
        if token not in CHANGES:
            known = ", ".join(CHANGES)
            raise argparse.ArgumentTypeError(f"unknown change {token!r} in variant {name!r}; known: {known}")
        over |= CHANGES[token]
    return over


def variant_config(name: str) -> probe.ProbeConfig | None:
    """The ProbeConfig of a named variant; None when this probe has no field the variant sets."""
    if name == "default":
        return probe.ProbeConfig()
    fields = {f.name for f in dataclasses.fields(probe.ProbeConfig)}
    over = variant_overrides(name)
    if not set(over) <= fields:
        return None
    return dataclasses.replace(paper_config(), **over)


def variant_name(name: str) -> str:
    """argparse type: a known variant name."""
    if name != "default":
        variant_overrides(name)
    return name


# ----------------------------------------------------------------------------- the reference


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _ce(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def _fit_scores(model: LogisticRegression, z_tr: np.ndarray, y_tr: np.ndarray, z: list[np.ndarray],
                n_out: int) -> list[np.ndarray]:
    """Class probabilities (columns 0..n_out-1; classes absent from train get 0) of ``model`` fitted on train."""
    model.fit(z_tr, y_tr)
    out = []
    for zs in z:
        p = np.zeros((len(zs), n_out))
        p[:, model.classes_] = model.predict_proba(zs)
        out.append(p)
    return out


def _logreg(c: float, warm: dict[int, LogisticRegression], key: int) -> LogisticRegression:
    """One model per output (key) kept across the C path: warm starts make the path cheap, not different."""
    m = warm.setdefault(key, LogisticRegression(solver="lbfgs", max_iter=MAX_ITER, warm_start=True))
    m.set_params(C=c)
    return m


def reference_scores(z: dict[str, np.ndarray], y: dict[str, np.ndarray], info: TaskInfo, c: float,
                     warm: dict[int, LogisticRegression]) -> tuple[np.ndarray, np.ndarray]:
    """Val and test probabilities of the logistic regression at ``C=c``; multi-label one-vs-rest."""
    if info.task != MULTI_LABEL:
        model = _logreg(c, warm, 0)
        val, test = _fit_scores(model, z["train"], y["train"][:, 0], [z["val"], z["test"]], info.n_outputs)
        return val, test
    val, test = np.empty((len(z["val"]), info.n_labels)), np.empty((len(z["test"]), info.n_labels))
    for j in range(info.n_labels):
        yj = y["train"][:, j]
        if yj.min() == yj.max():  # a label constant in train: its prior
            val[:, j], test[:, j] = float(yj[0]), float(yj[0])
            continue
        v, t = _fit_scores(_logreg(c, warm, j), z["train"], yj, [z["val"], z["test"]], 2)
        val[:, j], test[:, j] = v[:, 1], t[:, 1]
    return val, test


def _safe_auc(y: np.ndarray, scores: np.ndarray, task: str) -> float:
    try:
        return get_auc(y, scores, task)
    except UndefinedAUCError:
        return float("nan")


def reference(x: dict[str, np.ndarray], y: dict[str, np.ndarray], info: TaskInfo) -> dict[str, Any]:
    """The reference fit: C chosen on validation AUC (ties: lower validation log-loss) over ``C_GRID``."""
    ln = {s: probe.layer_norm(x[s]).numpy().astype(np.float64) for s in SPLITS}
    scaler = StandardScaler().fit(ln["train"])
    z = {s: scaler.transform(ln[s]) for s in SPLITS}
    warm: dict[int, LogisticRegression] = {}
    best: tuple[float, float] | None = None
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in C_GRID:
            val, test = reference_scores(z, y, info, c, warm)
            auc = _safe_auc(y["val"], val, info.task)
            loss = _bce(y["val"], val) if info.task == MULTI_LABEL else _ce(y["val"][:, 0], val)
            key = (-(auc if math.isfinite(auc) else -1.0), loss)
            if best is None or key < best:
                best = key
                out = {"C": c, "val_auc": auc, "val_loss": loss, "test_scores": test}
    out["auc"] = get_auc(y["test"], out["test_scores"], info.task)
    out["acc"] = get_acc(y["test"], out.pop("test_scores"), info.task)
    out["s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- feature sources


def read_params(study: Path) -> dict[str, Any]:
    """The study's params.yaml, read as plain YAML (no schema: it may be an older or newer study)."""
    path = study / "params.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def checkpoints(study: Path, models: list[str] | None, limit: int | None) -> list[Path]:
    """Pretrained checkpoints with their run.json, interleaved across model sizes (small first), so a limit
    keeps a spread of sizes rather than every run of the smallest."""
    by_model: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for ck in sorted((study / "results").glob("**/checkpoint.safetensors")):
        meta_path = ck.parent / "run.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if models and meta.get("model") not in models:
            continue
        by_model[meta.get("model", "?")].append((int(meta.get("params_encoder", 0)), ck))
    groups = sorted(by_model.values(), key=lambda g: g[0][0])
    ordered = [g[i][1] for i in range(max((len(g) for g in groups), default=0)) for g in groups if i < len(g)]
    return ordered if limit is None else ordered[:limit]


def encoder_of(ck: Path, params: dict[str, Any]) -> tuple[torch.nn.Module, str, int]:
    """The checkpoint's encoder, run id and image size: the model spec from config.json (the pretraining job),
    else from run.json's model name and the study's params (patch size for the study's image size)."""
    meta = json.loads((ck.parent / "run.json").read_text())
    cfg_path = ck.parent / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        spec, size = ModelSpec(**cfg["model"]), int(cfg["image_size"])
    else:
        from biovfm.config import model_spec
        spec, size = model_spec(params, meta["model"]), int(params["data"]["image_size"])
    return load_encoder(ck, spec, size).to(default_device()), meta.get("run_id", str(ck.parent)), size


Source = tuple[str, "torch.nn.Module | None", int]  # name, encoder (None: raw pixels), image size


def sources(study: Path, params: dict[str, Any], args: argparse.Namespace) -> Iterator[Source]:
    """(name, encoder or None for raw pixels, image size), one encoder in memory at a time."""
    size = int(params.get("data", {}).get("image_size", 28))
    if args.raw_pixels:
        yield RAW, None, size
    for ck in checkpoints(study, args.models, args.max_checkpoints):
        enc, name, size = encoder_of(ck, params)
        yield name, enc, size


def task_flags(study: Path, params: dict[str, Any], size: int, wanted: list[str] | None) -> list[str]:
    """The study's MedMNIST tasks that have a task file (custom tasks are skipped)."""
    flags = wanted or params.get("data", {}).get("tasks") or list(TASKS)
    return [f for f in flags if f in TASKS and task_path(study / "data/processed/tasks", f, size).is_file()]


# ----------------------------------------------------------------------------- one (source, task)


def majority_acc(y: dict[str, np.ndarray]) -> float:
    """Test accuracy of always predicting the train split's majority class."""
    counts = np.bincount(y["train"][:, 0])
    return float(np.mean(y["test"][:, 0] == int(np.argmax(counts))))


def probe_variants(x: dict[str, np.ndarray], y: dict[str, np.ndarray], info: TaskInfo,
                   configs: dict[str, probe.ProbeConfig], seeds: list[int]) -> dict[str, dict[str, float]]:
    """Each variant's test AUC/ACC (means over seeds), chosen L2, kept epoch, epochs run and fit time."""
    out = {}
    for name, cfg in configs.items():
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = probe.fit_probe(x, y, info, cfg, seed=seed)
            runs.append({"auc": r.auc, "acc": r.acc, "val_auc": r.val_auc, "l2": r.l2, "epoch": r.best_epoch,
                         "epochs": getattr(r, "epochs", cfg.epochs), "s": time.perf_counter() - t0})
        out[name] = {k: float(np.mean([run[k] for run in runs])) for k in runs[0]}
    return out


def extract(encoder: torch.nn.Module | None, data: dict[str, np.ndarray], batch: int,
            label: str) -> dict[str, np.ndarray]:
    """Features of every split, as the evaluate job extracts them."""
    return {s: split_features(encoder, data[f"{s}_images"], batch, f"{label} {s}") for s in SPLITS}


# ----------------------------------------------------------------------------- report


def fmt_row(row: dict[str, Any], names: list[str]) -> str:
    cells = [f"{row['source'][:26]:<26} {row['task'][:14]:<14} {row['n_train']:>6} {row['n_val']:>5} "
             f"{row['ref']['auc']:>6.3f} {row['ref']['C']:>7.0e}"]
    cells += [f"{row['probe'][n]['auc'] - row['ref']['auc']:>+{width(n)}.3f}" for n in names]
    if row["binary"]:
        cells.append(f"  acc ref {row['ref']['acc']:.3f} maj {row['majority_acc']:.3f} "
                     + " ".join(f"{n}={row['probe'][n]['acc']:.3f}" for n in names))
    return " ".join(cells)


def width(name: str) -> int:
    """A variant's column width: its whole name, at least 8."""
    return max(8, len(name))


def header(names: list[str]) -> str:
    return (f"{'source':<26} {'task':<14} {'n_tr':>6} {'n_val':>5} {'refAUC':>6} {'ref C':>7} "
            + " ".join(f"{n:>{width(n)}}" for n in names))


def line(first: str, second: str, ref: str, cells: list[str], names: list[str]) -> str:
    """One summary line in the columns of the per-pair rows."""
    return (f"{first[:26]:<26} {second[:14]:<14} {'':>6} {'':>5} {ref:>6} {'':>7} "
            + " ".join(f"{c:>{width(n)}}" for c, n in zip(cells, names)))


def gap_lines(rows: list[dict[str, Any]], names: list[str], label: str) -> list[str]:
    """Mean, median and worst gap to the reference over ``rows``, how many pairs fall below it, binary tasks whose
    accuracy falls below the majority class while the reference's does not, and the variants' total fit time."""
    gaps = {n: np.array([r["probe"][n]["auc"] - r["ref"]["auc"] for r in rows]) for n in names}
    ref = f"{np.mean([r['ref']['auc'] for r in rows]):.3f}"
    out = [line(f"{label} ({len(rows)} pairs)", "mean", ref, [f"{gaps[n].mean():+.4f}" for n in names], names),
           line("", "median", "", [f"{np.median(gaps[n]):+.4f}" for n in names], names),
           line("", "min", "", [f"{gaps[n].min():+.3f}" for n in names], names),
           line("", "# below ref", "", [str(int((gaps[n] < 0).sum())) for n in names], names),
           line("", "# < ref-0.01", "", [str(int((gaps[n] < -0.01).sum())) for n in names], names)]
    binary = [r for r in rows if r["binary"]]
    if binary:
        fails = [sum(r["probe"][n]["acc"] < r["majority_acc"] <= r["ref"]["acc"] for r in binary) for n in names]
        out.append(line("", "acc<maj<=ref", "", [str(f) for f in fails], names))
    out.append(line("", "fit s total", f"{sum(r['ref']['s'] for r in rows):.1f}",
                    [f"{sum(r['probe'][n]['s'] for r in rows):.1f}" for n in names], names))
    return out


def summary(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Mean gap to the reference per task (over sources), then overall, for encoders and raw pixels apart."""
    out = ["", "mean test-AUC gap (variant - reference) per task, over sources:", header(names).replace("n_tr", "    ")]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    for task, rs in by_task.items():
        gaps = [np.mean([r["probe"][n]["auc"] - r["ref"]["auc"] for r in rs]) for n in names]
        out.append(line(f"({len(rs)} sources)", task, f"{np.mean([r['ref']['auc'] for r in rs]):.3f}",
                        [f"{g:+.3f}" for g in gaps], names))
    groups = {"ALL": rows, "ENCODERS": [r for r in rows if r["source"] != RAW],
              "RAW PIXELS": [r for r in rows if r["source"] == RAW]}
    for label, rs in groups.items():
        if rs and (label == "ALL" or len(rs) < len(rows)):
            out += [""] + gap_lines(rs, names, label)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", nargs="?", default=".", help="a finished study's directory (results/ and data/)")
    ap.add_argument("--models", nargs="+", help="only checkpoints of these model names")
    ap.add_argument("--tasks", nargs="+", help="only these tasks (default: the study's data.tasks)")
    ap.add_argument("--max-checkpoints", type=int, default=None, help="at most this many checkpoints (0: none)")
    ap.add_argument("--raw-pixels", action="store_true", help="also probe the raw-pixel baseline's features")
    ap.add_argument("--variants", nargs="+", type=variant_name, default=list(DEFAULT_VARIANTS),
                    help=f"'paper', 'default', or '+'-joined changes to the paper from: {', '.join(CHANGES)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="probe seeds (AUCs averaged)")
    ap.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (1: oversubscribed BLAS made the reference 5x slower on 2 cores)")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Probe every (source, task) under every variant and the reference; print rows, then the summary."""
    study = Path(args.study)
    params = read_params(study)

    configs = {}
    for n in args.variants:
        cfg = variant_config(n)
        if cfg is None:
            print(f"# variant {n} skipped: this ProbeConfig lacks a field of {sorted(variant_overrides(n))}")
        else:
            configs[n] = cfg
    names = list(configs)
    print(f"# study {study.resolve()}; probe {probe.__file__}")
    for n, cfg in configs.items():
        print(f"# {n}: {cfg}")
    print(f"# reference: LogisticRegression(lbfgs) on StandardScaler(LN(x)), C in {C_GRID[0]:.0e}..{C_GRID[-1]:.0e} "
          f"({len(C_GRID)} values) on val AUC; seeds {args.seeds}")
    print("# columns after 'ref C': test AUC of each variant minus the reference's")
    print(header(names), flush=True)
    rows = []
    for source, encoder, size in sources(study, params, args):
        for flag in task_flags(study, params, size, args.tasks):
            info = TASKS[flag]
            data = load_npz(task_path(study / "data/processed/tasks", flag, size), info, mmap=True)
            y = {s: np.asarray(data[f"{s}_labels"]) for s in SPLITS}
            x = extract(encoder, data, args.batch_size, f"[fidelity] {source} {flag}")
            row = {"source": source, "task": flag, "task_type": info.task, "binary": info.task == BINARY,
                   "n_train": len(y["train"]), "n_val": len(y["val"]), "n_test": len(y["test"]),
                   "feature_dim": int(x["train"].shape[1]), "ref": reference(x, y, info),
                   "probe": probe_variants(x, y, info, configs, args.seeds)}
            if info.task == BINARY:
                row["majority_acc"] = majority_acc(y)
            rows.append(row)
            print(fmt_row(row, names), flush=True)
        del encoder
    if not rows:
        raise SystemExit(f"nothing to probe under {study} (no checkpoints/tasks matched; --raw-pixels?)")
    print("\n".join(summary(rows, names)))
    if args.json:
        args.json.write_text(json.dumps({"variants": {n: dataclasses.asdict(c) for n, c in configs.items()},
                                         "rows": rows}, indent=1, default=float))


if __name__ == "__main__":
    main()
