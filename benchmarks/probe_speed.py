"""Wall time of one linear-probe fit (whole L2 grid, 100 epochs) per task type, feature dim and train size.

Synthetic Gaussian features with a noisy linear label model (interior L2 optimum, as real features
give), so grid extensions happen only when they would in practice. Run:

    .venv/bin/python benchmarks/probe_speed.py [--dims 64 128 192 2352] [--n-train 500 2000] [--repeats 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from biovfm.data.medmnist import MULTI_LABEL, TaskInfo, task_info
from biovfm.evaluate.probe import PROBE_THREADS, ProbeConfig, fit_probe


def synthetic_split(info: TaskInfo, d: int, sizes: dict[str, int], seed: int) -> tuple[dict, dict]:
    """Features N x D and MedMNIST-layout labels from a random linear map plus unit-scale noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, info.n_labels)) * 2 / np.sqrt(d)
    x, y = {}, {}
    for split, n in sizes.items():
        xs = rng.normal(size=(n, d)).astype(np.float32)
        z = xs @ w
        if info.task == MULTI_LABEL:
            y[split] = (z + rng.logistic(size=z.shape) > 0).astype(np.int64)
        else:
            y[split] = np.argmax(z + rng.gumbel(size=z.shape), axis=1)[:, None]
        x[split] = xs
    return x, y


def time_fit(info: TaskInfo, d: int, n_train: int, n_eval: int, cfg: ProbeConfig, repeats: int) -> tuple[float, object]:
    x, y = synthetic_split(info, d, {"train": n_train, "val": n_eval, "test": n_eval}, seed=0)
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fit_probe(x, y, info, cfg)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["pathmnist", "chestmnist", "pneumoniamnist", "retinamnist"])
    ap.add_argument("--dims", nargs="+", type=int, default=[64, 128, 192, 2352])
    ap.add_argument("--n-train", nargs="+", type=int, default=[500, 2000])
    ap.add_argument("--n-eval", type=int, default=500, help="val and test size each")
    ap.add_argument("--epochs", type=int, default=ProbeConfig().epochs)
    ap.add_argument("--repeats", type=int, default=1, help="median over repeats")
    args = ap.parse_args()

    cfg = ProbeConfig(epochs=args.epochs)
    print(
        f"# torch {torch.__version__}, probe threads {PROBE_THREADS}, os.cpu_count {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.2f}, {platform.processor() or platform.machine()}"
    )
    print(f"# epochs {cfg.epochs}, batch {cfg.batch_size}, initial grid {len(cfg.l2_grid)} values, val=test={args.n_eval}")
    header = f"{'task':<15} {'C':>3} {'D':>5} {'n_train':>7} {'grid':>4} {'l2':>8} {'edge':>5} {'test_auc':>8} {'wall_s':>7} {'ms/head':>8}"
    print(header)
    print("-" * len(header))
    warm = task_info(args.tasks[0])
    time_fit(warm, 16, 256, 64, ProbeConfig(epochs=2), 1)  # first-call overhead out of the table
    for flag in args.tasks:
        info = task_info(flag)
        for d in args.dims:
            for n in args.n_train:
                wall, r = time_fit(info, d, n, args.n_eval, cfg, args.repeats)
                g = len(r.l2_grid)
                print(
                    f"{flag:<15} {info.n_outputs:>3} {d:>5} {n:>7} {g:>4} {r.l2:>8.0e} {str(r.at_edge):>5} "
                    f"{r.auc:>8.3f} {wall:>7.2f} {1000 * wall / g:>8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
