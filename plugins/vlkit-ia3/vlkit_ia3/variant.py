"""The (IA)^3 variant: elementwise scaling vectors on linear sites, folded into the weights on merge.

Two kinds of layer, by site role:

* output scaling (attn.k, attn.v and any other targeted projection except mlp.fc2):
  y' = l ⊙ y with l of size out_features; merged: W' = diag(l) W, b' = l ⊙ b.
* input scaling (mlp.fc2, whose input is the MLP hidden activation h):
  y' = W (l ⊙ h) + b. As the first (or only) layer of a plain stack the host projects l ⊙ h once
  (`input_transform`); elsewhere it is y + W ((l - 1) ⊙ h), which composes with adapters stacked before
  it; merged: W' = W diag(l), b' = b.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vlkit.adapters.base import AdapterConfig, AdapterVariant
from vlkit.errors import ConfigError

MODULE_ROLES = {
    "attn_mlp": ("attn.k", "attn.v", "mlp.fc2"),
    "attn": ("attn.k", "attn.v"),
    "mlp": ("mlp.fc2",),
}

# Roles whose *input* is scaled (the MLP hidden activation feeding the second projection).
INPUT_SCALED_ROLES = ("mlp.fc2",)


@dataclass
class IA3Config(AdapterConfig):
    modules: str = "attn_mlp"
    """Projections scaled when targets is unset: attn_mlp (keys, values, MLP hidden), attn (keys, values) or
    mlp."""
    init: float = 1.0
    """Initial value of every scaling entry (> 0; 1 leaves the model unchanged)."""

    def validate(self) -> None:
        super().validate()
        if self.modules not in MODULE_ROLES:
            raise ConfigError(f"modules must be one of {', '.join(MODULE_ROLES)}, got {self.modules!r}")
        if not self.init > 0:
            raise ConfigError(f"init must be > 0, got {self.init}")


class IA3Layer(nn.Module):
    """One learned vector `ia3_l`; `scales_input` says whether it rescales the projection's input or output."""

    def __init__(self, features: int, scales_input: bool, init: float = 1.0):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.full((features,), float(init)))
        self.scales_input = scales_input
        self.merged = False

    def extra_repr(self) -> str:
        return f"features={self.ia3_l.numel()}, scales={'input' if self.scales_input else 'output'}"

    @property
    def input_transform(self):
        """Input scaling: x -> l ⊙ x, so the host runs the projection once, on the scaled input, instead of
        `forward`'s second projection W ((l - 1) ⊙ x) (vlkit's shortcut for the first layer of a plain stack;
        the same result). None for output scaling, which has nothing to save."""
        return self._scale_input if self.scales_input else None

    def _scale_input(self, x):
        return x * self.ia3_l

    def forward(self, x, y, weight=None, bias=None):
        if self.scales_input:
            if weight is None:
                raise RuntimeError("(IA)^3 input scaling needs the projection weight")
            return y + F.linear(x * (self.ia3_l - 1), weight)
        return y * self.ia3_l

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        l = self.ia3_l.detach().to(weight.dtype)
        if self.scales_input:
            return weight * l.unsqueeze(0), bias
        return weight * l.unsqueeze(1), None if bias is None else bias * l.to(bias.dtype)


class IA3Variant(AdapterVariant):
    name = "ia3"
    summary = "(IA)^3: learned rescaling of attention keys/values and the MLP hidden activation; mergeable"
    config_cls = IA3Config
    default_roles = MODULE_ROLES["attn_mlp"]
    kinds = ("linear",)

    def roles(self, config: IA3Config) -> tuple[str, ...]:
        return MODULE_ROLES[config.modules]

    def create_layer(self, site, config: IA3Config, base=None) -> nn.Module:
        scales_input = site.role in INPUT_SCALED_ROLES
        features = site.in_features if scales_input else site.out_features
        return IA3Layer(features, scales_input, config.init)

    def merged_weight(self, layer: IA3Layer, weight, bias):
        return layer.merge(weight, bias)
