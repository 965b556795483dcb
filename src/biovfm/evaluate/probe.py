"""The paper's linear probe (LN -> BN -> Linear, AdamW, cosine, best-val-loss epoch) on cached features.

One addition to the paper's protocol: an L2 penalty ``lam * ||W||^2`` tuned on validation loss over a
wide log grid, extended automatically when the choice lands on an edge (see synthetic-pilot 4.6: an
edge choice biases baselines and slopes). All grid values train as one batched tensor ``[G, D, C]``.
LN and BN come before the linear layer, so their outputs (and BN's running statistics) are the same
for every head and are computed once per batch; the heads share the initial weights and the shuffle
order, so a head's trajectory does not depend on which other grid values are trained with it.

Why an L2 term in the loss rather than AdamW's decoupled decay: Adam's fixed points are the zeros
of the gradient, so the penalised loss converges towards the ridge-regularised optimum itself;
decoupled decay at lr 0.01 with a cosine schedule to 0 shrinks weights by an amount that depends
on the schedule, not on the objective. The penalty covers the weights, not the bias.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from biovfm.data.medmnist import MULTI_LABEL, TaskInfo
from biovfm.evaluate.metrics import UndefinedAUCError, get_acc, get_auc, scores_from_logits

LN_EPS = 1e-6
LN_CHUNK = 4096  # rows per float64 block of layer_norm (2 blocks of 77 MB at 2352 features)
BN_EPS = 1e-6
BN_MOMENTUM = 0.1  # torch BatchNorm1d default, as in the paper's head
INIT_STD = 0.01
VALUES_PER_EXTENSION = 2
# Intra-op threads while a probe trains. The matrices are tiny, and on a shared 2-core box a second
# OpenMP thread made the same fit 2-20x slower (spin-waiting on a busy core); 1 thread is predictable.
PROBE_THREADS = 1


@dataclass(frozen=True)
class ProbeConfig:
    """Paper defaults plus the L2 grid; a one-value ``l2_grid`` means a fixed penalty, never extended."""

    lr: float = 0.01
    epochs: int = 100
    batch_size: int = 128
    l2_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    max_grid_extensions: int = 3


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
    best_epoch: int  # 0-based epoch whose weights gave the lowest val loss (Lightning's numbering)


@dataclass
class HeadFit:
    """Per-head training outcome; the arrays are indexed by head (grid value) first."""

    l2: list[float]
    val_loss_history: np.ndarray  # epochs x G, data loss only (no penalty)
    best_epoch: np.ndarray  # G
    best_val_loss: np.ndarray  # G
    weight: torch.Tensor  # G x D x C, at each head's best epoch
    bias: torch.Tensor  # G x C
    running_mean: torch.Tensor  # G x D, BN running stats at each head's best epoch
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
) -> HeadFit:
    """Train one head per L2 value in one batched computation; keep each head's lowest-val-loss epoch.

    Inputs are LayerNorm-ed features. Train-mode BN uses batch statistics (shared by all heads),
    val uses the running statistics of the same epoch, exactly as the paper's Lightning loop.
    Gradients are written out (CE/BCE + ``2 lam W``) because autograd's per-step overhead dominated.
    """
    n, d = x_train.shape
    g, c = len(l2), n_outputs
    if n < 2:
        raise ValueError(f"need at least 2 training samples for batch-norm, got {n}")
    batch = min(cfg.batch_size, n)  # drop_last would otherwise leave no step at all
    steps = n // batch
    w0, b0 = _init_head(d, c, seed)
    # Rows 0..D-1: weights, row D: bias; columns: head-major blocks of C.
    param = torch.cat([w0, b0[None]]).repeat(1, g)
    two_lam = (2.0 * torch.tensor(l2, dtype=torch.float32)).repeat_interleave(c)  # G*C, bias row exempt
    adam = _Adam(param)
    shuffle = torch.Generator().manual_seed(seed + 1)
    run_mean, run_var = torch.zeros(d), torch.ones(d)
    ones = torch.ones(batch, 1)
    dense = y_train.float() if multi_label else F.one_hot(y_train, c).float()

    history = np.empty((cfg.epochs, g))
    best_loss = np.full(g, np.inf)
    best_epoch = np.zeros(g, dtype=np.int64)
    best_param = param.view(d + 1, g, c).clone()
    best_mean, best_var = run_mean.expand(g, d).clone(), run_var.expand(g, d).clone()

    for epoch in range(cfg.epochs):
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs)
        order = torch.randperm(n, generator=shuffle)
        for s in range(steps):
            rows = order[s * batch:(s + 1) * batch]  # a gather per step: no epoch-sized copy of the features
            xb, mu, var = batch_norm_train(x_train[rows])
            run_mean.lerp_(mu, BN_MOMENTUM)
            run_var.lerp_(var * (batch / max(batch - 1, 1)), BN_MOMENTUM)  # unbiased, as torch BN
            xb = torch.cat([xb, ones], dim=1)
            grad_z = data_grad((xb @ param).view(batch, g, c), dense[rows], multi_label)
            grad = xb.t() @ grad_z.view(batch, g * c)
            grad[:d].addcmul_(param[:d], two_lam)
            adam.step(grad, lr)
        xv = (x_val - run_mean) * torch.rsqrt(run_var + BN_EPS)
        logits = (xv @ param[:d] + param[d]).view(-1, g, c).transpose(0, 1)
        val = head_losses(logits, y_val, multi_label).numpy()
        history[epoch] = val
        better = val < best_loss  # strict: ties keep the earlier epoch, like ModelCheckpoint
        if better.any():
            m = torch.from_numpy(better)
            best_loss[better], best_epoch[better] = val[better], epoch
            best_param[:, m] = param.view(d + 1, g, c)[:, m]
            best_mean[m], best_var[m] = run_mean, run_var
    weight = best_param[:d].permute(1, 0, 2).contiguous()
    return HeadFit(list(l2), history, best_epoch, best_loss, weight, best_param[d].clone(), best_mean, best_var)


def head_logits(fit: HeadFit, head: int, x: torch.Tensor) -> np.ndarray:
    """Logits of one head at its best epoch for LayerNorm-ed features ``x``."""
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


def _val_auc(y: np.ndarray, scores: np.ndarray, task: str) -> float:
    """Validation AUC, NaN with a warning when undefined: a tiny val split must not abort the probe."""
    try:
        return get_auc(y, scores, task)
    except UndefinedAUCError as e:
        warnings.warn(f"val AUC set to NaN: {e}", stacklevel=3)
        return float("nan")


def _features(x: np.ndarray, split: str, d: int | None = None, inplace: bool = False) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"{split} features have shape {x.shape}; expected N x D" + (f" with D={d}" if d else ""))
    if not all(np.isfinite(x[i:i + LN_CHUNK]).all() for i in range(0, len(x), LN_CHUNK)):
        raise ValueError(f"{split} features contain NaN or inf")
    in_place = inplace and x.dtype == np.float32 and x.flags.writeable and x.flags.c_contiguous
    return layer_norm(x, out=x if in_place else None)


def fit_probe(
    x: dict[str, np.ndarray],
    y: dict[str, np.ndarray],
    info: TaskInfo,
    cfg: ProbeConfig = ProbeConfig(),
    seed: int = 0,
    inplace: bool = False,
) -> ProbeResult:
    """x and y keyed by 'train'/'val'/'test'; x float arrays N x D; y integer label arrays N x L (MedMNIST layout: L=1 class index, or 14 for multi-label).

    ``inplace``: LayerNorm float32 feature arrays in place (the evaluation job's own buffers, possibly memory-mapped
    files) instead of copying them: the probe then adds nothing of the features' size."""
    if not cfg.l2_grid or min(cfg.l2_grid) <= 0:
        raise ValueError(f"l2_grid must be non-empty and positive (log grid), got {cfg.l2_grid}")
    d = np.asarray(x["train"]).shape[-1]
    feats = {s: _features(x[s], s, d, inplace) for s in ("train", "val", "test")}
    targets = {s: _targets(y[s], info, s) for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        if len(targets[s]) != len(feats[s]):
            raise ValueError(f"{s}: {len(feats[s])} feature rows but {len(targets[s])} label rows")
    multi = info.task == MULTI_LABEL

    def train(l2: list[float]) -> HeadFit:
        with _torch_threads(PROBE_THREADS):
            return train_heads(
                feats["train"], targets["train"], feats["val"], targets["val"], l2, info.n_outputs, multi, cfg, seed
            )

    fit = train(sorted(set(cfg.l2_grid)))
    if not np.isfinite(fit.best_val_loss).any():
        raise FloatingPointError(f"probe on {info.flag}: validation loss was never finite for any L2 value")
    best = int(np.argmin(fit.best_val_loss))
    side = _open_edge(fit, best)
    for _ in range(cfg.max_grid_extensions):
        if side is None:
            break
        fit = _merge(fit, train(extend_grid(fit.l2, side)))
        best = int(np.argmin(fit.best_val_loss))
        side = _open_edge(fit, best)

    val_scores = scores_from_logits(head_logits(fit, best, feats["val"]), info.task)
    test_scores = scores_from_logits(head_logits(fit, best, feats["test"]), info.task)
    return ProbeResult(
        test_scores=test_scores,
        val_scores=val_scores,
        auc=get_auc(y["test"], test_scores, info.task),
        acc=get_acc(y["test"], test_scores, info.task),
        val_auc=_val_auc(y["val"], val_scores, info.task),
        val_loss=float(fit.best_val_loss[best]),
        l2=float(fit.l2[best]),
        l2_grid=[float(v) for v in fit.l2],
        at_edge=side is not None,
        best_epoch=int(fit.best_epoch[best]),
    )
