"""The reference probe: L2-regularised logistic regression on standardised features, solved to convergence.

Why it exists: the paper's head (:mod:`biovfm.evaluate.probe`) is a stochastic optimiser stopped by a
validation rule, so its score mixes the representation with the optimisation. This estimator has a unique
optimum per penalty, reached by full-batch L-BFGS, so its score is a property of the features alone.
The solver is scipy's L-BFGS-B (scikit-learn's default), on an objective computed by torch on the job's device.

* Features are standardised with the (used) training rows' mean and standard deviation. The standardisation
  is folded into the matrix products (``(x - mu) / sd``, a chunk at a time), never materialised: the features
  may be a memory-mapped file far larger than RAM.
* Objective (scikit-learn's ``LogisticRegression`` with C): ``C * sum_i loss_i + 0.5 * ||W||^2``, written as
  ``mean_i loss_i + ||W||^2 / (2 C N)``; the bias is not penalised. Multi-class and ordinal: multinomial
  softmax. Binary: one sigmoid logit (scores ``[1 - p, p]``). Multi-label: one sigmoid per label, the same
  C for all labels, which is one-vs-rest (the objective separates per label).
* C is chosen on the validation metric (the MedMNIST AUC), ties to the stronger penalty, over a wide log
  grid walked from strong to weak penalty with warm starts (the whole grid: on a small validation set the AUC path
  has local bumps, so stopping early at one picked a far too strong penalty). Computation in float64.
* Preconditioning: LayerNorm-ed features are strongly collinear (covariance eigenvalues 1e-4 ... 17), which left
  plain L-BFGS hundreds of iterations short of the optimum at weak penalties. The solver works in the eigenbasis
  ``V`` of the standardised training covariance, with each coordinate scaled by ``p = 1 / sqrt(lambda / 4 + 1 / (C N))``
  (``W = V diag(p) U``): the objective's Hessian, about ``V^T X^T X V / (4 N) + I / (C N)``, becomes about the
  identity. Training rows that fit the cache are rotated once (``X V``, ``n x r``; ``r = rank <= min(n, d)``: a weight
  outside the rows' span only adds penalty, so the optimum has none); larger ones keep their layout and the weights
  are rotated instead (``d^2 k`` per evaluation, small against ``n d k``). Beyond ``PRECOND_MAX_DIM`` on both sides
  the solver runs unpreconditioned. The optimum, and so every score, is the same either way.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from threadpoolctl import threadpool_limits

from biovfm.data.medmnist import BINARY, MULTI_LABEL, TaskInfo
from biovfm.evaluate.metrics import auc_or_nan, get_acc, get_auc, scores_from_logits

CHUNK = 8192  # rows per float64 block: bounds the solver's memory by the chunk, not the task
CACHE_BYTES = 256 * 2**20  # training rows up to this size (float64) are standardised once and kept on the device
PRECOND_MAX_DIM = 4096  # eigendecomposition of a min(n, d)-sided matrix up to this side (128 MiB in float64)
C_GRID = tuple(float(10.0**k) for k in range(-4, 4))  # 1e-4 .. 1e3, decades


@dataclass(frozen=True)
class LogRegConfig:
    c_grid: tuple[float, ...] = C_GRID
    max_iter: int = 1000  # L-BFGS iterations per C; a fit that needs more is reported as not converged
    tol: float = 1e-5  # on the largest gradient entry (solver coordinates): test AUC within 1e-4 of tol 1e-9's
    precondition: bool = True  # solve in the covariance eigenbasis (same optimum, far fewer iterations)


@dataclass
class LogRegResult:
    test_scores: np.ndarray
    val_scores: np.ndarray
    auc: float
    acc: float
    val_auc: float
    c: float  # the chosen C
    at_edge: bool  # the chosen C is the grid's smallest or largest value
    n_iter: int  # L-BFGS iterations of the chosen fit
    converged: bool


# ----------------------------------------------------------------------------- pure helpers


def standardizer(x: np.ndarray, rows: np.ndarray | None = None, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (float64) of the columns of ``x[rows]``, a chunk at a time; constant columns
    get sd 1 (they carry nothing, and must not divide by zero)."""
    idx = np.arange(len(x)) if rows is None else np.asarray(rows)
    total = np.zeros(x.shape[1])
    for s in range(0, len(idx), chunk):
        total += np.asarray(x[idx[s:s + chunk]], dtype=np.float64).sum(0)
    mu = total / len(idx)
    sq = np.zeros(x.shape[1])
    for s in range(0, len(idx), chunk):
        sq += np.square(np.asarray(x[idx[s:s + chunk]], dtype=np.float64) - mu).sum(0)
    sd = np.sqrt(sq / len(idx))
    sd[sd < 1e-12 * max(1.0, float(np.abs(mu).max(initial=0.0)))] = 1.0
    return mu, sd


def n_logits(info: TaskInfo) -> int:
    """One logit for a binary task, one per class or label otherwise."""
    return 1 if info.task == BINARY else info.n_outputs


def dense_targets(y: np.ndarray, info: TaskInfo) -> np.ndarray:
    """Targets in the logits' layout: 0/1 columns (binary: one; multi-label: L) or one-hot classes."""
    y = np.asarray(y).reshape(len(y), -1)
    if info.task == MULTI_LABEL:
        return y.astype(np.float64)
    if info.task == BINARY:
        return (y[:, :1] == 1).astype(np.float64)
    return np.eye(info.n_outputs)[y[:, 0].astype(np.int64)]


def task_scores(logits: np.ndarray, info: TaskInfo) -> np.ndarray:
    """Probabilities in the MedMNIST evaluator's layout (binary: ``[1 - p, p]``)."""
    if info.task == BINARY:
        p = scores_from_logits(logits, MULTI_LABEL)[:, 0]  # the sigmoid
        return np.stack([1 - p, p], axis=1)
    return scores_from_logits(logits, info.task)


def _loss_and_grad(z: torch.Tensor, t: torch.Tensor, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of logits ``z`` (n x k) against dense targets ``t`` and its gradient w.r.t. ``z``."""
    if softmax:
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        return (lse - (z * t).sum(1, keepdim=True)).sum(), torch.exp(z - lse) - t
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum")
    return loss, torch.sigmoid(z) - t


class _Objective:
    """``mean loss + ||W||^2 / (2 C N)`` over rows ``rows`` of the features, with its gradient, in float64."""

    def __init__(self, x: np.ndarray, rows: np.ndarray, targets: np.ndarray, mu: np.ndarray, sd: np.ndarray,
                 softmax: bool, device: torch.device):
        self.x, self.rows, self.softmax, self.device = x, rows, softmax, device
        self.t = torch.from_numpy(targets[rows]).to(device)
        self.mu = torch.from_numpy(mu).to(device)
        self.inv_sd = torch.from_numpy(1.0 / sd).to(device)
        self.contiguous = bool(np.array_equal(rows, np.arange(len(x))))
        self.n, self.d = len(rows), x.shape[1]
        self.cached: torch.Tensor | None = None
        if self.n * x.shape[1] * 8 <= CACHE_BYTES:  # small tasks: no conversion at every function evaluation
            self.cached = torch.cat([self.block(s) for s in range(0, self.n, CHUNK)])

    def rotate(self, vectors: torch.Tensor) -> bool:
        """Rotate the cached rows into the basis ``vectors`` (d x r) for good; False (nothing done) without a cache."""
        if self.cached is None:
            return False
        self.cached = self.cached @ vectors
        self.d = vectors.shape[1]
        return True

    def block(self, start: int) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[start:start + CHUNK]
        rows = slice(start, start + CHUNK) if self.contiguous else self.rows[start:start + CHUNK]
        xb = torch.from_numpy(np.asarray(self.x[rows], dtype=np.float64)).to(self.device)
        return (xb - self.mu) * self.inv_sd

    def __call__(self, w: torch.Tensor, b: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        for s in range(0, self.n, CHUNK):
            xb = self.block(s)
            part, gz = _loss_and_grad(xb @ w + b, self.t[s:s + CHUNK], self.softmax)
            loss += part
            gw.addmm_(xb.T, gz)
            gb += gz.sum(0)
        lam = 1.0 / (c * self.n)  # the penalty's weight in the mean objective: 0.5 * lam * ||W||^2
        return loss / self.n + 0.5 * lam * w.square().sum(), gw / self.n + lam * w, gb / self.n


def spectrum(obj: _Objective) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigenvalues (r) and orthonormal eigenvectors (d x r) of the covariance of the objective's standardised rows,
    for the directions with data (``r`` = rank): from the d x d covariance (a chunk at a time) when ``d <= n``, else
    from the cached rows' n x n Gram matrix. ``None`` when neither fits ``PRECOND_MAX_DIM``."""
    n, d = obj.n, obj.d
    if d <= min(n, PRECOND_MAX_DIM):
        cov = torch.zeros(d, d, dtype=torch.float64, device=obj.device)
        for s in range(0, n, CHUNK):
            xb = obj.block(s)
            cov.addmm_(xb.T, xb)
        values, vectors = torch.linalg.eigh(cov / n)
    elif obj.cached is not None and n <= PRECOND_MAX_DIM:
        values, u = torch.linalg.eigh(obj.cached @ obj.cached.T / n)
        vectors = obj.cached.T @ u  # = V diag(sqrt(n lambda)): normalised below
        vectors = vectors / vectors.norm(dim=0).clamp_min(1e-300)
    else:
        return None
    keep = values > 1e-12 * float(values.max().clamp_min(1e-300))
    return values[keep], vectors[:, keep]


class Preconditioner:
    """``W = M U`` at one C: ``M = diag(p)`` on rotated features, else ``M = V diag(p) V^T + s (I - V V^T)``
    (symmetric positive definite; ``s``, the scale of directions without data, is the penalty's alone)."""

    def __init__(self, values: torch.Tensor, vectors: torch.Tensor | None, c: float, n: int, curvature: float = 0.25):
        lam = 1.0 / (c * n)
        self.v = vectors  # None: the features are already in the eigenbasis
        self.p = (1.0 / torch.sqrt(curvature * values + lam))[:, None]
        self.s = 1.0 / math.sqrt(lam)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """``M u`` (also ``M^T g``: M is symmetric)."""
        if self.v is None:
            return self.p * u
        return self.v @ ((self.p - self.s) * (self.v.T @ u)) + self.s * u

    def invert(self, w: torch.Tensor) -> torch.Tensor:
        """``M^{-1} w``."""
        if self.v is None:
            return w / self.p
        return self.v @ ((1.0 / self.p - 1.0 / self.s) * (self.v.T @ w)) + w / self.s


def logits_of(x: np.ndarray, w: torch.Tensor, b: torch.Tensor, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Logits of every row of ``x`` (a chunk at a time, float64)."""
    dev = w.device
    m, inv = torch.from_numpy(mu).to(dev), torch.from_numpy(1.0 / sd).to(dev)
    out = []
    for s in range(0, len(x), CHUNK):
        xb = torch.from_numpy(np.asarray(x[s:s + CHUNK], dtype=np.float64)).to(dev)
        out.append((((xb - m) * inv) @ w + b).cpu().numpy())
    return np.concatenate(out)


def solve(obj: _Objective, w: torch.Tensor, b: torch.Tensor, c: float, cfg: LogRegConfig,
          pre: Preconditioner | None = None) -> tuple[int, bool]:
    """Minimise the objective at C = ``c`` from (``w``, ``b``), in place, with scipy's L-BFGS-B (the solver
    scikit-learn uses) driving the float64 objective on the features' device, in preconditioned coordinates when
    ``pre`` is given. Converged: the largest gradient entry (in the solver's coordinates) is at most ``cfg.tol``.
    Returns (iterations, converged)."""
    shape_w, dev = w.shape, w.device
    split = w.numel()

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.from_numpy(theta).to(dev)
        u = t[:split].view(shape_w)
        loss, gw, gb = obj(pre.apply(u) if pre else u, t[split:], c)
        gu = pre.apply(gw) if pre else gw
        return float(loss), torch.cat([gu.reshape(-1), gb]).cpu().numpy()

    theta0 = torch.cat([(pre.invert(w) if pre else w).reshape(-1), b]).cpu().numpy()
    with threadpool_limits(1, user_api="blas"):  # L-BFGS's vector updates: numpy BLAS threads would spin against torch's
        res = scipy.optimize.minimize(fun, theta0, jac=True, method="L-BFGS-B",
                                      options={"maxiter": cfg.max_iter, "gtol": cfg.tol,
                                               "ftol": 64 * np.finfo(float).eps, "maxcor": 20})
    theta = torch.from_numpy(res.x).to(dev)
    u = theta[:split].view(shape_w)
    w.copy_(pre.apply(u) if pre else u)
    b.copy_(theta[split:])
    grad_max = float(np.abs(res.jac).max()) if res.jac is not None else float("inf")
    return int(res.nit), bool(res.nit < cfg.max_iter or grad_max <= cfg.tol)


def fit_logreg(x: dict[str, np.ndarray], y: dict[str, np.ndarray], info: TaskInfo, cfg: LogRegConfig = LogRegConfig(),
               train_rows: np.ndarray | None = None, device: torch.device | str = "cpu") -> LogRegResult:
    """Fit on ``x['train'][train_rows]`` (all rows by default) for every C, choose C on validation AUC, score test.

    ``x``: float features N x D per split (memory maps are fine: read a chunk at a time); ``y``: MedMNIST-layout
    labels. Deterministic on CPU: zero initialisation, a fixed C path, no randomness."""
    if not cfg.c_grid or min(cfg.c_grid) <= 0:
        raise ValueError(f"logreg c_grid must be non-empty and positive, got {cfg.c_grid}")
    device = torch.device(device)
    xtr = x["train"]
    rows = np.arange(len(xtr)) if train_rows is None else np.sort(np.asarray(train_rows))
    if len(rows) < 2:
        raise ValueError(f"{info.flag}: need at least 2 training rows for the logistic regression, got {len(rows)}")
    mu, sd = standardizer(xtr, rows)
    softmax = info.task not in (BINARY, MULTI_LABEL)
    obj = _Objective(xtr, rows, dense_targets(y["train"], info), mu, sd, softmax, device)
    spec = spectrum(obj) if cfg.precondition else None
    basis = spec[1] if spec is not None and obj.rotate(spec[1]) else None  # the solver's weights are in this basis
    k = n_logits(info)
    w = torch.zeros(obj.d, k, dtype=torch.float64, device=device)
    b = torch.zeros(k, dtype=torch.float64, device=device)
    y_val = np.asarray(y["val"])
    best: tuple | None = None
    grid = sorted(set(float(c) for c in cfg.c_grid))
    for c in grid:  # strong to weak penalty, each fit warm-started from the previous optimum
        pre = Preconditioner(spec[0], None if basis is not None else spec[1], c, obj.n) if spec is not None else None
        n_iter, ok = solve(obj, w, b, c, cfg, pre)
        w_x = basis @ w if basis is not None else w  # in the features' own coordinates
        val_scores = task_scores(logits_of(x["val"], w_x, b, mu, sd), info)
        auc = auc_or_nan(y_val, val_scores, info.task)
        key = -1.0 if math.isnan(auc) else auc
        if best is None or key > best[0] + 1e-12:
            best = (key, c, w_x.clone(), b.clone(), val_scores, auc, n_iter, ok)
    _, c, wb, bb, val_scores, val_auc, n_iter, ok = best
    if not ok:
        warnings.warn(f"logreg on {info.flag}: L-BFGS did not converge in {cfg.max_iter} iterations at C={c:g}",
                      stacklevel=2)
    test_scores = task_scores(logits_of(x["test"], wb, bb, mu, sd), info)
    return LogRegResult(test_scores=test_scores, val_scores=val_scores, auc=get_auc(y["test"], test_scores, info.task),
                        acc=get_acc(y["test"], test_scores, info.task), val_auc=val_auc, c=c,
                        at_edge=len(grid) > 1 and c in (grid[0], grid[-1]), n_iter=n_iter, converged=ok)
