import pytest
import torch

from biovfm.config import ModelSpec
from biovfm.methods.base import StepContext
from biovfm.methods.mae import MAE, masked_mse, patchify, random_masking, unpatchify
from biovfm.models.vit import build_encoder, forward_tokens, patch_features, sincos_pos_embed

SPEC = ModelSpec("t", embed_dim=32, depth=2, num_heads=2, patch_size=4)


@pytest.mark.parametrize("c", [1, 3, 4])
def test_patchify_roundtrip_any_channels(c):
    x = torch.randn(2, c, 16, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 16, 4 * 4 * c)
    assert torch.equal(unpatchify(p, 4, c), x)
    # patch 0 holds the top-left 4x4 block
    assert torch.equal(p[0, 0].reshape(4, 4, c).permute(2, 0, 1), x[0, :, :4, :4])


def test_random_masking_keeps_requested_fraction():
    keep, mask, restore = random_masking(torch.rand(3, 16, generator=torch.Generator().manual_seed(0)), 0.75)
    assert keep.shape == (3, 4)
    assert mask.sum(1).tolist() == [12.0, 12.0, 12.0]
    for b in range(3):  # kept indices are exactly the unmasked positions
        assert set(keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    assert torch.equal(mask.gather(1, restore.argsort(1))[:, :4], torch.zeros(3, 4))  # shuffled order starts with the kept


def test_loss_counts_masked_patches_only():
    target = torch.zeros(1, 4, 3)
    pred = torch.zeros(1, 4, 3)
    pred[0, 0] = 10.0  # error on a visible patch
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert masked_mse(pred, target, mask, norm_pix=False).item() == 0.0
    pred[0, 1] = 3.0  # error on a masked patch
    assert masked_mse(pred, target, mask, norm_pix=False).item() == pytest.approx(9.0 / 3)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_forward_shapes_and_backward(c, norm_pix):
    torch.manual_seed(0)
    enc = build_encoder(SPEC, 16, in_chans=c)
    mae = MAE(enc, 16, c, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix)
    x = torch.randn(2, c, 16, 16)
    loss, pred, mask = mae.reconstruct(x, torch.rand(2, 16))
    assert pred.shape == (2, 16, 16 * c) and mask.shape == (2, 16)
    loss.backward()
    assert enc.patch_embed.proj.weight.grad is not None and enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert enc.pos_embed.grad is None  # fixed sin-cos


def test_mae_learns_on_a_tiny_batch():
    torch.manual_seed(0)
    enc = build_encoder(SPEC, 16)
    mae = MAE(enc, 16, 3, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    batch = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss, _ = mae(batch, StepContext.single(step, len(batch)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_patch_features_excludes_cls_and_final_norm():
    torch.manual_seed(0)
    enc = build_encoder(SPEC, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    f = patch_features(enc, x)
    tokens = enc.blocks(enc.norm_pre(enc._pos_embed(enc.patch_embed(x))))
    assert torch.allclose(f, tokens[:, 1:].mean(1))


def test_parameter_counts_match_the_paper_x_axis():
    """Encoder + standard MAE decoder, fixed pos-emb excluded: the paper's 31.2 / 47.4 / 111.66 / 329.24 M."""
    from biovfm.models.vit import encoder_params, paper_params

    ladder = {"tiny": (192, 12, 3, 31.20, 5.52), "small": (384, 12, 6, 47.40, 21.67),
              "base": (768, 12, 12, 111.66, 85.80), "large": (1024, 24, 16, 329.24, 303.30)}
    for name, (dim, depth, heads, paper_m, enc_m) in ladder.items():
        spec = ModelSpec(name, dim, depth, heads, 16)
        assert paper_params(spec, 224) / 1e6 == pytest.approx(paper_m, abs=0.005)
        assert encoder_params(spec, 224) / 1e6 == pytest.approx(enc_m, abs=0.005)


def test_forward_tokens_matches_timm_at_full_size_and_takes_smaller_crops():
    torch.manual_seed(0)
    enc = build_encoder(SPEC, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(forward_tokens(enc, x), enc.forward_features(x), atol=1e-6)
    small = forward_tokens(enc, torch.randn(2, 3, 8, 8), pos=sincos_pos_embed(32, 2, extent=4))
    assert small.shape == (2, 1 + 4, 32)
    with pytest.raises(ValueError, match="position embedding has 16 patches, the input 4"):
        forward_tokens(enc, torch.randn(2, 3, 8, 8))


def test_sincos_extent_places_a_coarse_grid_inside_the_full_one():
    """A 2x2 grid over 4x4 cells sits at coordinates 0.5 and 2.5 of the full grid."""
    assert torch.allclose(sincos_pos_embed(8, 4, extent=4), sincos_pos_embed(8, 4))
    coarse = sincos_pos_embed(8, 2, extent=4)[0, 1:]
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    y, x = 2.5, 0.5  # cell (1, 0) of the coarse grid
    expect = torch.cat([torch.sin(y * omega), torch.cos(y * omega), torch.sin(x * omega), torch.cos(x * omega)]).float()
    assert torch.allclose(coarse[2], expect, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_training_loss_equals_reconstruct_on_the_same_draws(norm_pix):
    """forward's loss skips the visible patches past the last decoder block's keys and values: same loss, same grads."""
    torch.manual_seed(0)
    mae = MAE(build_encoder(SPEC, 16), 16, 3, decoder_dim=16, decoder_depth=2, decoder_heads=2, norm_pix_loss=norm_pix)
    x, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    full, _, _ = mae.reconstruct(x, noise)
    fast = mae.masked_loss(x, noise)
    assert fast.item() == pytest.approx(full.item(), rel=1e-6)
    params = [p for p in mae.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(full, params), torch.autograd.grad(fast, params)):
        assert torch.allclose(a, b, atol=1e-6)


def test_encoder_embeds_only_the_kept_patches_as_the_patch_convolution_would():
    torch.manual_seed(0)
    mae = MAE(build_encoder(SPEC, 16), 16, 3, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(3, 3, 16, 16)
    keep, _, _ = random_masking(torch.rand(3, 16), 0.75)
    enc = mae.encoder
    tokens = (enc.patch_embed(x) + enc.pos_embed[:, 1:]).gather(1, keep.unsqueeze(-1).expand(-1, -1, 32))
    tokens = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(3, -1, -1), tokens], 1)
    assert torch.allclose(mae.forward_encoder(x, keep), enc.norm(enc.blocks(tokens)), atol=1e-5)


def test_forward_selected_gives_forward_tokens_at_the_selected_positions():
    from biovfm.models.vit import forward_selected

    torch.manual_seed(0)
    enc = build_encoder(SPEC, 16)
    x = torch.randn(5, 3, 16, 16)
    select = torch.rand(5, 16) < 0.3
    select[1] = False  # an image with the CLS token alone
    token = torch.nn.Parameter(torch.randn(1, 1, 32))
    full = forward_tokens(enc, x, mask=select, mask_token=token)
    cls, patches = forward_selected(enc, x, select, mask=select, mask_token=token)
    assert cls.shape == (5, 32) and patches.shape == (int(select.sum()), 32)
    assert torch.allclose(cls, full[:, 0], atol=1e-5) and torch.allclose(patches, full[:, 1:][select], atol=1e-5)
    params = [p for p in enc.parameters() if p.requires_grad] + [token]
    g_full = torch.autograd.grad(full[:, 0].square().sum() + full[:, 1:][select].sin().sum(), params)
    g_sel = torch.autograd.grad(cls.square().sum() + patches.sin().sum(), params)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, g_sel))
    small_pos = sincos_pos_embed(32, 2, extent=4)
    crops = torch.randn(2, 3, 8, 8)
    only_cls, none = forward_selected(enc, crops, pos=small_pos)
    assert none.shape == (0, 32)
    assert torch.allclose(only_cls, forward_tokens(enc, crops, pos=small_pos)[:, 0], atol=1e-5)
