import math

import pytest
import torch
import torch.nn.functional as F

from biovfm.config import ModelSpec
from biovfm.methods.base import StepContext
from biovfm.methods.dino.head import DINOHead
from biovfm.methods.dino.loss import (centered_teacher_probs, cross_view_entropy, entropy, koleo,
                                      masked_patch_entropy, sinkhorn_knopp)
from biovfm.methods.dino.method import DINO, local_crop_size, teacher_momentum, teacher_temperature
from biovfm.models.vit import build_encoder

SPEC = ModelSpec("t", embed_dim=32, depth=2, num_heads=2, patch_size=4)


def small_dino(**kw) -> DINO:
    torch.manual_seed(0)
    cfg = dict(prototypes=32, head_hidden_dim=16, head_bottleneck_dim=8, n_local=3)
    return DINO(build_encoder(SPEC, 16), 16, 3, **{**cfg, **kw})


def test_head_logits_are_cosines_to_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(7, 32) * 100)
    assert out.shape == (7, 50) and out.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        head.last.mul_(3.0)  # the norm of a prototype has no effect (weight normalisation, norm fixed to 1)
    assert torch.allclose(head(torch.ones(2, 32)), head(torch.ones(2, 32)))


def test_centering_removes_a_shared_offset_and_temperature_sharpens():
    logits = torch.randn(6, 10)
    center = torch.full((1, 10), 0.3)
    p = centered_teacher_probs(logits, center, 0.1)
    assert torch.allclose(p.sum(-1), torch.ones(6))
    assert torch.allclose(p, F.softmax(logits / 0.1, -1), atol=1e-6)  # a constant centre shifts nothing
    skew = torch.zeros(1, 10)
    skew[0, 0] = 5.0  # a prototype every sample favours is pushed down by the centre
    assert centered_teacher_probs(logits + skew, skew, 0.1)[:, 0].mean() < F.softmax((logits + skew) / 0.1, -1)[:, 0].mean()
    assert entropy(centered_teacher_probs(logits, center, 0.04)) < entropy(centered_teacher_probs(logits, center, 0.07))


def test_cross_view_entropy_skips_same_view_pairs():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5, 8), F.softmax(torch.randn(2, 5, 8), -1)
    logp = F.log_softmax(s / 0.1, -1)
    expect = torch.stack([-(t[i] * logp[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]).mean()
    assert cross_view_entropy(s, t, 0.1).item() == pytest.approx(expect.item(), rel=1e-6)
    with pytest.raises(ValueError, match="two views"):
        cross_view_entropy(s[:1], t[:1], 0.1)


def test_sinkhorn_spreads_mass_equally_over_prototypes():
    torch.manual_seed(0)
    logits = F.normalize(torch.randn(64, 8), dim=-1) @ F.normalize(torch.randn(16, 8), dim=-1).t()
    logits[:, 0] += 0.5  # a dominant prototype, as at the start of a collapse
    q = sinkhorn_knopp(logits, 0.05, iterations=20)
    assert torch.allclose(q.sum(-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((16,), 64 / 16), rtol=0.05)


def test_koleo_prefers_spread_features():
    torch.manual_seed(0)
    spread = torch.eye(8)
    clustered = torch.ones(8, 8) + 0.01 * torch.randn(8, 8)
    assert koleo(spread) < koleo(clustered)


def test_masked_patch_entropy_averages_within_then_across_images():
    s = torch.zeros(3, 4)
    t = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    sample = torch.tensor([0, 0, 2])  # image 0 has two masked tokens, image 1 none, image 2 one
    loss = masked_patch_entropy(s, t, sample, n_samples=3, student_temp=0.1)
    assert loss.item() == pytest.approx((math.log(4) + math.log(4)) / 3, rel=1e-6)


def test_schedules_reach_their_targets():
    assert teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(0.9, 0.04, 0.07, 0.3) == 0.07
    assert teacher_momentum(0.0, 0.99) == pytest.approx(0.99) and teacher_momentum(1.0, 0.99) == pytest.approx(1.0)


@pytest.mark.parametrize("image,patch,expect", [(224, 16, 96), (28, 4, 12), (16, 4, 8), (8, 4, 4)])
def test_local_crop_size_scales_with_the_image(image, patch, expect):
    assert local_crop_size(image, patch, 96 / 224) == expect


def test_crop_counting_and_ibot_masks():
    dino = small_dino(ibot=True, ibot_mask_prob=0.5, ibot_mask_ratio=(0.25, 0.5))
    batch = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    g, loc = dino.views(batch, StepContext.single(0, 6))
    assert g.shape == (2 * 6, 3, 16, 16) and loc.shape == (3 * 6, 3, 8, 8)
    masks = dino.ibot_masks(StepContext.single(1, 600))
    counts = masks.sum(1).float()
    assert masks.shape == (1200, 16)
    assert 0.4 < (counts > 0).float().mean() < 0.6  # about half the crops are masked
    assert counts[counts > 0].min() >= 4 and counts.max() <= 8  # 25-50 % of 16 patches


def test_draws_for_a_slice_match_the_whole_batch():
    """What makes DDP and gradient accumulation see the same crops as one process."""
    dino = small_dino()
    batch = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    whole = dino.views(batch, StepContext.single(3, 8))[0]
    part = StepContext(torch.Generator().manual_seed(3), 8, 4, 8)
    half = dino.views(batch[4:], part)[0]
    assert torch.allclose(half[:4], whole[4:8]) and torch.allclose(half[4:], whole[12:16])


@pytest.mark.parametrize("opts", [{}, {"ibot": True, "koleo_weight": 0.1}, {"centering": "sinkhorn_knopp", "ibot": True}])
def test_step_trains_the_student_and_the_teacher_follows(opts):
    dino = small_dino(**opts)
    batch = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    before = dino.teacher_encoder.blocks[0].mlp.fc1.weight.clone()
    ctx = StepContext.single(0, 8, step=0, total_steps=10)
    loss, logs = dino(batch, ctx)
    loss.backward()
    assert dino.encoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dino.teacher_encoder.parameters())
    assert {"teacher_entropy", "kl", "dino_loss"} <= set(logs) and ("ibot_loss" in logs) == bool(opts.get("ibot"))
    with torch.no_grad():
        for p in dino.encoder.parameters():
            p.add_(0.1)
    dino.on_step_end(ctx)
    after = dino.teacher_encoder.blocks[0].mlp.fc1.weight
    assert torch.allclose(after, before + 0.1 * (1 - 0.99), atol=1e-6)  # EMA with the step-0 momentum
    assert dino.export_encoder() is dino.teacher_encoder
    if opts.get("centering", "centering") == "centering":
        assert dino.center.abs().sum() > 0  # updated from the step's teacher logits


def test_frozen_last_layer_gets_no_update_early():
    dino = small_dino(freeze_last_layer_frac=0.5)
    batch = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    loss, _ = dino(batch, StepContext.single(0, 4, step=1, total_steps=10))
    loss.backward()
    dino.before_optimizer_step(StepContext.single(0, 4, step=1, total_steps=10))
    assert dino.head.last.grad is None and dino.head.mlp[0].weight.grad is not None


def test_training_is_deterministic_with_the_engine_optimizer():
    """Same seed, same losses and weights after a few steps (fused AdamW, CLS/masked-only last block)."""
    from biovfm.train.optim import param_groups

    def run() -> tuple[list[float], torch.Tensor]:
        dino = small_dino(ibot=True, koleo_weight=0.1)
        opt = torch.optim.AdamW(param_groups(dino, 0.04), lr=1e-3)
        batch = (torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
        losses = []
        for step in range(3):
            ctx = StepContext.single(step, 8, step=step, total_steps=3)
            loss, _ = dino(batch, ctx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dino.on_step_end(ctx)
            losses.append(loss.item())
        return losses, dino.teacher_encoder.blocks[-1].mlp.fc2.weight.detach().clone()

    (l1, w1), (l2, w2) = run(), run()
    assert l1 == l2 and torch.equal(w1, w2)
