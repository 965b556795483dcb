"""One factory for the encoders of the study: timm ``VisionTransformer`` built from a ladder entry.

Position embeddings are fixed 2-D sin-cos (as in MAE), so every method and every baseline sees the
same architecture; ``pretrained=False`` always: nothing is ever fetched from a hub.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from biovfm.config import ModelSpec

# The paper counts parameters as the trainable MAE pretraining model with the standard MAE decoder
# (512-d, 8 blocks, 16 heads) and without the fixed sin-cos position embeddings (shared/reference/paper.md 1.1).
PAPER_DECODER = dict(dim=512, depth=8, heads=16)


def default_device() -> torch.device:
    """CUDA when present (cluster jobs), else CPU; CPU runs are the deterministic reference."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True, extent: int | None = None) -> torch.Tensor:
    """2-D sin-cos position embedding, shape (1, [1 +] grid*grid, dim); half the channels per axis.

    ``extent`` (default ``grid``) is the number of cells the ``grid`` spans: a 3x3 grid over an extent of 7
    gets the positions a 3x3 crop of the whole 7x7 image would cover (multi-crop local views)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    extent = extent or grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    axis = (np.arange(grid, dtype=np.float64) + 0.5) * extent / grid - 0.5
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        out = np.outer(coord, omega)
        parts += [np.sin(out), np.cos(out)]
    emb = np.concatenate(parts, axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def _vit(spec: ModelSpec, image_size: int, in_chans: int) -> VisionTransformer:
    """The architecture alone (also built on the meta device for counting)."""
    if image_size % spec.patch_size:
        raise ValueError(f"model {spec.name}: patch size {spec.patch_size} does not divide image size {image_size}")
    return VisionTransformer(
        img_size=image_size,
        patch_size=spec.patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="avg",
        fc_norm=False,  # keep the final norm in `norm` (MAE's encoder output); features bypass it anyway
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        class_token=True,
    )


def build_encoder(spec: ModelSpec, image_size: int, in_chans: int = 3) -> VisionTransformer:
    """A timm ViT without a head, with fixed sin-cos position embeddings."""
    model = _vit(spec, image_size, in_chans)
    grid = image_size // spec.patch_size
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(spec.embed_dim, grid))
    model.pos_embed.requires_grad_(False)
    return model


def embed_tokens(encoder: VisionTransformer, x: torch.Tensor, pos: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """The input tokens of the first block (CLS first), for images of any multiple of the patch size."""
    tokens = encoder.patch_embed.proj(x).flatten(2).transpose(1, 2)  # the size check of PatchEmbed is bypassed on purpose
    tokens = encoder.patch_embed.norm(tokens)
    if mask is not None:
        tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
    pos = encoder.pos_embed if pos is None else pos
    if pos.shape[1] != tokens.shape[1] + 1:
        raise ValueError(f"position embedding has {pos.shape[1] - 1} patches, the input {tokens.shape[1]}")
    cls = (encoder.cls_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
    return encoder.norm_pre(torch.cat([cls, tokens + pos[:, 1:]], dim=1))


def forward_tokens(encoder: VisionTransformer, x: torch.Tensor, pos: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """All tokens (CLS first) after the final norm, for images of any multiple of the patch size.

    ``pos`` is the position embedding for this input's grid (default: the encoder's own); patches where
    ``mask`` (B, N) is true are replaced by ``mask_token`` before positions are added (iBOT)."""
    return encoder.norm(encoder.blocks(embed_tokens(encoder, x, pos, mask, mask_token)))


def forward_selected(encoder: VisionTransformer, x: torch.Tensor, select: torch.Tensor | None = None,
                     pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS token (B, D) and the patch tokens where ``select`` (B, N) is true (M, D; image by image, in patch
    order; none without ``select``), after the final norm: what ``forward_tokens`` gives at those positions.

    Only the last block's keys and values need every token: its queries, attention output, MLP and the final
    norm run on the CLS and selected tokens only, and so does their backward (DINO reads the CLS token of
    every crop and iBOT the masked patches of the global ones: -4 to -6 % of a ViT-T DINO step)."""
    tokens = embed_tokens(encoder, x, pos, mask, mask_token)
    b, n1, _ = tokens.shape
    keep = tokens.new_zeros(b, n1, dtype=torch.bool)
    keep[:, 0] = True
    if select is not None:
        keep[:, 1:] = select
    *blocks, last = encoder.blocks
    for blk in blocks:
        tokens = blk(tokens)
    out = encoder.norm(last_block_at(last, tokens, keep))
    is_cls = torch.zeros_like(keep)
    is_cls[:, 0] = True
    is_cls = is_cls[keep]
    return out[is_cls], out[~is_cls]


def _plain_block(blk: Block) -> bool:
    """A timm Block without the options last_block_at does not reproduce (gating, stochastic depth, dropout)."""
    attn = blk.attn
    return (getattr(attn, "gate", None) is None and isinstance(blk.drop_path1, nn.Identity)
            and isinstance(blk.drop_path2, nn.Identity) and attn.attn_drop.p == 0)


def last_block_at(blk: Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``blk(x)[keep]`` (M, D) computing only the kept rows past the keys and values."""
    if not _plain_block(blk):
        return blk(x)[keep]
    attn = blk.attn
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    xn = blk.norm1(x)
    w, bias = attn.qkv.weight, attn.qkv.bias
    q_dim = h * d
    q = F.linear(xn[keep], w[:q_dim], None if bias is None else bias[:q_dim]).view(-1, h, d)
    kv = F.linear(xn, w[q_dim:], None if bias is None else bias[q_dim:]).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # the kept queries of each image, padded to the largest count, against all of that image's keys
    row = keep.nonzero()[:, 0]
    slot = (keep.cumsum(1) - 1)[keep]
    width = int(keep.sum(1).max())
    qp = q.new_zeros(b, width, h, d).index_put((row, slot), q)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, scale=attn.scale)
    o = o.transpose(1, 2)[row, slot].reshape(-1, q_dim)
    y = x[keep] + blk.ls1(attn.proj_drop(attn.proj(attn.norm(o))))
    return y + blk.ls2(blk.mlp(blk.norm2(y)))


@torch.no_grad()
def patch_features(encoder: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The paper's frozen features: mean of patch tokens after the last block, CLS excluded, final norm
    not applied (the probe head brings its own parameter-free LayerNorm)."""
    x = encoder.patch_embed(x)
    x = encoder._pos_embed(x)
    x = encoder.norm_pre(x)
    x = encoder.blocks(x)
    return x[:, encoder.num_prefix_tokens:].mean(dim=1)


def encoder_params(spec: ModelSpec, image_size: int, in_chans: int = 3) -> int:
    """All encoder parameters, position embedding included (the paper's 'encoder params')."""
    with torch.device("meta"):
        enc = _vit(spec, image_size, in_chans)
    return sum(p.numel() for p in enc.parameters())


def paper_params(spec: ModelSpec, image_size: int, in_chans: int = 3) -> int:
    """Trainable parameters as the paper's x-axis counts them: encoder + standard MAE decoder, no fixed pos-emb."""
    d = PAPER_DECODER
    with torch.device("meta"):
        enc = _vit(spec, image_size, in_chans)
        blocks = nn.ModuleList(Block(d["dim"], d["heads"], spec.mlp_ratio, qkv_bias=True) for _ in range(d["depth"]))
        extra = (
            spec.embed_dim * d["dim"] + d["dim"]  # decoder_embed
            + d["dim"]  # mask token
            + 2 * d["dim"]  # decoder norm
            + d["dim"] * spec.patch_size**2 * in_chans + spec.patch_size**2 * in_chans  # decoder_pred
        )
    enc_trainable = sum(p.numel() for n, p in enc.named_parameters() if n != "pos_embed")
    return enc_trainable + sum(p.numel() for p in blocks.parameters()) + extra


def count_flops_per_image(encoder: VisionTransformer, image_size: int, in_chans: int = 3) -> float:
    """Forward FLOPs of one image through the encoder, measured with torch's FLOP counter."""
    x = torch.zeros(1, in_chans, image_size, image_size, device=encoder.pos_embed.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.forward_features(x)
    return float(counter.get_total_flops())
