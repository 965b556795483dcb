"""Raw-pixel linear-probe baseline and generation speed of the embedded synthetic benchmark.

Generates the default benchmark (12 tasks + the unlabeled corpus), fits StandardScaler + LogisticRegression on raw
pixels per task (C chosen on validation AUC over a wide log grid, refit on train only), and prints one table row per
task: classes, raw-pixel test AUC/ACC, chance, generation speed. Also reports how many distinct styles nested corpus
prefixes contain and how much of the evaluation style mass they cover (the data-scaling lever of the generator).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_baseline.py            # defaults: 500/200/500, 28 px
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_baseline.py --tasks octmnist breastmnist --no-corpus
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from biovfm.data import synthetic
from biovfm.data.medmnist import MULTI_LABEL, TASKS, validate_arrays
from biovfm.evaluate.metrics import get_acc, get_auc

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, multi_label: bool) -> list[LogisticRegression]:
    """One logistic regression (multi-class/binary) or one per label column (multi-label)."""
    cols = range(y.shape[1]) if multi_label else (0,)
    return [LogisticRegression(C=c, max_iter=300).fit(x, y[:, j]) for j in cols]


def _predict(models: list[LogisticRegression], x: np.ndarray, multi_label: bool) -> np.ndarray:
    """Class probabilities (N x C), or per-label positive probabilities (N x L) for multi-label."""
    if multi_label:
        return np.stack([m.predict_proba(x)[:, 1] for m in models], 1)
    return models[0].predict_proba(x)


def linear_probe(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], task: str,
                 grid: tuple[float, ...] = C_GRID, extra_test: dict[str, np.ndarray] | None = None
                 ) -> dict[str, float]:
    """StandardScaler + LogisticRegression on ``feats[split]`` (N x D); C maximises validation AUC, the model is fit
    on train only. Returns test AUC/ACC, and ``auc_<name>`` for each extra test set (same labels as test)."""
    scaler = StandardScaler().fit(np.asarray(feats["train"], np.float64))
    x = {s: scaler.transform(np.asarray(v, np.float64)) for s, v in feats.items()}
    ml = task == MULTI_LABEL
    fits, val = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            fits[c] = _fit(x["train"], labels["train"], c, ml)
            val[c] = get_auc(labels["val"], _predict(fits[c], x["val"], ml), task)
    best = max(val, key=val.get)
    s_test = _predict(fits[best], x["test"], ml)
    out = {"C": best, "val_auc": val[best], "auc": get_auc(labels["test"], s_test, task),
           "acc": get_acc(labels["test"], s_test, task)}
    for name, v in (extra_test or {}).items():
        s = _predict(fits[best], scaler.transform(np.asarray(v, np.float64)), ml)
        out[f"auc_{name}"] = get_auc(labels["test"], s, task)
    return out


def pixels(images: np.ndarray) -> np.ndarray:
    """Flattened pixels in [0, 1] (N x H*W*C)."""
    return images.reshape(len(images), -1).astype(np.float64) / 255


def raw_probe(data: dict[str, np.ndarray], task: str, grid: tuple[float, ...] = C_GRID,
              extra_test: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Test AUC/ACC of a raw-pixel logistic regression whose C maximises validation AUC (``extra_test``: other
    test images, e.g. shifted copies, scored by the same fit as ``auc_<name>``)."""
    feats = {s: pixels(data[f"{s}_images"]) for s in ("train", "val", "test")}
    labels = {s: data[f"{s}_labels"] for s in ("train", "val", "test")}
    extra = {k: pixels(v) for k, v in (extra_test or {}).items()}
    return linear_probe(feats, labels, task, grid, extra)


def chance_acc(y: np.ndarray, task: str) -> float:
    """Accuracy of always predicting the majority class (per label for multi-label)."""
    if task == MULTI_LABEL:
        p = y.mean(0)
        return float(np.mean(np.maximum(p, 1 - p)))
    return float(np.bincount(y[:, 0]).max() / len(y))


def style_coverage(n_corpus: int, prefixes: tuple[int, ...], seed: int) -> list[dict[str, float]]:
    """Distinct (modality, style) pairs in nested corpus prefixes, and the evaluation style mass they cover."""
    mod, _, styles = synthetic.corpus_plan(n_corpus, synthetic.MODALITIES, seed)
    q = synthetic._zipf(synthetic.EVAL_STYLE_EXPONENT)
    rows = []
    for n in prefixes:
        if n > n_corpus:
            continue
        cover = []
        n_styles = 0
        for m in synthetic.MODALITIES:
            seen = np.unique(styles[:n][mod[:n] == m])
            n_styles += len(seen)
            cover.append(q[seen].sum())
        rows.append({"n": n, "styles": n_styles, "eval_mass_covered": float(np.mean(cover))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=int, default=4000, help="corpus size to generate and time")
    ap.add_argument("--no-corpus", action="store_true")
    ap.add_argument("--no-probe", action="store_true", help="only time generation")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()

    rows = []
    gen_total = n_total = 0.0
    print(f"{'task':15s} {'type':13s} {'cls':>3s} {'C':>7s} {'val AUC':>7s} {'AUC':>6s} {'ACC':>6s} "
          f"{'chanceACC':>9s} {'img/s':>7s}")
    for flag in a.tasks:
        info = TASKS[flag]
        t0 = time.perf_counter()
        data = synthetic.generate_task(flag, a.n_train, a.n_val, a.n_test, size=a.size, seed=a.seed)
        dt = time.perf_counter() - t0
        validate_arrays(data, flag, info)
        n = a.n_train + a.n_val + a.n_test
        gen_total += dt
        n_total += n
        row = {"task": flag, "type": info.task, "classes": info.n_labels, "img_per_s": n / dt,
               "chance_auc": 0.5, "chance_acc": chance_acc(data["test_labels"], info.task)}
        if not a.no_probe:
            row.update(raw_probe(data, info.task))
        rows.append(row)
        print(f"{flag:15s} {info.task[:13]:13s} {info.n_labels:3d} {row.get('C', float('nan')):7.0e} "
              f"{row.get('val_auc', float('nan')):7.3f} {row.get('auc', float('nan')):6.3f} "
              f"{row.get('acc', float('nan')):6.3f} {row['chance_acc']:9.3f} {row['img_per_s']:7.0f}", flush=True)
    if not a.no_probe:
        print(f"{'mean':15s} {'':13s} {'':3s} {'':7s} {'':7s} {np.mean([r['auc'] for r in rows]):6.3f} "
              f"{np.mean([r['acc'] for r in rows]):6.3f}")
    print(f"\ntasks: {n_total:.0f} images in {gen_total:.1f} s ({n_total / gen_total:.0f} img/s, size {a.size})")
    report = {"tasks": rows}
    if not a.no_corpus:
        t0 = time.perf_counter()
        images, mods = synthetic.generate_corpus(a.corpus, synthetic.MODALITIES, size=a.size, seed=a.seed)
        dt = time.perf_counter() - t0
        print(f"corpus: {len(images)} images over {len(set(mods))} modalities in {dt:.1f} s ({len(images) / dt:.0f} "
              f"img/s); total generation {gen_total + dt:.1f} s")
        cov = style_coverage(a.corpus, (250, 1000, 4000, 16000), a.seed)
        for c in cov:
            print(f"  corpus prefix {c['n']:6d}: {c['styles']:5d} distinct (modality, style) pairs, "
                  f"covering {c['eval_mass_covered']:.1%} of the evaluation style mass")
        report["corpus"] = {"n": len(images), "seconds": dt, "coverage": cov}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
