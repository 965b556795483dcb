"""Batched tensor augmentation (no per-image Python loops): the CPU has no spare core for workers.

Every random parameter is drawn through a :class:`~biovfm.methods.base.StepContext`, per sample of the
global batch, so crops are the same whatever the world size. Images are floats in [0, 255] until
:func:`normalize`."""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # methods import this module; the context type is only annotated here
    from biovfm.methods.base import StepContext


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8-range floats -> mean 0.5 / std 0.5 normalisation, as in the paper's probe protocol."""
    return (x / 255.0 - 0.5) / 0.5


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], ctx: StepContext, out_size: int | None = None,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Random-resized-crop (and horizontal flip) of a whole batch with one ``affine_grid``.

    The output is ``out_size`` square (default: the input size); parameters come from ``ctx``
    (CPU), the resampling runs where ``x`` is."""
    area = ctx.uniform(scale[0], scale[1])
    r = ctx.uniform(math.log(ratio[0]), math.log(ratio[1])).exp()
    sw = (area * r).sqrt().clamp(max=1.0)
    sh = (area / r).sqrt().clamp(max=1.0)
    cx = (ctx.rand() * 2 - 1) * (1 - sw)
    cy = (ctx.rand() * 2 - 1) * (1 - sh)
    sign = torch.where(ctx.rand() < 0.5, -1.0, 1.0) if flip else torch.ones(ctx.n)
    theta = torch.zeros(ctx.n, 2, 3)
    theta[:, 0, 0] = sw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = cy
    size = out_size or x.shape[-1]
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, ctx: StepContext, brightness: float, contrast: float, saturation: float,
                 p: float = 0.8) -> torch.Tensor:
    """Brightness, contrast and saturation jitter, applied to a fraction ``p`` of the samples.

    Medical images carry meaning in intensity, so factors stay mild (no hue shift)."""
    apply = (ctx.rand() < p).float().to(x.device).view(-1, 1, 1, 1)
    b = ctx.uniform(1 - brightness, 1 + brightness).to(x.device).view(-1, 1, 1, 1)
    c = ctx.uniform(1 - contrast, 1 + contrast).to(x.device).view(-1, 1, 1, 1)
    s = ctx.uniform(1 - saturation, 1 + saturation).to(x.device).view(-1, 1, 1, 1)
    y = x * b
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    gray = y.mean(dim=1, keepdim=True)
    y = (y - gray) * s + gray
    return (apply * y + (1 - apply) * x).clamp(0, 255)


def random_grayscale(x: torch.Tensor, ctx: StepContext, p: float) -> torch.Tensor:
    apply = (ctx.rand() < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply, x.mean(dim=1, keepdim=True).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, ctx: StepContext, p: float, sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (sigma in pixels of this image), for a fraction ``p``."""
    apply = ctx.rand() < p
    sig = ctx.uniform(sigma[0], sigma[1])
    radius = max(1, int(math.ceil(2 * sigma[1])))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (offsets[None] / sig[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand_as(k)
    k = torch.where(apply[:, None], k, identity).to(x.device, x.dtype)  # (n, 2r+1)
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    kh = k.repeat_interleave(c, dim=0)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kh.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kh.view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w)
