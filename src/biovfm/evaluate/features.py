"""Frozen features, extracted once per checkpoint and task split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from biovfm.config import ModelSpec
from biovfm.models.vit import build_encoder, patch_features
from biovfm.train.augment import normalize


def to_nchw(images: np.ndarray, in_chans: int = 3) -> torch.Tensor:
    """uint8 N x H x W [x 3] -> float N x C x H x W; grayscale replicated to the encoder's channels."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 1 and in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.float()


def load_encoder(path: str | Path, spec: ModelSpec, image_size: int, in_chans: int = 3) -> torch.nn.Module:
    encoder = build_encoder(spec, image_size, in_chans)
    state = load_file(str(path))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit model {spec.name} at {image_size}px "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return encoder.eval()


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    in_chans = encoder.patch_embed.proj.in_channels
    device = encoder.pos_embed.device
    out = [patch_features(encoder, normalize(to_nchw(images[i:i + batch_size], in_chans).to(device))).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: flattened pixels, scaled to [0, 1] (the probe standardises them)."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0
