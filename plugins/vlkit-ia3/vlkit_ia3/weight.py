"""The `ia3-weight` variant: (IA)^3 on the weights, a learned magnitude per output row of a projection.

For a linear site with base weight W (out_features, in_features) and bias b, the layer learns one vector
m (out_features), initialised to the base weight's row norms ||W_i||, and uses

    W' = diag(m / ||W||) W,        y' = W' x + b = y + ((m / ||W||) - 1) ⊙ (W x)

so at init m / ||W|| is exactly 1 and the model is unchanged. It is the magnitude half of DoRA without the
low-rank direction update, or (IA)^3's output scaling parametrised by the row norm it sets. It is the
example of a variant that needs its base weights: `create_layer` reads them from the `base` argument the
core passes (an nn.Linear, or a `vlkit.adapters.LinearView` of the q / k / v rows of an
nn.MultiheadAttention), so nothing of vlkit's internals is used.

- merging: `merged_weight` folds it exactly (W' above, the bias unchanged); `unmerge` is the core's;
- sharing (multi-task `sharing: shared`): the whole layer is one vector, so `shared` ties `magnitude`;
  `half_shared_down` / `half_shared_up` are not defined (there is no down or up part);
- adapter merges (`vlkit compose A,B --mode merge`): the elementwise `linear` merge (the default) averages
  the magnitudes, which is meaningful; `task_arithmetic` and `ties` assume a tensor's neutral value is zero,
  which a magnitude's is not, so use `linear` for this variant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vlkit.adapters import AdapterConfig, AdapterVariant
from vlkit.errors import ConfigError

MODULE_ROLES = {
    "qv": ("attn.q", "attn.v"),
    "attn": ("attn.q", "attn.k", "attn.v", "attn.out"),
    "all": ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2"),
}


@dataclass
class WeightScaleConfig(AdapterConfig):
    modules: str = "qv"
    """Projections rescaled when targets is unset: qv, attn (q, k, v, out) or all (attention and MLP)."""

    def validate(self) -> None:
        super().validate()
        if self.modules not in MODULE_ROLES:
            raise ConfigError(f"modules must be one of {', '.join(MODULE_ROLES)}, got {self.modules!r}")


class WeightScaleLayer(nn.Module):
    """One learned vector `magnitude` (out_features), initialised to the base weight's row norms."""

    def __init__(self, base):
        super().__init__()
        weight = base.weight.detach()
        self.magnitude = nn.Parameter(weight.norm(dim=1).clone())
        self.merged = False

    def extra_repr(self) -> str:
        return f"features={self.magnitude.numel()}"

    def row_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W_row|| (out_features,) for the live base weight: exactly 1 at init."""
        return self.magnitude / weight.norm(dim=1)

    def forward(self, x, y, weight, bias=None):
        return y + F.linear(x, weight) * (self.row_scale(weight) - 1)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.row_scale(weight).unsqueeze(1)


class WeightScaleVariant(AdapterVariant):
    name = "ia3-weight"
    summary = "(IA)^3 on the weights: each output row rescaled to a learned magnitude over its base norm; mergeable"
    config_cls = WeightScaleConfig
    default_roles = MODULE_ROLES["qv"]
    kinds = ("linear",)
    shareable = {"shared": ("magnitude",)}

    def roles(self, config: WeightScaleConfig) -> tuple[str, ...]:
        return MODULE_ROLES[config.modules]

    def create_layer(self, site, config: WeightScaleConfig, base=None) -> nn.Module:
        if base is None or getattr(base, "weight", None) is None:
            raise ConfigError(f"{self.name} needs the base weights of {site.path} (a linear site)")
        return WeightScaleLayer(base)

    def merged_weight(self, layer: WeightScaleLayer, weight, bias):
        return layer.adapted_weight(weight).to(weight.dtype), bias
