"""The batched linear probe: signal recovery, chance on noise, L2 grid selection/extension,
determinism, score shapes, epoch and L2 selection (the paper's and the default), the step floor,
and the hand-written gradients."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sklearn.linear_model import LogisticRegression

from biovfm.data.medmnist import BINARY, MULTI_CLASS, MULTI_LABEL, task_info
from biovfm.evaluate.metrics import get_auc
from biovfm.evaluate.probe import (
    PAPER_PROBE,
    ProbeConfig,
    _Adam,
    choose_head,
    column_aucs,
    data_grad,
    extend_grid,
    fit_probe,
    head_losses,
    layer_norm,
    metric_columns,
    normalize_features,
    train_epochs,
    train_heads,
    whitening,
)

SIZES = {"train": 500, "val": 300, "test": 300}


def linear_task(flag: str, d: int = 32, noise: float = 0.0, seed: int = 0, sizes: dict | None = None):
    """Gaussian features; labels from a random linear map plus Gumbel/logistic noise (0 = separable)."""
    info = task_info(flag)
    rng = np.random.default_rng(seed)
    k = info.n_labels
    w = rng.normal(size=(d, k)) * 3 / np.sqrt(d)
    x, y = {}, {}
    for split, n in (sizes or SIZES).items():
        xs = rng.normal(size=(n, d))
        z = xs @ w
        if flag == "chestmnist":
            y[split] = (z + noise * rng.logistic(size=z.shape) > 0).astype(np.int64)
        else:
            y[split] = np.argmax(z + noise * rng.gumbel(size=z.shape), axis=1)[:, None]
        x[split] = xs.astype(np.float32)
    return x, y, info


@pytest.mark.parametrize("flag", ["pathmnist", "breastmnist", "chestmnist", "retinamnist"])
def test_recovers_linear_signal_and_score_shapes(flag: str) -> None:
    x, y, info = linear_task(flag)
    r = fit_probe(x, y, info)
    assert r.auc > 0.95, (flag, r.auc)
    assert r.test_scores.shape == (SIZES["test"], info.n_outputs)  # 14 for chest, 2 for binary
    assert r.val_scores.shape == (SIZES["val"], info.n_outputs)
    assert np.all((r.test_scores >= 0) & (r.test_scores <= 1))
    if flag != "chestmnist":
        assert np.allclose(r.test_scores.sum(axis=1), 1.0)  # softmax, including binary's 2 logits
    assert r.best_epoch == r.epochs - 1 and np.isfinite(r.val_loss)  # the default keeps the last epoch
    assert r.val_auc > 0.9 and 0 <= r.acc <= 1


def test_pure_noise_labels_give_chance_auc() -> None:
    x, y, info = linear_task("octmnist", d=64, sizes={"train": 500, "val": 300, "test": 2000})
    rng = np.random.default_rng(1)
    y = {s: rng.integers(0, info.n_labels, size=v.shape) for s, v in y.items()}
    r = fit_probe(x, y, info)
    assert abs(r.auc - 0.5) < 0.04, r.auc


@pytest.mark.parametrize("cfg", [ProbeConfig(), PAPER_PROBE], ids=["default", "paper"])
def test_interior_optimum_is_chosen_without_extension(cfg: ProbeConfig) -> None:
    x, y, info = linear_task("octmnist", d=64, noise=1.0, sizes={"train": 200, "val": 300, "test": 300})
    r = fit_probe(x, y, info, cfg)
    assert r.l2_grid == list(ProbeConfig().l2_grid)
    assert min(r.l2_grid) < r.l2 < max(r.l2_grid) and not r.at_edge


def test_grid_extends_upwards_when_optimum_lies_above() -> None:
    x, y, info = linear_task("octmnist", d=64, noise=1.0, sizes={"train": 200, "val": 300, "test": 300})
    cfg = ProbeConfig(l2_grid=(1e-5, 1e-4, 1e-3))
    r = fit_probe(x, y, info, cfg)
    assert len(r.l2_grid) > 3 and max(r.l2_grid) > 1e-3
    assert r.l2 > 1e-3 and not r.at_edge
    # extension heads train separately but from the same init and shuffles: same result as one wide grid
    wide = fit_probe(x, y, info, ProbeConfig(l2_grid=tuple(r.l2_grid), max_grid_extensions=0))
    assert wide.l2 == r.l2 and wide.best_epoch == r.best_epoch
    assert np.allclose(wide.test_scores, r.test_scores, atol=1e-5)


def test_at_edge_after_max_extensions() -> None:
    """Noiseless labels keep preferring less regularisation: after one extension it is still the edge."""
    x, y, info = linear_task("octmnist", d=32, noise=0.0)
    r = fit_probe(x, y, info, replace(PAPER_PROBE, l2_grid=(1.0, 10.0, 100.0), max_grid_extensions=1))
    assert r.l2_grid == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0])
    assert r.l2 == pytest.approx(0.01) and r.at_edge


def test_low_edge_stops_once_the_penalty_no_longer_matters() -> None:
    """Noiseless labels: weaker penalties keep winning until they make no difference to the validation loss;
    that is the unregularised limit, reached inside the grid search, so the choice is not reported as at an edge.
    (The paper's head: its step budget, not the penalty, bounds the weights there.)"""
    x, y, info = linear_task("octmnist", d=32, noise=0.0)
    r = fit_probe(x, y, info, replace(PAPER_PROBE, l2_grid=(1e-8, 1e-7, 1e-6), max_grid_extensions=3))
    assert r.l2_grid == [1e-8, 1e-7, 1e-6] and not r.at_edge and r.l2 == pytest.approx(1e-8)


def test_extend_grid_continues_log_step() -> None:
    assert extend_grid([1e-3, 1e-2, 1e-1], "low") == pytest.approx([1e-5, 1e-4])
    assert extend_grid([1e-3, 1e-2, 1e-1], "high") == pytest.approx([1.0, 10.0])


def test_deterministic_given_seed() -> None:
    x, y, info = linear_task("dermamnist", noise=1.0)
    cfg = ProbeConfig(epochs=20)
    a, b = fit_probe(x, y, info, cfg, seed=3), fit_probe(x, y, info, cfg, seed=3)
    assert np.array_equal(a.test_scores, b.test_scores) and a.val_loss == b.val_loss and a.l2 == b.l2
    c = fit_probe(x, y, info, cfg, seed=4)
    assert not np.array_equal(a.test_scores, c.test_scores)


def test_best_epoch_is_lowest_val_loss_not_last() -> None:
    """Overfitting setup (few samples, many features, weak L2): val loss rises after its minimum,
    and the returned epoch, loss and scores are those of the minimum."""
    x, y, info = linear_task("octmnist", d=128, noise=2.0, sizes={"train": 200, "val": 300, "test": 100})
    cfg = replace(PAPER_PROBE, l2_grid=(1e-6,), epochs=40)
    r = fit_probe(x, y, info, cfg)
    fit = train_heads(
        layer_norm(x["train"]), torch.from_numpy(y["train"][:, 0]), layer_norm(x["val"]),
        torch.from_numpy(y["val"][:, 0]), [1e-6], info.n_outputs, False, cfg, seed=0,
    )  # fmt: skip
    hist = fit.val_loss_history[:, 0]
    assert r.best_epoch == int(np.argmin(hist)) < cfg.epochs - 1
    assert hist[-1] > hist.min() + 0.05  # selecting the last epoch would be visibly different
    assert r.val_loss == pytest.approx(hist.min())
    ce = -np.mean(np.log(r.val_scores[np.arange(len(r.val_scores)), y["val"][:, 0]]))
    assert ce == pytest.approx(hist.min(), rel=1e-4)  # the val scores are from the best epoch


def test_rejects_mismatched_inputs() -> None:
    x, y, info = linear_task("pathmnist", sizes={"train": 50, "val": 20, "test": 20})
    with pytest.raises(ValueError, match="test: 20 feature rows but 19 label rows"):
        fit_probe(x, {**y, "test": y["test"][:19]}, info, ProbeConfig(epochs=1))
    with pytest.raises(ValueError, match="expects N x 14"):
        fit_probe(x, y, task_info("chestmnist"), ProbeConfig(epochs=1))


@pytest.mark.parametrize("multi_label", [False, True])
def test_hand_written_gradient_matches_autograd(multi_label: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 3, 5, generator=g, requires_grad=True)
    if multi_label:
        target = torch.randint(0, 2, (16, 5), generator=g).float()
    else:
        target = torch.randint(0, 5, (16,), generator=g)
    head_losses(logits.transpose(0, 1), target, multi_label).sum().backward()
    dense = target if multi_label else F.one_hot(target, 5).float()
    assert torch.allclose(data_grad(logits.detach(), dense, multi_label), logits.grad, atol=1e-6)
    # and the per-head losses themselves equal torch's reference losses
    ref = F.binary_cross_entropy_with_logits if multi_label else F.cross_entropy
    per_head = head_losses(logits.detach().transpose(0, 1), target, multi_label)
    assert torch.allclose(per_head, torch.stack([ref(logits[:, h].detach(), target) for h in range(3)]))


def test_adam_matches_torch_adamw_without_decay() -> None:
    g = torch.Generator().manual_seed(0)
    p_ref = torch.randn(4, 6, generator=g).requires_grad_(True)
    p = p_ref.detach().clone()
    opt, adam = torch.optim.AdamW([p_ref], lr=0.01, weight_decay=0.0), _Adam(p)
    for step in range(5):
        grad = torch.randn(4, 6, generator=g)
        lr = 0.01 / (step + 1)
        opt.param_groups[0]["lr"] = lr
        p_ref.grad = grad.clone()
        opt.step()
        adam.step(grad, lr)
    assert torch.allclose(p, p_ref.detach(), atol=1e-7)


def test_layer_norm_is_per_sample_standardisation() -> None:
    x = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    z = layer_norm(x).numpy()
    ref = F.layer_norm(torch.tensor(x), (4,), eps=1e-6).numpy()
    assert np.allclose(z, ref, atol=1e-6)


def test_batched_heads_match_a_plain_torch_reference() -> None:
    """Parity with the paper's head written with torch modules: LN features -> BatchNorm1d(affine=False,
    eps 1e-6) -> Linear(D, C), AdamW(wd 0) + L2 in the loss, CosineAnnealingLR per epoch, drop_last,
    eval-mode BN for validation. Features get per-dimension offsets and scales so BN's running stats matter."""
    d, c, epochs, l2 = 12, 3, 6, [1e-4, 1e-1]
    rng = np.random.default_rng(0)
    scale, shift = rng.uniform(0.2, 3, d), rng.normal(0, 2, d)
    xtr, xva = (rng.normal(size=(n, d)) * scale + shift for n in (300, 100))
    ytr, yva = torch.from_numpy(rng.integers(0, c, 300)), torch.from_numpy(rng.integers(0, c, 100))
    ftr, fva = layer_norm(xtr), layer_norm(xva)
    cfg = replace(PAPER_PROBE, epochs=epochs)
    fit = train_heads(ftr, ytr, fva, yva, l2, c, False, cfg, seed=5)

    for h, lam in enumerate(l2):
        torch.manual_seed(123)  # the reference's own default init is overwritten below
        bn, lin = torch.nn.BatchNorm1d(d, affine=False, eps=1e-6), torch.nn.Linear(d, c)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(lin.weight, std=0.01, a=-2.0, b=2.0, generator=gen)
            lin.bias.uniform_(-1 / np.sqrt(d), 1 / np.sqrt(d), generator=gen)
        opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0)
        shuffle = torch.Generator().manual_seed(6)
        for epoch in range(epochs):
            bn.train()
            order = torch.randperm(300, generator=shuffle)
            for s in range(300 // cfg.batch_size):
                idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                loss = F.cross_entropy(lin(bn(ftr[idx])), ytr[idx]) + lam * lin.weight.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            bn.eval()
            with torch.no_grad():
                val = F.cross_entropy(lin(bn(fva)), yva).item()
            assert val == pytest.approx(fit.val_loss_history[epoch, h], rel=1e-4), (lam, epoch)


def test_paper_protocol_values() -> None:
    """PAPER_PROBE is the paper's protocol; the default differs only in the four fidelity fields."""
    paper = (PAPER_PROBE.whiten, PAPER_PROBE.select_l2, PAPER_PROBE.select_epoch, PAPER_PROBE.min_steps)
    assert paper == (False, "loss", "best_loss", 0)
    assert (PAPER_PROBE.lr, PAPER_PROBE.epochs, PAPER_PROBE.batch_size) == (0.01, 100, 128)
    assert replace(ProbeConfig(), whiten=False, select_l2="loss", select_epoch="best_loss", min_steps=0) == PAPER_PROBE


@pytest.mark.parametrize("bad", [{"select_l2": "acc"}, {"select_epoch": "best_auc"}, {"min_steps": -1}, {"epochs": 0}])
def test_rejects_unknown_selection_rules(bad: dict) -> None:
    with pytest.raises(ValueError):
        ProbeConfig(**bad)


def test_min_steps_adds_epochs_on_small_tasks_only() -> None:
    """546 images at batch 128 (drop_last) are 4 steps an epoch: 1000 steps need 250 epochs; a large task keeps 100."""
    cfg = ProbeConfig(min_steps=1000)
    assert train_epochs(cfg, 546) == 250
    assert train_epochs(cfg, 100_000) == 100
    assert train_epochs(cfg, 50) == 1000  # one (shrunken) batch an epoch
    assert train_epochs(PAPER_PROBE, 546) == 100


def test_last_epoch_and_step_floor_in_training() -> None:
    """select_epoch="last" keeps every head's final weights; min_steps lengthens the run (and its cosine)."""
    x, y, info = linear_task("octmnist", d=32, noise=1.0, sizes={"train": 256, "val": 100, "test": 100})
    cfg = ProbeConfig(epochs=5, min_steps=40, select_epoch="last")
    ftr, fva = layer_norm(x["train"]), layer_norm(x["val"])
    ytr, yva = torch.from_numpy(y["train"][:, 0]), torch.from_numpy(y["val"][:, 0])
    fit = train_heads(ftr, ytr, fva, yva, [1e-4, 1e-2], info.n_outputs, False, cfg, seed=0)
    assert fit.val_loss_history.shape == (20, 2)  # 2 steps an epoch: 20 epochs for 40 steps
    assert np.array_equal(fit.best_epoch, [19, 19])
    assert np.array_equal(fit.best_val_loss, fit.val_loss_history[-1])
    r = fit_probe(x, y, info, cfg)
    assert r.epochs == 20 and r.best_epoch == 19


def test_choose_head_on_auc_then_loss() -> None:
    loss = np.array([0.50, 0.40, 0.45, 0.30])
    assert choose_head(loss) == 3  # the paper: lowest validation loss
    assert choose_head(loss, np.array([0.80, 0.90, 0.85, 0.70])) == 1  # highest validation AUC
    assert choose_head(loss, np.array([0.90, 0.90, 0.85, 0.70])) == 1  # AUC tie: the lower loss
    assert choose_head(loss, np.full(4, np.nan)) == 3  # AUC undefined (a class absent from val): loss
    assert choose_head(np.array([np.nan, 0.4]), np.array([0.9, 0.8])) == 0  # a diverged loss does not block AUC
    assert choose_head(np.array([0.4, np.nan]), np.array([0.8, 0.9])) == 1


def test_auc_selection_picks_the_best_val_auc_of_the_same_heads() -> None:
    """Same heads, two rules: the AUC rule's val AUC is the higher, the loss rule's val loss the lower."""
    x, y, info = linear_task("breastmnist", d=64, noise=2.0, sizes={"train": 150, "val": 60, "test": 200})
    base = ProbeConfig(epochs=30, min_steps=0, select_epoch="last")
    by_auc = fit_probe(x, y, info, replace(base, select_l2="auc"))
    by_loss = fit_probe(x, y, info, replace(base, select_l2="loss"))
    assert by_auc.l2_grid == by_loss.l2_grid
    assert by_auc.val_auc >= by_loss.val_auc and by_auc.val_loss >= by_loss.val_loss


def test_paper_config_reproduces_the_paper_selection() -> None:
    """Under PAPER_PROBE the chosen head is the one of the lowest best-epoch validation loss, at that epoch."""
    x, y, info = linear_task("dermamnist", d=32, noise=1.5, sizes={"train": 300, "val": 100, "test": 100})
    cfg = replace(PAPER_PROBE, epochs=15)
    r = fit_probe(x, y, info, cfg)
    fit = train_heads(layer_norm(x["train"]), torch.from_numpy(y["train"][:, 0]), layer_norm(x["val"]),
                      torch.from_numpy(y["val"][:, 0]), sorted(cfg.l2_grid), info.n_outputs, False, cfg, seed=0)
    h = int(np.argmin(fit.best_val_loss))
    assert r.epochs == 15 and r.l2 == fit.l2[h] and r.best_epoch == fit.best_epoch[h]
    assert r.val_loss == pytest.approx(fit.val_loss_history.min(axis=0)[h])


def test_normalized_features_give_the_same_probe() -> None:
    """normalize_features once, then fit_probe(normalized=True): the same fit as letting the probe normalise."""
    x, y, info = linear_task("pneumoniamnist", d=16, noise=1.0, sizes={"train": 200, "val": 80, "test": 80})
    cfg = ProbeConfig(epochs=5, min_steps=0)
    z = {s: normalize_features(v.copy(), s, inplace=True) for s, v in x.items()}
    assert isinstance(z["train"], np.ndarray) and np.allclose(z["train"], layer_norm(x["train"]).numpy())
    a, b = fit_probe(x, y, info, cfg), fit_probe(z, y, info, cfg, normalized=True)
    assert np.array_equal(a.test_scores, b.test_scores) and a.l2 == b.l2


def collinear_task(noise: float = 0.01, d: int = 24, k: int = 4, sizes: tuple[int, int, int] = (400, 200, 200)):
    """Strongly collinear features (rank k plus small noise, offset per feature) whose binary label depends on
    the small, noise directions only: the ridge optimum needs large weights along low-variance directions."""
    rng = np.random.default_rng(0)
    mix, offset, w = rng.normal(size=(k, d)), rng.normal(size=d) * 3, rng.normal(size=d)
    x, y = {}, {}
    for split, n in zip(("train", "val", "test"), sizes):
        eps = rng.normal(size=(n, d))
        x[split] = (rng.normal(size=(n, k)) @ mix + noise * eps + offset).astype(np.float32)
        y[split] = (eps @ w * 2 / np.sqrt(d) + rng.logistic(size=n) > 0).astype(np.int64)[:, None]
    return x, y, task_info("breastmnist")


def test_whitened_head_reaches_the_ridge_optimum_the_paper_head_misses() -> None:
    """Same objective, two optimisations: the whitened head's test probabilities match a converged logistic
    regression with the same penalty (two softmax logits with L2 lam on each = one logit with C = 1/(lam N));
    the paper's head, at the same lam, stops far from it."""
    x, y, info = collinear_task()
    lam = 1e-5
    ln = {s: layer_norm(v).numpy().astype(np.float64) for s, v in x.items()}
    mu, sd = ln["train"].mean(0), np.sqrt(ln["train"].var(0) + 1e-6)
    ref = LogisticRegression(C=1 / (lam * len(ln["train"])), max_iter=100_000, tol=1e-10)
    ref.fit((ln["train"] - mu) / sd, y["train"][:, 0])
    p_ref = ref.predict_proba((ln["test"] - mu) / sd)[:, 1]
    white = fit_probe(x, y, info, ProbeConfig(l2_grid=(lam,)))
    paper = fit_probe(x, y, info, replace(PAPER_PROBE, l2_grid=(lam,)))
    assert np.abs(white.test_scores[:, 1] - p_ref).max() < 0.03
    assert np.abs(paper.test_scores[:, 1] - p_ref).max() > 0.2
    assert white.auc > paper.auc + 0.1


def test_whitening_gives_identity_covariance_and_drops_the_layer_norm_direction() -> None:
    x = layer_norm(collinear_task()[0]["train"])
    w = whitening(x)
    assert w.basis.shape == (24, 23)  # LayerNorm-ed rows sum to 0: one direction has no variance
    u = w.apply(x).double()
    cov = torch.cov(u.t(), correction=0)
    assert torch.allclose(cov, torch.eye(23, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(u.mean(0), torch.zeros(23, dtype=torch.float64), atol=1e-4)
    sub = whitening(x, max_rows=100)  # the covariance from every 4th row: roughly a whitening
    var = torch.cov(sub.apply(x).double().t(), correction=0).diagonal()
    assert sub.basis.shape == (24, 23) and not torch.allclose(var, torch.ones(23, dtype=torch.float64), atol=1e-3)
    assert ((var > 0.25) & (var < 4)).all()


def test_whitened_fit_folds_back_to_standardised_weights() -> None:
    """The kept weights, folded out of whitened coordinates, give the validation loss the training loop saw."""
    x, y, info = linear_task("dermamnist", d=32, noise=1.0, sizes={"train": 300, "val": 100, "test": 100})
    r = fit_probe(x, y, info, ProbeConfig(epochs=10, min_steps=0))
    ce = -np.mean(np.log(r.val_scores[np.arange(len(r.val_scores)), y["val"][:, 0]]))
    assert ce == pytest.approx(r.val_loss, rel=1e-4)


@pytest.mark.parametrize("task", [MULTI_CLASS, BINARY, MULTI_LABEL])
def test_column_aucs_equal_the_medmnist_auc(task: str) -> None:
    """The fast AUC that picks the L2 value is metrics.get_auc, ties included."""
    rng = np.random.default_rng(0)
    k = 2 if task == BINARY else 5
    y = rng.integers(0, 2, (300, k)) if task == MULTI_LABEL else rng.integers(0, k, (300, 1))
    scores = np.round(rng.random((300, k)), 1) + 0.01  # many ties
    if task != MULTI_LABEL:
        scores /= scores.sum(1, keepdims=True)
    truth, cols = metric_columns(y, scores, task)
    assert column_aucs(truth, cols).mean() == pytest.approx(get_auc(y, scores, task), abs=1e-12)
    assert np.isnan(column_aucs(np.zeros((5, 1)), rng.random((5, 1)))).all()  # one class only: undefined


def test_accuracy_not_below_majority_where_logistic_regression_is_not() -> None:
    """Raw-pixel-like features (per-pixel offsets, smooth collinear variation) of an imbalanced binary task
    sized like BreastMNIST (546/78 train/val): a converged logistic regression with C chosen on validation AUC
    scores 0.812 test accuracy against 0.795 for the majority class, so the default probe must not fall below it."""
    rng = np.random.default_rng(3)
    d = 196
    offset, basis = rng.uniform(0.2, 0.8, d), rng.normal(size=(8, d))
    x, y = {}, {}
    for split, n in (("train", 546), ("val", 78), ("test", 600)):
        latent = rng.normal(size=(n, 8))
        y[split] = (latent[:, 0] * 1.5 + rng.logistic(size=n) > 2.0).astype(np.int64)[:, None]
        x[split] = (offset + 0.1 * latent @ basis / np.sqrt(8) + 0.02 * rng.normal(size=(n, d))).astype(np.float32)
    r = fit_probe(x, y, task_info("breastmnist"))
    majority = float(np.mean(y["test"] == 0))
    assert majority == pytest.approx(0.795) and r.acc >= majority
