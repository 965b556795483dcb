"""Frozen features, extracted once per checkpoint and task split, a batch at a time.

The images may be a memory map of a task far larger than RAM: every extractor reads ``images[i:i + batch]``
and writes into one preallocated float32 matrix, so the memory an extraction adds is a batch of images plus
the features (at most a few thousand floats per image), never an image-sized copy of the split.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from biovfm.config import ModelSpec
from biovfm.data.preprocess import resize_images
from biovfm.models.vit import build_encoder, patch_features
from biovfm.progress import Progress
from biovfm.train.augment import normalize

RAW_PIXEL_SIZE = 28  # side of the raw-pixel baseline's images: at most 28 * 28 * 3 = 2352 features at any study size


Allocate = Callable[[tuple[int, int]], np.ndarray]  # an N x D float32 array to fill (in memory, or a mapped file)


def batched_features(images: np.ndarray, batch_fn: Callable[[np.ndarray], np.ndarray], batch_size: int,
                     progress: Progress | None = None, allocate: Allocate | None = None) -> np.ndarray:
    """``batch_fn`` over ``images[i:i + batch_size]``, written into one N x D float32 matrix from ``allocate``."""
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    batches = (batch_fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
    first = next(batches)
    shape = (len(images), first.shape[1])
    out = np.empty(shape, np.float32) if allocate is None else allocate(shape)
    start = 0
    for f in itertools.chain([first], batches):
        out[start:start + len(f)] = f
        start += len(f)
        if progress is not None:
            progress.update(len(f))
    return out


def to_nchw(images: np.ndarray, in_chans: int = 3) -> torch.Tensor:
    """uint8 N x H x W [x 3] -> float N x C x H x W; grayscale replicated to the encoder's channels.

    Meant for a batch: it copies its input (a read-only memory map cannot back a tensor)."""
    x = torch.from_numpy(np.array(images, copy=True))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 1 and in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.float()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable one is a ValueError that names it."""
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' own errors do not name the file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                         "write it again or point at the right file") from e


def load_encoder(path: str | Path, spec: ModelSpec, image_size: int, in_chans: int = 3) -> torch.nn.Module:
    encoder = build_encoder(spec, image_size, in_chans)
    state = read_safetensors(path)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit model {spec.name} at {image_size}px "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return encoder.eval()


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 256,
                     progress: Progress | None = None, allocate: Allocate | None = None) -> np.ndarray:
    """The paper's frozen features (mean patch token) of every image, ``batch_size`` images at a time."""
    in_chans = encoder.patch_embed.proj.in_channels
    device = encoder.pos_embed.device

    def batch(x: np.ndarray) -> np.ndarray:
        return patch_features(encoder, normalize(to_nchw(x, in_chans).to(device))).cpu().numpy()

    return batched_features(images, batch, batch_size, progress, allocate)


def raw_pixel_features(images: np.ndarray, batch_size: int = 256, progress: Progress | None = None,
                       allocate: Allocate | None = None) -> np.ndarray:
    """The raw-pixel baseline: each image resized to 28 px (PIL bicubic, the resize that made the tasks; identity
    at 28 px and below), flattened and scaled to [0, 1] (the probe standardises them).

    Why 28 px: the pixels of a 224-px RGB task are 150,528 features per image, a probe input larger than the task
    itself; at 28 px the baseline has at most 2352 features whatever the study's size, and a 28-px study keeps
    exactly the flattened pixels it always had."""
    side = min(images.shape[1], RAW_PIXEL_SIZE)

    def batch(x: np.ndarray) -> np.ndarray:
        return resize_images(x, side).reshape(len(x), -1).astype(np.float32) / 255.0

    return batched_features(images, batch, batch_size, progress, allocate)


def file_allocator(folder: str | Path, name: str) -> Allocate:
    """Features in a memory-mapped ``.npy`` file: their pages are the page cache's (reclaimable), not the job's
    memory, so a task of 10^6 images costs the job no more memory than one of 10^4."""
    def allocate(shape: tuple[int, int]) -> np.ndarray:
        return np.lib.format.open_memmap(Path(folder) / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)

    return allocate
