"""Self-supervised objectives. A method owns its heads and loss; the training loop only sees
``training_step(images_uint8, generator) -> (loss, logs)``, ``on_step_end(step, total)`` and ``export_encoder()``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from biovfm.methods.mae import MAE

METHODS: dict[str, Callable[..., nn.Module]] = {"mae": MAE.from_config}


def build_method(name: str, encoder: nn.Module, cfg: dict[str, Any], image_size: int, in_chans: int) -> nn.Module:
    try:
        factory = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None
    return factory(encoder, cfg, image_size=image_size, in_chans=in_chans)
