"""CLIP-Adapter: a residual bottleneck MLP with ratio α on a tower's final (projected) features.

At the `proj` site of each chosen tower (the image / text embedding before normalisation, see
`vlkit.backbones.base.PROJ_ROLE`):

    f' = f + α · W₂ ReLU(W₁ f)           W₁: D → D / reduction, W₂: D / reduction → D, W₂ zero at init

CLIP-Adapter blends `α · A(f) + (1 − α) · f`; with `A(f) = f + W₂ ReLU(W₁ f)` that is the form above, written
so that a fresh adapter leaves the model unchanged (W₂ = 0) and still trains (the ReLU's input is not zero).

Options: `ratio` (α, default 0.2), `reduction` (4), `towers` (`both` default, `vision` — the paper's image
adapter — or `text`). Cannot merge into the weights (a non-linear MLP); stacks and merges elementwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant


@dataclass
class ClipAdapterConfig(AdapterConfig):
    ratio: float = 0.2
    """α, the weight of the residual MLP: f + α · W₂ ReLU(W₁ f), in (0, 1]."""
    reduction: int = 4
    """Hidden width of the MLP = feature width // reduction (an integer >= 1)."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.reduction < 1:
            raise ConfigError(f"reduction must be >= 1, got {self.reduction}")


class ClipAdapterLayer(nn.Module):
    def __init__(self, width: int, reduction: int, ratio: float):
        super().__init__()
        hidden = max(1, width // reduction)
        self.down = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.ratio = ratio

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.ratio * self.up(torch.relu(self.down(y)))


class ClipAdapterVariant(AdapterVariant[ClipAdapterConfig]):
    name = "clip-adapter"
    summary = "CLIP-Adapter: residual MLP with ratio alpha on the final image and/or text features"
    config_cls = ClipAdapterConfig
    kinds = ("output",)
    backbone_kinds = ("contrastive",)  # a dual encoder's final image / text embeddings
    default_roles = ("proj",)
    shareable = {"half_shared_down": ("down",), "half_shared_up": ("up",), "shared": ("down", "up")}

    def create_layer(self, site, config: ClipAdapterConfig, base=None) -> nn.Module:
        return ClipAdapterLayer(site.out_features, config.reduction, config.ratio)

    def describe_state(self, config, tensors):
        yield "ratio (alpha)", config.get("ratio")
        for k, t in sorted(tensors.items()):
            if k.endswith(".up.weight"):
                site = k[: -len(".up.weight")]
                yield f"{site}: |W2| (0 = unchanged)", f"{float(t.float().norm()):.4g}"
