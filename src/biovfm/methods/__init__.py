"""Self-supervised objectives. A method (:class:`~biovfm.methods.base.Method`) owns its augmentation,
heads and loss; the training loop only sees ``forward(images_uint8, ctx) -> (loss, logs)``, the two hooks
and ``export_encoder()``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from biovfm.methods.base import Method
from biovfm.methods.dino import DINO
from biovfm.methods.mae import MAE

METHODS: dict[str, Callable[..., Method]] = {"mae": MAE.from_config, "dino": DINO.from_config}


def build_method(name: str, encoder: nn.Module, cfg: dict[str, Any], image_size: int, in_chans: int) -> Method:
    try:
        factory = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None
    return factory(encoder, cfg, image_size=image_size, in_chans=in_chans)
