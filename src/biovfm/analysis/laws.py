"""Scaling laws: the paper's log-log power law, a saturating power law, model selection and extrapolation.

Two forms of test AUC (0-1) against a scale variable ``x`` (parameters, pretraining images or FLOPs):

* ``loglog``: the paper's fit, OLS of ``ln(100 AUC)`` on ``ln x``: ``AUC = exp(intercept) x^slope / 100``.
  It cannot saturate: extrapolated far enough it passes AUC = 1.
* ``saturating``: ``err = a (x / x_ref)^(-b) + c`` with ``err = 1 - AUC``, ``a, c >= 0`` and
  ``0 < b <= B_MAX``; ``c`` is the irreducible error, ``x_ref`` the smallest ``x`` (so ``a`` is the
  reducible error there). Fitted by bounded least squares started from the best few exponents of a
  profile grid (for each ``b`` the best ``a, c`` are closed-form), so it does not depend on one guess.

Every fit has a vectorised twin over bootstrap replicates (rows of a B x n matrix) so intervals come
from refitting each replicate: the closed form for ``loglog``, the profile grid for ``saturating``.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from biovfm.analysis.fits import AUC_SCALE, loglog_fit

LOGLOG, SATURATING = "loglog", "saturating"
FORMS = (LOGLOG, SATURATING)
MIN_POINTS = {LOGLOG: 2, SATURATING: 3}  # distinct x values a fit needs (3 for saturating: exact, no dof)
B_MAX = 4.0
B_GRID = np.geomspace(1e-3, B_MAX, 160)
N_STARTS = 3


# ----------------------------------------------------------------------------- loglog
def loglog_replicates(x: np.ndarray, auc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) of the paper's fit for every row of ``auc`` (B x n) at once."""
    lx = np.log(np.asarray(x, dtype=float))
    ly = np.log(AUC_SCALE * np.clip(np.asarray(auc, dtype=float), 1e-9, None))
    dx = lx - lx.mean()
    slope = (ly - ly.mean(axis=-1, keepdims=True)) @ dx / (dx @ dx)
    return slope, ly.mean(axis=-1) - slope * lx.mean()


def loglog_predict(p: dict, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # an x range too narrow for a slope: inf/NaN, reported as such
        return np.exp(p["intercept"]) * np.asarray(x, dtype=float) ** p["slope"] / AUC_SCALE


# ----------------------------------------------------------------------------- saturating
def _profile(z: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best non-negative (a, c) of ``err ~ a z + c`` for every row of ``err`` (B x n) and every row of
    ``z`` (K x n, one per exponent), closed form; arrays of shape B x K (a, c, residual SSE)."""
    e, z = err[:, None, :], z[None, :, :]
    zm, em = z.mean(axis=-1), e.mean(axis=-1)
    zc = z - zm[..., None]
    szz = (zc * zc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(szz > 0, ((e - em[..., None]) * zc).sum(axis=-1) / szz, 0.0)
        c = em - a * zm
        neg_a = a < 0  # no decay: a constant error
        a, c = np.where(neg_a, 0.0, a), np.where(neg_a, em, c)
        neg_c = c < 0  # no floor: a pure power law through the origin
        a = np.where(neg_c, (e * z).sum(axis=-1) / (z * z).sum(axis=-1), a)
        c = np.where(neg_c, 0.0, c)
    sse = ((e - a[..., None] * z - c[..., None]) ** 2).sum(axis=-1)
    return a, c, sse


def _grid(x: np.ndarray, auc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Profile of the saturating law over the exponent grid: a, c, SSE (B x K) for auc rows (B x n)."""
    x = np.asarray(x, dtype=float)
    z = (x / x.min())[None, :] ** -B_GRID[:, None]
    return _profile(z, 1.0 - np.atleast_2d(np.asarray(auc, dtype=float)))


def saturating_replicates(x: np.ndarray, auc: np.ndarray) -> dict[str, np.ndarray]:
    """(a, b, c) of the saturating law for every row of ``auc`` (B x n), from the profile grid."""
    a, c, sse = _grid(x, auc)
    k = np.argmin(sse, axis=1)
    rows = np.arange(len(k))
    return {"a": a[rows, k], "b": B_GRID[k], "c": c[rows, k], "sse": sse[rows, k]}


def saturating_fit(x: np.ndarray, auc: np.ndarray) -> dict:
    """Bounded multi-start least squares of ``1 - AUC = a (x/x_ref)^-b + c``; returns a, b, c, x_ref."""
    x, auc = np.asarray(x, dtype=float), np.asarray(auc, dtype=float)
    err, x_ref = 1.0 - auc, float(x.min())
    a0, c0, sse = (v[0] for v in _grid(x, auc))
    best = None
    for k in np.argsort(sse)[:N_STARTS]:
        res = least_squares(lambda p: p[0] * (x / x_ref) ** -p[1] + p[2] - err,
                            x0=[max(a0[k], 1e-9), B_GRID[k], min(max(c0[k], 0.0), 1.0)],
                            bounds=([0.0, B_GRID[0], 0.0], [np.inf, B_MAX, 1.0]), method="trf")
        fit_sse = float((res.fun ** 2).sum())
        if best is None or fit_sse < best[0]:
            best = (fit_sse, res.x)
    a, b, c = (float(v) for v in best[1])
    return {"a": a, "b": b, "c": c, "x_ref": x_ref}


def saturating_predict(p: dict, x: np.ndarray) -> np.ndarray:
    return 1.0 - (p["a"] * (np.asarray(x, dtype=float) / p["x_ref"]) ** -p["b"] + p["c"])


# ----------------------------------------------------------------------------- both forms
def fit(form: str, x: np.ndarray, auc: np.ndarray) -> dict:
    """Point fit of ``form`` (raises on too few points: callers check :func:`enough_points` first)."""
    if not enough_points(form, x):
        raise ValueError(f"{form} fit needs >= {MIN_POINTS[form]} distinct x values, got {np.unique(x).size}")
    if form == LOGLOG:
        f = loglog_fit(x, AUC_SCALE * np.asarray(auc, dtype=float))
        return {"slope": f["slope"], "intercept": f["intercept"]}
    return saturating_fit(x, auc)


def predict(form: str, p: dict, x: np.ndarray) -> np.ndarray:
    return loglog_predict(p, x) if form == LOGLOG else saturating_predict(p, x)


def fit_replicates(form: str, x: np.ndarray, auc_reps: np.ndarray) -> dict[str, np.ndarray]:
    """Refit ``form`` on each bootstrap replicate (rows of B x n); parameter arrays of length B."""
    if form == LOGLOG:
        slope, intercept = loglog_replicates(x, auc_reps)
        return {"slope": slope, "intercept": intercept}
    p = saturating_replicates(x, auc_reps)
    return {"a": p["a"], "b": p["b"], "c": p["c"], "x_ref": np.full_like(p["a"], float(np.min(x)))}


def predict_replicates(form: str, reps: dict[str, np.ndarray], x: float) -> np.ndarray:
    if form == LOGLOG:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.exp(reps["intercept"]) * float(x) ** reps["slope"] / AUC_SCALE
    return 1.0 - (reps["a"] * (float(x) / reps["x_ref"]) ** -reps["b"] + reps["c"])


def enough_points(form: str, x: np.ndarray) -> bool:
    return np.unique(np.asarray(x, dtype=float)).size >= MIN_POINTS[form]


def r2(form: str, p: dict, x: np.ndarray, auc: np.ndarray) -> float:
    """R^2 on the AUC scale (NaN when AUC is constant or no residual degree of freedom is left)."""
    auc = np.asarray(auc, dtype=float)
    ss_tot = float(((auc - auc.mean()) ** 2).sum())
    if ss_tot <= 0:
        return float("nan")
    return 1.0 - float(((auc - predict(form, p, x)) ** 2).sum()) / ss_tot


def loo_rmse(form: str, x: np.ndarray, auc: np.ndarray) -> float:
    """Leave-one-out RMSE (AUC units): each point predicted by the form fitted on the others.

    The held-out error behind model selection; NaN when a fit without one point has too few points.
    """
    x, auc = np.asarray(x, dtype=float), np.asarray(auc, dtype=float)
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        if not enough_points(form, x[keep]):
            return float("nan")
        errs.append(float(predict(form, fit(form, x[keep], auc[keep]), x[i:i + 1])[0] - auc[i]))
    return float(np.sqrt(np.mean(np.square(errs))))


# ----------------------------------------------------------------------------- joint law (compute view)
def joint_fit(n: np.ndarray, d: np.ndarray, auc: np.ndarray, grid: int = 24) -> dict:
    """``1 - AUC = e + A (N/N0)^-alpha + B (D/D0)^-beta`` (all >= 0), fitted by variable projection:
    for each (alpha, beta) on a grid the non-negative (e, A, B) are exact (NNLS), then the best few
    grid points start a bounded least-squares refinement. N0, D0 are the smallest N and D."""
    from scipy.optimize import nnls

    n, d, err = (np.asarray(v, dtype=float) for v in (n, d, auc))
    err = 1.0 - err
    n0, d0 = float(n.min()), float(d.min())
    exps = np.geomspace(1e-2, B_MAX, grid)
    cand = []
    for al in exps:
        for be in exps:
            X = np.stack([np.ones_like(n), (n / n0) ** -al, (d / d0) ** -be], axis=1)
            coef, rnorm = nnls(X, err)
            cand.append((rnorm, al, be, coef))
    best = None
    for _, al, be, coef in sorted(cand, key=lambda t: t[0])[:N_STARTS]:
        res = least_squares(lambda p: p[0] + p[1] * (n / n0) ** -p[2] + p[3] * (d / d0) ** -p[4] - err,
                            x0=[coef[0], coef[1], al, coef[2], be],
                            bounds=([0, 0, exps[0], 0, exps[0]], [1, np.inf, B_MAX, np.inf, B_MAX]))
        sse = float((res.fun ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, res.x)
    e, a, al, b, be = (float(v) for v in best[1])
    return {"e": e, "A": a, "alpha": al, "B": b, "beta": be, "N0": n0, "D0": d0, "sse": best[0]}


def joint_predict(p: dict, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return 1.0 - (p["e"] + p["A"] * (n / p["N0"]) ** -p["alpha"] + p["B"] * (d / p["D0"]) ** -p["beta"])
