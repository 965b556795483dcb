"""Shortcuts a linear read-out of raw pixels can take on the synthetic benchmark, measured per task.

A logistic regression on raw pixels can only use signals that are linear in the pixels: label-correlated brightness
or colour (the per-channel mean is a linear function of the pixels) and label-carrying fixed pixel positions
(registered anatomy). Mean-pooled ViT features lose the second and must learn the first, so a benchmark rich in
either favours raw pixels. On real MedMNIST a small MAE encoder beats raw pixels (issue 14). Per task this prints:

* ``raw``: the raw-pixel probe (the study's baseline; C on validation AUC, refit on train only);
* ``shift``: the same fitted raw probe on the test images shifted by up to +-``--shift`` px (reflect padding,
  independent dx, dy per image): the drop ``raw - shift`` is how much the probe relies on fixed pixel positions;
* ``pool4``: the probe on the 4 x 4 block-mean image (16 features per channel): coarse layout and brightness only;
* ``mean``: the probe on the per-channel image means (1 or 3 features): the global shortcut that is linear in the
  pixels, so open to the raw probe;
* ``stats``: per-channel mean, std, 5/25/50/75/95th percentiles and an 8-bin intensity histogram (no spatial
  information; includes non-linear statistics that an encoder can read but a raw linear probe cannot);
* ``bag``: a position-free bag of local patches (4 x 4 patches at stride 2, a fixed random affine map to 256 units,
  ReLU, mean over patches), a crude stand-in for what mean-pooled patch tokens can see;
* ``chance``: AUC 0.5 for every task; ``majACC`` the majority-class accuracy (class balance) beside the raw ACC.

With ``--vit NAME`` a random-init ViT of the params ladder (mean-pooled patch tokens + final norm, the study's
features) is probed the same way (column ``vit``). All probes share ``linear_probe`` of synthetic_baseline.py and
biovfm.evaluate.metrics. Split sizes and seed default to ``data.synthetic`` of params.yaml (500/200/500, seed 0).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_shortcuts.py                # 12 tasks, about 1-2 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_shortcuts.py --tasks chestmnist breastmnist --vit nano
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_baseline import C_GRID, chance_acc, linear_probe, pixels  # noqa: E402

from biovfm.data import synthetic  # noqa: E402
from biovfm.data.medmnist import TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
STATS_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)  # few features: weak penalties suffice
QUANTILES = (5, 25, 50, 75, 95)


def _channels(images: np.ndarray) -> np.ndarray:
    """N x H x W x C float in [0, 1] (grayscale gets C = 1)."""
    x = images.astype(np.float32) / 255
    return x if x.ndim == 4 else x[..., None]


def channel_means(images: np.ndarray) -> np.ndarray:
    return _channels(images).mean(axis=(1, 2))


def global_stats(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """Per channel: mean, std, quantiles and a coarse histogram; invariant to any permutation of the pixels."""
    x = _channels(images)
    n, c = len(x), x.shape[-1]
    flat = x.reshape(n, -1, c)
    q = np.percentile(flat, QUANTILES, axis=1).transpose(1, 0, 2).reshape(n, -1)
    idx = np.minimum((flat * bins).astype(np.int64), bins - 1)
    hist = np.stack([(idx == k).mean(1) for k in range(bins)], 1).reshape(n, -1)
    return np.concatenate([flat.mean(1), flat.std(1), q, hist], 1)


def pooled(images: np.ndarray, cells: int = 4) -> np.ndarray:
    """Block means on a ``cells`` x ``cells`` grid (the last block absorbs the remainder)."""
    x = _channels(images)
    edges = np.linspace(0, x.shape[1], cells + 1).round().astype(int)
    out = [x[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(axis=(1, 2))
           for i in range(cells) for j in range(cells)]
    return np.concatenate(out, 1)


def shifted(images: np.ndarray, max_shift: int, seed: int) -> np.ndarray:
    """Each image translated by its own (dy, dx) in [-max_shift, max_shift] px, reflect padding."""
    rng = np.random.default_rng(seed)
    pad = [(0, 0), (max_shift, max_shift), (max_shift, max_shift)] + [(0, 0)] * (images.ndim - 3)
    big = np.pad(images, pad, mode="reflect")
    h, w = images.shape[1:3]
    d = rng.integers(0, 2 * max_shift + 1, (len(images), 2))
    return np.stack([b[dy:dy + h, dx:dx + w] for b, (dy, dx) in zip(big, d)])


def patch_bag(images: np.ndarray, patch: int = 4, stride: int = 2, units: int = 256, seed: int = 0) -> np.ndarray:
    """Mean over all patches of ReLU(random affine map of the patch): random features of local appearance
    (brightness included), pooled without position."""
    x = _channels(images) - 0.5
    win = np.lib.stride_tricks.sliding_window_view(x, (patch, patch), axis=(1, 2))[:, ::stride, ::stride]
    n, gh, gw = win.shape[:3]
    p = win.reshape(n, gh * gw, -1)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((p.shape[-1], units)) / np.sqrt(p.shape[-1])).astype(np.float32)
    bias = (0.5 * rng.standard_normal(units)).astype(np.float32)
    return np.maximum(p @ w + bias, 0).mean(1)


def vit_features(name: str, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Random-init ViT ``name`` of params.yaml: the study's frozen features (mean patch token, final norm)."""
    import torch

    from biovfm.config import load_params, model_spec
    from biovfm.evaluate.features import encoder_features
    from biovfm.models.vit import build_encoder

    torch.manual_seed(0)
    torch.set_num_threads(1)
    spec = model_spec(load_params(ROOT / "params.yaml"), name)
    enc = build_encoder(spec, images["train"].shape[1], in_chans=3).eval()
    return {s: encoder_features(enc, v) for s, v in images.items()}


COLUMNS = ("raw", "shift", "pool4", "mean", "stats", "bag")


def probe_task(flag: str, data: dict[str, np.ndarray], max_shift: int, seed: int, vit: str | None) -> dict:
    info = TASKS[flag]
    labels = {s: data[f"{s}_labels"] for s in SPLITS}
    imgs = {s: data[f"{s}_images"] for s in SPLITS}
    row = {"task": flag, "classes": info.n_labels, "majority_acc": chance_acc(labels["test"], info.task),
           "chance_auc": 0.5}
    raw = linear_probe({s: pixels(v) for s, v in imgs.items()}, labels, info.task, C_GRID,
                       {"shift": pixels(shifted(imgs["test"], max_shift, seed))})
    row.update(raw=raw["auc"], shift=raw["auc_shift"], raw_acc=raw["acc"], raw_C=raw["C"])
    for name, fn, grid in (("pool4", pooled, C_GRID), ("mean", channel_means, STATS_GRID),
                           ("stats", global_stats, STATS_GRID), ("bag", patch_bag, C_GRID)):
        row[name] = linear_probe({s: fn(v) for s, v in imgs.items()}, labels, info.task, grid)["auc"]
    if vit:
        row["vit"] = linear_probe(vit_features(vit, imgs), labels, info.task, C_GRID)["auc"]
    return row


def main() -> None:
    from biovfm.config import load_params

    syn = load_params(ROOT / "params.yaml")["data"]["synthetic"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="FLAG")
    ap.add_argument("--n-train", type=int, default=syn["n_train"])
    ap.add_argument("--n-val", type=int, default=syn["n_val"])
    ap.add_argument("--n-test", type=int, default=syn["n_test"])
    ap.add_argument("--size", type=int, default=syn["size"])
    ap.add_argument("--seed", type=int, default=syn["seed"])
    ap.add_argument("--shift", type=int, default=4, help="max test-time translation in px (shift column)")
    ap.add_argument("--vit", metavar="NAME", help="also probe a random-init ViT of the params ladder (e.g. nano)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()

    cols = COLUMNS + (("vit",) if a.vit else ())
    head = f"{'task':15s} {'cls':>3s} " + " ".join(f"{c:>6s}" for c in cols) + f" {'chance':>6s} {'rawACC':>6s} " \
        f"{'majACC':>6s} {'gen s':>5s}"
    print(head)
    rows, t_all = [], time.perf_counter()
    for flag in a.tasks:
        t0 = time.perf_counter()
        data = synthetic.generate_task(flag, a.n_train, a.n_val, a.n_test, size=a.size, seed=a.seed)
        gen = time.perf_counter() - t0
        row = probe_task(flag, data, a.shift, a.seed, a.vit)
        row["gen_s"] = gen
        rows.append(row)
        print(f"{flag:15s} {row['classes']:3d} " + " ".join(f"{row[c]:6.3f}" for c in cols)
              + f" {0.5:6.3f} {row['raw_acc']:6.3f} {row['majority_acc']:6.3f} {gen:5.2f}", flush=True)
    mean = {c: float(np.mean([r[c] for r in rows])) for c in cols + ("raw_acc", "majority_acc")}
    print(f"{'mean':15s} {'':3s} " + " ".join(f"{mean[c]:6.3f}" for c in cols)
          + f" {0.5:6.3f} {mean['raw_acc']:6.3f} {mean['majority_acc']:6.3f} "
          f"{sum(r['gen_s'] for r in rows):5.2f}")
    print(f"\n{time.perf_counter() - t_all:.0f} s; {a.n_train}/{a.n_val}/{a.n_test} images per task at {a.size} px, "
          f"seed {a.seed}; raw - shift = reliance on fixed pixel positions, mean/stats = global-statistics shortcut")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
