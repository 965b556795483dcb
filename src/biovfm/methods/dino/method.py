"""DINO with the DINOv2 additions (iBOT masked-patch loss, KoLeo, Sinkhorn-Knopp) on a timm ViT.

Student and EMA teacher share the architecture; the student sees 2 global and ``n_local`` local crops,
the teacher the 2 global ones. The teacher backbone is what gets evaluated, as in the paper.
Written for this project after Caron et al. (2021) and Oquab et al. (2024); no code copied.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from biovfm.methods.base import Method, StepContext
from biovfm.methods.dino.head import DINOHead
from biovfm.methods.dino.loss import (centered_teacher_probs, cross_view_entropy, entropy, koleo,
                                      masked_patch_entropy, sinkhorn_knopp)
from biovfm.models.vit import forward_selected, sincos_pos_embed
from biovfm.train.augment import color_jitter, gaussian_blur, normalize, random_grayscale, random_resized_crop
from biovfm.train.distributed import all_reduce_sum

N_GLOBAL = 2


def local_crop_size(image_size: int, patch: int, frac: float) -> int:
    """Local crops keep DINO's 96/224 ratio by default, rounded to a whole number of patches (at least one)."""
    return max(patch, int(round(image_size * frac / patch)) * patch)


def teacher_temperature(progress: float, start: float, end: float, warmup_frac: float) -> float:
    """Linear warm-up of the teacher temperature (sharp targets early avoid a uniform collapse)."""
    if warmup_frac <= 0 or progress >= warmup_frac:
        return end
    return start + (end - start) * progress / warmup_frac


def teacher_momentum(progress: float, start: float) -> float:
    """Cosine schedule of the EMA momentum from ``start`` to 1 at the end of training."""
    return 1.0 - (1.0 - start) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2


def _sum_and_count(logits: torch.Tensor) -> torch.Tensor:
    """(K + 1,): column sums of ``logits`` and the row count, reduced across processes in one call."""
    return torch.cat([logits.sum(0), logits.new_tensor([float(len(logits))])])


class DINO(Method):
    def __init__(self, encoder: VisionTransformer, image_size: int, in_chans: int, *, prototypes: int = 1024,
                 head_hidden_dim: int = 256, head_bottleneck_dim: int = 64, head_layers: int = 3, n_local: int = 2,
                 local_frac: float = 96 / 224, global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.1, 0.4), student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup_frac: float = 0.3, momentum: float = 0.99,
                 center_momentum: float = 0.9, centering: str = "centering", koleo_weight: float = 0.0,
                 ibot: bool = False, ibot_weight: float = 1.0, ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
                 ibot_mask_prob: float = 0.5, freeze_last_layer_frac: float = 0.0, jitter: float = 0.4,
                 grayscale_prob: float = 0.2, blur_prob: tuple[float, float] = (0.5, 0.1),
                 blur_sigma: tuple[float, float] = (0.1, 0.8)) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"methods.dino.centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.encoder = encoder
        dim = encoder.embed_dim
        self.p = encoder.patch_embed.patch_size[0]
        self.grid = image_size // self.p
        self.image_size = image_size
        self.local_size = local_crop_size(image_size, self.p, local_frac)
        self.head = DINOHead(dim, prototypes, head_hidden_dim, head_bottleneck_dim, head_layers)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if ibot else None
        self.register_buffer("center", torch.zeros(1, prototypes))
        self.register_buffer("patch_center", torch.zeros(1, prototypes))
        self.register_buffer("local_pos", sincos_pos_embed(dim, self.local_size // self.p, extent=self.grid), persistent=False)
        self.n_local, self.global_scale, self.local_scale = n_local, global_scale, local_scale
        self.student_temp, self.teacher_temp, self.warmup_teacher_temp = student_temp, teacher_temp, warmup_teacher_temp
        self.teacher_temp_warmup_frac, self.momentum, self.center_momentum = teacher_temp_warmup_frac, momentum, center_momentum
        self.centering, self.koleo_weight = centering, koleo_weight
        self.ibot, self.ibot_weight, self.ibot_mask_ratio, self.ibot_mask_prob = ibot, ibot_weight, ibot_mask_ratio, ibot_mask_prob
        self.freeze_last_layer_frac = freeze_last_layer_frac
        self.jitter, self.grayscale_prob, self.blur_prob, self.blur_sigma = jitter, grayscale_prob, blur_prob, blur_sigma


    @classmethod
    def from_config(cls, encoder: VisionTransformer, cfg: dict[str, Any], image_size: int, in_chans: int) -> "DINO":
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        return cls(encoder, image_size, in_chans, **cfg)

    # ---------------------------------------------------------------------------------- views
    def _view(self, x: torch.Tensor, ctx: StepContext, scale: tuple[float, float], size: int, blur: float) -> torch.Tensor:
        v = random_resized_crop(x, scale, ctx, out_size=size)
        v = color_jitter(v, ctx, self.jitter, self.jitter, self.jitter / 2)
        v = random_grayscale(v, ctx, self.grayscale_prob)
        v = gaussian_blur(v, ctx, blur, self.blur_sigma)
        return normalize(v)

    def views(self, batch: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(2n, C, S, S) global crops and (n_local * n, C, s, s) local crops, view-major."""
        x = batch.float()
        g = [self._view(x, ctx, self.global_scale, self.image_size, self.blur_prob[i % 2]) for i in range(N_GLOBAL)]
        loc = [self._view(x, ctx, self.local_scale, self.local_size, self.blur_prob[1]) for _ in range(self.n_local)]
        return torch.cat(g), (torch.cat(loc) if loc else x.new_zeros(0, x.shape[1], self.local_size, self.local_size))

    def ibot_masks(self, ctx: StepContext) -> torch.Tensor:
        """(2n, N) boolean: a fraction ``ibot_mask_prob`` of the global crops get a random ratio of patches masked."""
        n_patch = self.grid**2
        masks = []
        for _ in range(N_GLOBAL):
            chosen = ctx.rand() < self.ibot_mask_prob
            ratio = ctx.uniform(*self.ibot_mask_ratio)
            noise = ctx.rand(n_patch)
            rank = noise.argsort(dim=1).argsort(dim=1)
            masks.append((rank < (ratio * n_patch).round().unsqueeze(1)) & chosen.unsqueeze(1))
        return torch.cat(masks)

    # ---------------------------------------------------------------------------------- step
    def _teacher_targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        return centered_teacher_probs(logits, center, temp)

    def forward(self, batch: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        n = batch.shape[0]
        g, loc = self.views(batch, ctx)
        g, loc = g.to(batch.device), loc.to(batch.device)
        masks = self.ibot_masks(ctx).to(batch.device) if self.ibot else None
        temp = teacher_temperature(ctx.progress, self.warmup_teacher_temp, self.teacher_temp, self.teacher_temp_warmup_frac)

        # Only the tokens the losses read leave the encoders: the CLS tokens, and iBOT's masked patches of the global
        # crops (forward_selected: the last block skips the rest, same values as forward_tokens at those positions)
        with torch.no_grad():
            t_cls, t_patch_tokens = forward_selected(self.teacher_encoder, g, masks)
            t_logits = self.teacher_head(t_cls).float()
            t_probs = self._teacher_targets(t_logits, self.center, temp)
            ctx.scratch.setdefault("cls_sums", []).append(_sum_and_count(t_logits))

        s_global_cls, s_patch_tokens = forward_selected(self.encoder, g, masks, mask=masks, mask_token=self.mask_token)
        s_cls = [s_global_cls]
        if len(loc):
            s_cls.append(forward_selected(self.encoder, loc, pos=self.local_pos)[0])
        s_logits = self.head(torch.cat(s_cls)).float().view(N_GLOBAL + self.n_local, n, -1)
        dino = cross_view_entropy(s_logits, t_probs.view(N_GLOBAL, n, -1), self.student_temp)
        loss = dino
        t_ent = entropy(t_probs)
        logs = {"dino_loss": dino.item(), "teacher_entropy": t_ent.item(), "kl": (dino - t_ent).item(),
                "teacher_batch_entropy": entropy(t_probs.mean(0, keepdim=True)).item(), "teacher_temp": temp}
        if self.koleo_weight > 0:
            reg = sum(koleo(c) for c in s_global_cls.chunk(N_GLOBAL)) / N_GLOBAL
            loss = loss + self.koleo_weight * reg
            logs["koleo"] = reg.item()
        if self.ibot:
            flat = masks.flatten()
            sample = torch.arange(N_GLOBAL * n, device=flat.device).repeat_interleave(self.grid**2)[flat]
            with torch.no_grad():
                t_patch = self.teacher_head(t_patch_tokens).float()
                t_patch_probs = self._teacher_targets(t_patch, self.patch_center, temp)
                ctx.scratch.setdefault("patch_sums", []).append(_sum_and_count(t_patch))
            s_patch = self.head(s_patch_tokens)
            ib = masked_patch_entropy(s_patch, t_patch_probs, sample, N_GLOBAL * n, self.student_temp)
            loss = loss + self.ibot_weight * ib
            logs["ibot_loss"] = ib.item()
        return loss, logs

    # ---------------------------------------------------------------------------------- hooks
    def before_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.progress < self.freeze_last_layer_frac:
            self.head.last.grad = None  # the prototypes stay put while the rest of the head settles

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        m = teacher_momentum(ctx.progress, self.momentum)
        student = list(self.encoder.parameters()) + list(self.head.parameters())
        teacher = list(self.teacher_encoder.parameters()) + list(self.teacher_head.parameters())
        torch._foreach_lerp_(teacher, student, 1.0 - m)
        self._update_centers(ctx.scratch)

    def _update_centers(self, scratch: dict) -> None:
        """EMA of the mean teacher logits over the step's global batch (all micro-batches, all processes)."""
        if self.centering == "centering":
            for center, key in ((self.center, "cls_sums"), (self.patch_center, "patch_sums")):
                sums = scratch.get(key)
                if sums:
                    total = all_reduce_sum(torch.stack(sums).sum(0))
                    if total[-1] > 0:
                        center.mul_(self.center_momentum).add_(total[:-1] / total[-1], alpha=1 - self.center_momentum)

    def export_encoder(self) -> VisionTransformer:
        return self.teacher_encoder
