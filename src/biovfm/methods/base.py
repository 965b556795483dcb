"""What the training engine sees of a self-supervised method, and the per-step randomness it hands to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class StepContext:
    """Everything one training step may depend on besides its images.

    Random draws are made for the whole global batch and sliced to this process's samples
    ``[start, stop)``: every world size and every gradient-accumulation split sees exactly the
    crops and masks one process would, which is what makes DDP and accumulation match a
    single-process run. Draws come from a CPU generator, so they are identical on every device."""

    generator: torch.Generator
    global_batch: int
    start: int
    stop: int
    step: int = 0
    total_steps: int = 1
    scratch: dict[str, Any] = field(default_factory=dict)  # shared by the micro-batches of one step (e.g. DINO's centre sums)

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)

    def rand(self, *shape: int) -> torch.Tensor:
        """U[0, 1) of shape (n, *shape) for this process's samples."""
        return torch.rand(self.global_batch, *shape, generator=self.generator)[self.start:self.stop]

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * self.rand(*shape)

    @classmethod
    def single(cls, seed: int, n: int, step: int = 0, total_steps: int = 1) -> "StepContext":
        """A context for a whole batch in one process (tests, benchmarks)."""
        return cls(torch.Generator().manual_seed(seed), n, 0, n, step, total_steps)


class Method(nn.Module):
    """A self-supervised objective around a timm ViT (``self.encoder``, the backbone being trained).

    ``forward(images_uint8, ctx) -> (loss, logs)`` is one training step's forward pass (through
    ``forward`` so that DistributedDataParallel can wrap the method); the hooks default to no-ops."""

    encoder: nn.Module

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """After backward and gradient clipping, before the optimizer step (e.g. DINO's frozen last layer)."""

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        """After the optimizer step (e.g. the EMA teacher update)."""

    def export_encoder(self) -> nn.Module:
        """The backbone that gets evaluated."""
        return self.encoder
