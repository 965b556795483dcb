"""Per-iteration schedules (a step-based study needs no notion of epochs)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, warmup: int, final: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then half-cosine to ``final`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` to ``end`` (DINO's weight-decay schedule)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total - 1))))
