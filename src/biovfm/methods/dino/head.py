"""The DINO projection head: an MLP to a bottleneck, L2-normalised, then a weight-normalised linear layer
onto the prototypes (norm fixed to 1, as DINO's ``norm_last_layer``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int = 256, bottleneck_dim: int = 64, layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        # Weight normalisation with the norm fixed to 1: only the direction of each prototype is learnt.
        self.last = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # unit-norm rows, as nn.Linear's default init gives: with tiny rows every Adam step would swing the prototypes
        nn.init.normal_(self.last, std=bottleneck_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last, dim=-1))
