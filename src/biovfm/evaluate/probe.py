"""The paper's linear probe (LN -> BN -> Linear, AdamW, cosine) on cached features.

``PAPER_PROBE`` is the paper's protocol as this project ran it: BN in train mode, the L2 value and each head's
epoch chosen on validation loss, 100 epochs of batch 128 whatever the task's size. The default ``ProbeConfig()``
changes four things, each measured against an independent, converged logistic regression on the same features
(benchmarks/probe_fidelity.py): the head trains in whitened coordinates of the training features (the same
linear model and penalty, but conditioned for Adam: on collinear features the paper's head stops far short of
its regularised optimum, so its L2 value hardly matters), the L2 value is chosen on validation AUC (the metric
reported; ties to the lower validation loss), every head keeps its last epoch, and a small task trains for at
least ``min_steps`` optimiser steps (more epochs, same batch).

One addition to the paper's protocol: an L2 penalty ``lam * ||W||^2`` tuned on validation data over a
wide log grid, extended automatically when the choice lands on an edge (see synthetic-pilot 4.6: an
edge choice biases baselines and slopes). All grid values train as one batched tensor ``[G, D, C]``.
LN and BN (or the whitening) come before the linear layer, so their outputs (and BN's running statistics)
are the same for every head and are computed once per batch; the heads share the initial weights and the
shuffle order, so a head's trajectory does not depend on which other grid values are trained with it.

Why an L2 term in the loss rather than AdamW's decoupled decay: Adam's fixed points are the zeros
of the gradient, so the penalised loss converges towards the ridge-regularised optimum itself;
decoupled decay at lr 0.01 with a cosine schedule to 0 shrinks weights by an amount that depends
on the schedule, not on the objective. The penalty covers the weights, not the bias.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from biovfm.data.medmnist import BINARY, MULTI_LABEL, TaskInfo
from biovfm.evaluate.metrics import auc_or_nan, get_acc, get_auc, scores_from_logits

LN_EPS = 1e-6
LN_CHUNK = 4096  # rows per float64 block of layer_norm (2 blocks of 77 MB at 2352 features)
BN_EPS = 1e-6
BN_MOMENTUM = 0.1  # torch BatchNorm1d default, as in the paper's head
INIT_STD = 0.01
VALUES_PER_EXTENSION = 2
# Intra-op threads while a probe trains. The matrices are tiny, and on a shared 2-core box a second
# OpenMP thread made the same fit 2-20x slower (spin-waiting on a busy core); 1 thread is predictable.
PROBE_THREADS = 1


SELECT_L2 = ("auc", "loss")  # the validation quantity that picks the L2 value
SELECT_EPOCH = ("last", "best_loss")  # which epoch's weights a head keeps
AUC_TIE = 1e-9  # validation AUCs closer than this are a tie, broken by the lower validation loss
WHITEN_REL_TOL = 1e-6  # whitened directions need variance above this fraction of the largest (LN's null: ~1e-14)
WHITEN_MAX_ROWS = 20_000  # training rows (evenly spaced) for the whitening covariance; mean and variance use all


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's settings; a one-value ``l2_grid`` means a fixed penalty, never extended.

    ``whiten``: train the heads on PCA-whitened standardised features (population statistics of the training
    split instead of train-mode BN), the penalty kept on the standardised-feature weights; ``False`` (paper):
    BN in train mode. ``select_l2``: ``"auc"`` picks the L2 value of the highest validation AUC (ties: lower
    validation loss); ``"loss"`` (paper) the lowest validation loss. ``select_epoch``: ``"last"`` keeps each
    head's final weights; ``"best_loss"`` (paper) its lowest-validation-loss epoch. ``min_steps``: train at
    least this many optimiser steps, adding epochs on a small task (0, paper: the fixed ``epochs``).
    ``PAPER_PROBE`` sets all four to the paper's values."""

    lr: float = 0.01
    epochs: int = 100
    batch_size: int = 128
    l2_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    max_grid_extensions: int = 3
    select_l2: str = "auc"
    select_epoch: str = "last"
    min_steps: int = 700  # 500 train images: 234 epochs; measured as good as 1000 at 3/4 of its cost
    whiten: bool = True

    def __post_init__(self) -> None:
        if self.select_l2 not in SELECT_L2:
            raise ValueError(f"select_l2 must be one of {SELECT_L2}, got {self.select_l2!r}")
        if self.select_epoch not in SELECT_EPOCH:
            raise ValueError(f"select_epoch must be one of {SELECT_EPOCH}, got {self.select_epoch!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, min_steps >= 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.min_steps}")


# The paper's protocol exactly (as the project ran it before the fidelity fixes): params.yaml evaluate.probe
# whiten: false, select_l2: loss, select_epoch: best_loss, min_steps: 0, the other values at their defaults.
PAPER_PROBE = ProbeConfig(select_l2="loss", select_epoch="best_loss", min_steps=0, whiten=False)


@dataclass
class ProbeResult:
    test_scores: np.ndarray  # probabilities, N_test x C (or x 14 for multi-label)
    val_scores: np.ndarray
    auc: float
    acc: float  # test metrics via metrics.get_auc/get_acc with the task's semantics
    val_auc: float
    val_loss: float
    l2: float  # chosen value
    l2_grid: list[float]  # final grid (after extensions)
    at_edge: bool  # True only if still at an edge after max extensions
    best_epoch: int  # 0-based epoch whose weights were kept (Lightning's numbering): the last, or lowest val loss
    epochs: int = 0  # epochs trained (``cfg.epochs``, or more on a small task under ``min_steps``)


@dataclass
class HeadFit:
    """Per-head training outcome; the arrays are indexed by head (grid value) first."""

    l2: list[float]
    val_loss_history: np.ndarray  # epochs x G, data loss only (no penalty); NaN before the last under "last"
    best_epoch: np.ndarray  # G, the kept epoch (the last one under select_epoch="last")
    best_val_loss: np.ndarray  # G, val loss of the kept weights
    weight: torch.Tensor  # G x D x C, at each head's kept epoch (float64 when trained whitened)
    bias: torch.Tensor  # G x C
    running_mean: torch.Tensor  # G x D, BN running stats at each head's kept epoch (whitened: the train split's)
    running_var: torch.Tensor  # G x D


# ----------------------------------------------------------------------------- pure helpers


def layer_norm(x: np.ndarray, chunk: int = LN_CHUNK, out: np.ndarray | None = None) -> torch.Tensor:
    """The paper's frozen ``fc_norm``: per-sample standardisation, identity affine, eps 1e-6.

    Computed in float64 ``chunk`` rows at a time into a float32 result: the same numbers as the whole matrix
    in float64 (each row's statistics are its own), with the float64 copy bounded by the chunk, not the data.
    ``out`` (float32, may be ``x`` itself) receives the result instead of a new array."""
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32) if out is None else out
    for start in range(0, len(x), chunk):
        c = np.array(x[start:start + chunk], dtype=np.float64)  # a copy: normalised in place below
        var = c.var(axis=1, keepdims=True)
        c -= c.mean(axis=1, keepdims=True)
        c /= np.sqrt(var + LN_EPS)
        out[start:start + chunk] = c
    return torch.from_numpy(out)


def train_epochs(cfg: ProbeConfig, n_train: int) -> int:
    """Epochs to train: ``cfg.epochs``, or enough for ``cfg.min_steps`` steps of drop_last batches.

    Why: at batch 128 a task of 546 images gets 4 steps an epoch, 400 in all; the probe then stops short of the
    regularised optimum that a converged logistic regression reaches on the same features."""
    per_epoch = max(n_train // min(cfg.batch_size, n_train), 1)
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped per epoch, in closed form."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def head_losses(logits: torch.Tensor, target: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Mean data loss per head for logits ``G x N x C``: BCE (multi-label) or CE (all else)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none").mean(dim=(1, 2))
    picked = logits.gather(2, target.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    return (torch.logsumexp(logits, dim=2) - picked).mean(dim=1)  # = cross_entropy, ~5x faster for small C


def extend_grid(grid: list[float], side: str, n: int = VALUES_PER_EXTENSION) -> list[float]:
    """``n`` more values beyond the ``'low'`` or ``'high'`` edge, continuing the edge's log step."""
    g = sorted(grid)
    if side == "low":
        ratio = g[1] / g[0]
        return [g[0] / ratio**k for k in range(n, 0, -1)]
    ratio = g[-1] / g[-2]
    return [g[-1] * ratio**k for k in range(1, n + 1)]


def edge_side(grid: list[float], chosen: float) -> str | None:
    """Which edge of the grid ``chosen`` sits on; None when interior (or a one-value, fixed grid)."""
    g = sorted(grid)
    if len(g) < 2:
        return None
    if chosen == g[0]:
        return "low"
    if chosen == g[-1]:
        return "high"
    return None


def _open_edge(fit: "HeadFit", best: int, rel_tol: float = 1e-3) -> str | None:
    """The edge to extend the grid beyond, or None. At the low edge the search is over once the two weakest
    penalties give the same validation loss: the probe has reached its unregularised limit (where early
    stopping on validation loss is the regulariser), and smaller values cannot change the choice."""
    side = edge_side(fit.l2, fit.l2[best])
    if side == "low" and len(fit.l2) > 1:
        a, b = float(fit.best_val_loss[0]), float(fit.best_val_loss[1])
        if abs(a - b) <= rel_tol * abs(b):
            return None
    return side


def _targets(y: np.ndarray, info: TaskInfo, split: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != info.label_columns:
        raise ValueError(f"{split} labels have shape {y.shape}; task {info.flag} expects N x {info.label_columns}")
    if info.task == MULTI_LABEL:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{split} labels of multi-label task {info.flag} must be 0/1")
        return torch.from_numpy(y.astype(np.float32))
    if y.min() < 0 or y.max() >= info.n_outputs:
        raise ValueError(f"{split} labels span [{y.min()}, {y.max()}]; task {info.flag} has {info.n_outputs} classes")
    return torch.from_numpy(y[:, 0].astype(np.int64))


def _bn_eval(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """BN in eval mode with per-head running stats: ``N x D`` -> ``G x N x D``."""
    return (x.unsqueeze(0) - mean.unsqueeze(1)) / torch.sqrt(var.unsqueeze(1) + BN_EPS)


# ----------------------------------------------------------------------------- training


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count, restoring the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_head(d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Linear(D, C)`` init of the paper: trunc-normal std 0.01 (timm bounds +-2), torch default bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(c, d)
    torch.nn.init.trunc_normal_(w, std=INIT_STD, a=-2.0, b=2.0, generator=gen)
    bound = 1.0 / math.sqrt(d)
    b = torch.empty(c).uniform_(-bound, bound, generator=gen)
    return w.t().contiguous(), b


def batch_norm_train(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode BN: normalise by batch mean and biased variance; also return both for running stats.

    Written out because ``Tensor.var(dim=0)`` is ~10x slower than this on CPU.
    """
    mu = x.mean(0)
    xc = x - mu
    var = xc.square().mean(0)
    return xc * torch.rsqrt(var + BN_EPS), mu, var


def data_grad(logits: torch.Tensor, dense_target: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Gradient of ``head_losses(...).sum()`` w.r.t. logits ``B x G x C``.

    ``dense_target`` is ``B x C``: the 0/1 labels (BCE) or the one-hot class (CE), so both losses
    reduce to ``(probabilities - target) / normaliser``.
    """
    b, _, c = logits.shape
    if multi_label:
        return (torch.sigmoid(logits) - dense_target.unsqueeze(1)) / (b * c)
    p = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # torch.softmax is ~4x slower for small C
    p /= p.sum(dim=-1, keepdim=True)
    return (p - dense_target.unsqueeze(1)) / b


@dataclass
class _Adam:
    """AdamW with weight_decay 0 (the paper's setting), torch's update formula, on one tensor.

    Adam is elementwise, so one ``(D+1) x (G*C)`` tensor (weights plus a bias row) updates exactly
    like G separate Linear heads, at a fraction of the per-step overhead.
    """

    param: torch.Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.m = torch.zeros_like(self.param)
        self.v = torch.zeros_like(self.param)
        self.t = 0

    def step(self, grad: torch.Tensor, lr: float) -> None:
        self.t += 1
        self.m.lerp_(grad, 1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        denom = (self.v.sqrt() / math.sqrt(1 - self.beta2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - self.beta1**self.t))


@dataclass
class Whitening:
    """The training split's standardisation and PCA whitening: ``u = ((x - mean) / sqrt(var + BN_EPS)) @ basis``
    has identity covariance on train (directions of negligible variance dropped).

    Why: the LN-ed features of a ViT (and raw pixels) are strongly collinear; the optimum then needs large weights
    along low-variance directions, which Adam at lr 0.01 does not reach in a few hundred steps, so the head behaves
    as if heavily regularised whatever its L2 value. In whitened coordinates the same linear model is well
    conditioned. The penalty stays on the standardised-feature weights ``W = basis @ U``: ``||W||^2 = sum_k
    U_k^2 / e_k``, so ``inv_eig`` scales the penalty per whitened direction and the objective is unchanged."""

    mean: torch.Tensor  # D, float64
    var: torch.Tensor  # D, float64 (population variance, as the BN running statistics estimate it)
    basis: torch.Tensor  # D x r, float64
    inv_eig: torch.Tensor  # r, float64

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / torch.sqrt(self.var + BN_EPS)

    def apply(self, x: torch.Tensor, chunk: int = LN_CHUNK) -> torch.Tensor:
        """Whitened float32 features ``N x r``, computed in float64 ``chunk`` rows at a time."""
        out = torch.empty(len(x), self.basis.shape[1])
        for i in range(0, len(x), chunk):
            out[i:i + chunk] = self.standardize(x[i:i + chunk]) @ self.basis
        return out


def column_moments(x: torch.Tensor, chunk: int = LN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and population variance in float64, ``chunk`` rows at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].double().sum(0)
    mean = total / len(x)
    sq = torch.zeros_like(mean)
    for i in range(0, len(x), chunk):
        sq += (x[i:i + chunk].double() - mean).square().sum(0)
    return mean, sq / len(x)


def whitening(x: torch.Tensor, rel_tol: float = WHITEN_REL_TOL, max_rows: int = WHITEN_MAX_ROWS,
              chunk: int = LN_CHUNK) -> Whitening:
    """The whitening of training features ``x`` (N x D): mean and variance over all rows, the covariance of the
    standardised features over at most ``max_rows`` evenly spaced rows (the basis needs only be close to exact:
    it conditions the optimisation, the objective does not depend on it); eigen-directions below ``rel_tol`` of
    the largest eigenvalue (LayerNorm's null direction, rounding) are dropped."""
    mean, var = column_moments(x, chunk)
    w = Whitening(mean, var, torch.empty(0), torch.empty(0))
    sample = x[::max(1, math.ceil(len(x) / max_rows))]
    m, d = sample.shape
    if m < d:  # fewer rows than features: the SVD of the rows is the cheaper route
        _, sv, vh = torch.linalg.svd(w.standardize(sample), full_matrices=False)
        eig, vecs = sv.square() / m, vh.t()
    else:
        cov = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, m, chunk):
            z = w.standardize(sample[i:i + chunk])
            cov.addmm_(z.t(), z)
        eig, vecs = torch.linalg.eigh(cov / m)
    keep = eig > rel_tol * eig.max().clamp_min(1e-300)
    w.basis, w.inv_eig = vecs[:, keep] / eig[keep].sqrt(), 1.0 / eig[keep]
    return w


def train_heads(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    l2: list[float],
    n_outputs: int,
    multi_label: bool,
    cfg: ProbeConfig,
    seed: int,
    white: Whitening | None = None,
) -> HeadFit:
    """Train one head per L2 value in one batched computation; keep each head's last or lowest-val-loss epoch.

    Inputs are LayerNorm-ed features. Paper (``whiten=False``): train-mode BN uses batch statistics (shared by
    all heads), val uses the running statistics of the same epoch, exactly as the paper's Lightning loop.
    ``whiten=True``: the heads train on the whitened features of ``white`` (computed here when not given), the
    penalty still on the standardised-feature weights, and are folded back into the BN-eval form at the end
    (the whitened train and val features are float32 copies, ``N x r`` with ``r <= D``).
    Gradients are written out (CE/BCE + ``2 lam W``) because autograd's per-step overhead dominated.
    """
    n, d = x_train.shape
    g, c = len(l2), n_outputs
    if n < 2:
        raise ValueError(f"need at least 2 training samples for batch-norm, got {n}")
    batch = min(cfg.batch_size, n)  # drop_last would otherwise leave no step at all
    steps = n // batch
    epochs = train_epochs(cfg, n)
    keep_best = cfg.select_epoch == "best_loss"
    if cfg.whiten:
        white = white if white is not None else whitening(x_train)
        feats, feats_val, scale = white.apply(x_train), white.apply(x_val), white.inv_eig.float()
    else:
        feats, feats_val, scale = x_train, None, torch.ones(d)
    k = feats.shape[1]  # inputs of the trained weights: D, or the kept whitened directions
    w0, b0 = _init_head(k, c, seed)
    # Rows 0..k-1: weights, row k: bias; columns: head-major blocks of C.
    param = torch.cat([w0, b0[None]]).repeat(1, g)
    two_lam = (2.0 * torch.tensor(l2, dtype=torch.float32)).repeat_interleave(c)  # G*C, bias row exempt
    penalty = scale[:, None] * two_lam  # k x G*C: 2 lam (paper), 2 lam / eigenvalue (whitened)
    adam = _Adam(param)
    shuffle = torch.Generator().manual_seed(seed + 1)
    run_mean, run_var = torch.zeros(d), torch.ones(d)
    ones = torch.ones(batch, 1)
    dense = y_train.float() if multi_label else F.one_hot(y_train, c).float()

    history = np.full((epochs, g), np.nan)
    best_loss = np.full(g, np.inf)
    best_epoch = np.zeros(g, dtype=np.int64)
    best_param = param.view(k + 1, g, c).clone()
    best_mean, best_var = run_mean.expand(g, d).clone(), run_var.expand(g, d).clone()

    for epoch in range(epochs):
        lr = cosine_lr(cfg.lr, epoch, epochs)
        order = torch.randperm(n, generator=shuffle)
        for s in range(steps):
            rows = order[s * batch:(s + 1) * batch]  # a gather per step: no epoch-sized copy of the features
            xb = feats[rows]
            if not cfg.whiten:
                xb, mu, var = batch_norm_train(xb)
                run_mean.lerp_(mu, BN_MOMENTUM)
                run_var.lerp_(var * (batch / max(batch - 1, 1)), BN_MOMENTUM)  # unbiased, as torch BN
            xb = torch.cat([xb, ones], dim=1)
            grad_z = data_grad((xb @ param).view(batch, g, c), dense[rows], multi_label)
            grad = xb.t() @ grad_z.view(batch, g * c)
            grad[:k].addcmul_(param[:k], penalty)
            adam.step(grad, lr)
        if not keep_best and epoch < epochs - 1:
            continue  # "last" needs the final validation loss only (the history stays NaN before it)
        xv = feats_val if cfg.whiten else (x_val - run_mean) * torch.rsqrt(run_var + BN_EPS)
        logits = (xv @ param[:k] + param[k]).view(-1, g, c).transpose(0, 1)
        val = head_losses(logits, y_val, multi_label).numpy()
        history[epoch] = val
        # strict: ties keep the earlier epoch, like ModelCheckpoint; "last" keeps the final weights
        better = val < best_loss if keep_best else np.ones(g, dtype=bool)
        if better.any():
            m = torch.from_numpy(better)
            best_loss[better], best_epoch[better] = val[better], epoch
            best_param[:, m] = param.view(k + 1, g, c)[:, m]
            best_mean[m], best_var[m] = run_mean, run_var
    weight = best_param[:k].permute(1, 0, 2).contiguous()
    if cfg.whiten:  # back to weights on the standardised features, in float64 (they can be large and cancel)
        return HeadFit(list(l2), history, best_epoch, best_loss, white.basis @ weight.double(),
                       best_param[k].double(), white.mean.expand(g, d).clone(), white.var.expand(g, d).clone())
    return HeadFit(list(l2), history, best_epoch, best_loss, weight, best_param[k].clone(), best_mean, best_var)


def head_logits(fit: HeadFit, head: int, x: torch.Tensor) -> np.ndarray:
    """Logits of one head at its kept epoch for LayerNorm-ed features ``x``."""
    h = slice(head, head + 1)
    with torch.no_grad():
        z = _bn_eval(x, fit.running_mean[h], fit.running_var[h])
        return (torch.matmul(z, fit.weight[h]) + fit.bias[h].unsqueeze(1))[0].double().numpy()


def _merge(a: HeadFit, b: HeadFit) -> HeadFit:
    """Concatenate two fits' heads and sort them by L2 value."""
    l2 = a.l2 + b.l2
    order = np.argsort(l2)
    t = torch.from_numpy(order)
    return HeadFit(
        [l2[i] for i in order],
        np.concatenate([a.val_loss_history, b.val_loss_history], axis=1)[:, order],
        np.concatenate([a.best_epoch, b.best_epoch])[order],
        np.concatenate([a.best_val_loss, b.best_val_loss])[order],
        torch.cat([a.weight, b.weight])[t],
        torch.cat([a.bias, b.bias])[t],
        torch.cat([a.running_mean, b.running_mean])[t],
        torch.cat([a.running_var, b.running_var])[t],
    )


def column_aucs(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column of ``scores`` (N x K) against the 0/1 columns of ``truth`` (N x K), NaN where a
    column has one class only. The rank-sum (Mann-Whitney) form with average ranks for ties, which is the value
    ``roc_auc_score`` gives, for all columns in one call: sklearn's per-call checks cost more than the probe's
    training when a grid of heads is scored on a multi-class task."""
    ranks = rankdata(scores, axis=0)
    pos = truth.sum(axis=0)
    neg = len(truth) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * truth).sum(axis=0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def metric_columns(y: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The (truth, score) column pairs whose mean AUC is the MedMNIST AUC (metrics.get_auc): every label
    (multi-label), the last column (binary), every class one-vs-rest (multi-class, ordinal)."""
    y = np.asarray(y).reshape(len(scores), -1)
    if task == MULTI_LABEL:
        return y.astype(np.float64), scores
    if task == BINARY:
        return (y[:, :1] == 1).astype(np.float64), scores[:, -1:]
    return (y[:, :1] == np.arange(scores.shape[1])).astype(np.float64), scores


def head_val_aucs(fit: HeadFit, x_val: torch.Tensor, y_val: np.ndarray, task: str) -> np.ndarray:
    """Validation AUC (MedMNIST semantics) of every head; NaN where undefined (a class absent from val)."""
    scores = [scores_from_logits(head_logits(fit, h, x_val), task) for h in range(len(fit.l2))]
    cols = [metric_columns(y_val, sc, task) for sc in scores]
    truth, k = cols[0][0], cols[0][0].shape[1]
    aucs = column_aucs(np.tile(truth, len(cols)), np.concatenate([c[1] for c in cols], axis=1))
    return aucs.reshape(len(cols), k).mean(axis=1)  # NaN if any column is undefined, as get_auc raises


def choose_head(val_loss: np.ndarray, val_auc: np.ndarray | None = None) -> int:
    """The head of the highest validation AUC, ties to the lower validation loss; lowest loss without AUCs.

    Why AUC: it is the metric reported, and the lowest cross-entropy on a small validation set often belongs
    to a different penalty than the best ranking. Without a defined AUC (a class absent from val) the loss decides."""
    loss = np.where(np.isfinite(val_loss), val_loss, np.inf)
    if val_auc is None or not np.isfinite(val_auc).any():
        return int(np.argmin(loss))
    auc = np.where(np.isfinite(val_auc), val_auc, -np.inf)
    tied = np.flatnonzero(auc >= auc.max() - AUC_TIE)
    return int(tied[np.argmin(loss[tied])])


def _features(x: np.ndarray, split: str, d: int | None = None, inplace: bool = False,
              normalized: bool = False) -> torch.Tensor:
    """Validated features, LayerNorm-ed unless ``normalized`` says they already are."""
    x = np.asarray(x)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"{split} features have shape {x.shape}; expected N x D" + (f" with D={d}" if d else ""))
    if not all(np.isfinite(x[i:i + LN_CHUNK]).all() for i in range(0, len(x), LN_CHUNK)):
        raise ValueError(f"{split} features contain NaN or inf")
    if normalized:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    in_place = inplace and x.dtype == np.float32 and x.flags.writeable and x.flags.c_contiguous
    return layer_norm(x, out=x if in_place else None)


def normalize_features(x: np.ndarray, split: str = "features", inplace: bool = False) -> np.ndarray:
    """Validated, LayerNorm-ed float32 features (the paper's frozen fc_norm, part of the representation).

    For a caller that hands the same features to several estimators: normalise once, then call ``fit_probe``
    with ``normalized=True``. ``inplace`` writes into ``x`` when it is a writable C-contiguous float32 array."""
    return _features(x, split, None, inplace).numpy()


def fit_probe(
    x: dict[str, np.ndarray],
    y: dict[str, np.ndarray],
    info: TaskInfo,
    cfg: ProbeConfig = ProbeConfig(),
    seed: int = 0,
    inplace: bool = False,
    normalized: bool = False,
) -> ProbeResult:
    """x and y keyed by 'train'/'val'/'test'; x float arrays N x D; y integer label arrays N x L (MedMNIST layout: L=1 class index, or 14 for multi-label).

    ``inplace``: LayerNorm float32 feature arrays in place (the evaluation job's own buffers, possibly memory-mapped
    files) instead of copying them: the probe then adds nothing of the features' size. ``normalized``: the features
    are LayerNorm-ed already (``normalize_features``), so the probe does not normalise them again."""
    if not cfg.l2_grid or min(cfg.l2_grid) <= 0:
        raise ValueError(f"l2_grid must be non-empty and positive (log grid), got {cfg.l2_grid}")
    d = np.asarray(x["train"]).shape[-1]
    feats = {s: _features(x[s], s, d, inplace, normalized) for s in ("train", "val", "test")}
    targets = {s: _targets(y[s], info, s) for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        if len(targets[s]) != len(feats[s]):
            raise ValueError(f"{s}: {len(feats[s])} feature rows but {len(targets[s])} label rows")
    multi = info.task == MULTI_LABEL

    with _torch_threads(PROBE_THREADS):
        white = whitening(feats["train"]) if cfg.whiten else None

    def train(l2: list[float]) -> HeadFit:
        with _torch_threads(PROBE_THREADS):
            return train_heads(
                feats["train"], targets["train"], feats["val"], targets["val"], l2, info.n_outputs, multi, cfg, seed,
                white,
            )

    def choose(fit: HeadFit) -> int:
        if cfg.select_l2 == "loss":
            return choose_head(fit.best_val_loss)
        return choose_head(fit.best_val_loss, head_val_aucs(fit, feats["val"], y["val"], info.task))

    fit = train(sorted(set(cfg.l2_grid)))
    if not np.isfinite(fit.best_val_loss).any():
        raise FloatingPointError(f"probe on {info.flag}: validation loss was never finite for any L2 value")
    best = choose(fit)
    side = _open_edge(fit, best)
    for _ in range(cfg.max_grid_extensions):
        if side is None:
            break
        fit = _merge(fit, train(extend_grid(fit.l2, side)))
        best = choose(fit)
        side = _open_edge(fit, best)

    val_scores = scores_from_logits(head_logits(fit, best, feats["val"]), info.task)
    test_scores = scores_from_logits(head_logits(fit, best, feats["test"]), info.task)
    return ProbeResult(
        test_scores=test_scores,
        val_scores=val_scores,
        auc=get_auc(y["test"], test_scores, info.task),
        acc=get_acc(y["test"], test_scores, info.task),
        val_auc=auc_or_nan(y["val"], val_scores, info.task),
        val_loss=float(fit.best_val_loss[best]),
        l2=float(fit.l2[best]),
        l2_grid=[float(v) for v in fit.l2],
        at_edge=side is not None,
        best_epoch=int(fit.best_epoch[best]),
        epochs=len(fit.val_loss_history),
    )
