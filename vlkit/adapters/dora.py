"""DoRA (weight-decomposed low-rank adaptation): each adapted projection's weight is split into a magnitude
vector and a direction, and the direction gets a LoRA update.

    V  = W + s · B A                     (s = alpha / rank; B zero at init)
    W' = m ⊙ V / ‖V‖                     (row norms; m initialised to ‖W‖, so W' = W at init)

Applied as `y + (m/‖V‖ − 1) ⊙ (x Wᵀ) + (m/‖V‖) ⊙ s · B A dropout(x)`, the form PEFT uses (exact, dropout only
on the low-rank path); `‖V‖` is treated as a constant for the gradient, as in the DoRA paper and PEFT. Merges
exactly (`merged_weight` is `W'`), so export folds it into the weights.

Options: `rank` (8), `alpha` (16), `dropout` (0), `modules` (`attn` | `qv` | `mlp` | `all`, LoRA's), plus the
common `towers` / `layers` / `targets` / `exclude`. Sharing: `half_shared_down` ties `lora_A`,
`half_shared_up` ties `lora_B`, `shared` both (the magnitude stays per task). Adapter merges: `linear` only (a
magnitude is an absolute row norm, not a task vector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterVariant
from .lora import MODULE_ROLES, LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's options (`rank`, `alpha`, `dropout`, `modules`) and checks: DoRA's direction is a LoRA update."""


class DoraLayer(nn.Module):
    """Magnitude `magnitude` (out,), low-rank direction update `lora_B @ lora_A` (see the module docstring)."""

    def __init__(self, base, rank: int, alpha: float, dropout: float):
        super().__init__()
        w = base.weight.detach().float()
        self.magnitude = nn.Parameter(w.norm(dim=1).clone())
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def _scale(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight + self.scaling * (self.lora_B @ self.lora_A).to(weight.dtype)
        return self.magnitude.to(weight.dtype) / v.norm(dim=1).detach()

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight + self.scaling * (self.lora_B @ self.lora_A).to(weight.dtype)
        return (self.magnitude.to(weight.dtype) / v.norm(dim=1)).unsqueeze(1) * v

    def _low(self, x):
        return self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def forward(self, x, y, weight, bias=None):
        scale = self._scale(weight)
        return y + (scale - 1) * F.linear(x, weight) + scale * self._low(x)

    def from_base(self, x, y, weight, bias=None):
        """`forward` when `y` is the base output W x + b (the first layer of a plain stack): W x is y - b, so
        the projection is not computed a second time (as PEFT does)."""
        scale = self._scale(weight)
        wx = y if bias is None else y - bias
        return y + (scale - 1) * wx + scale * self._low(x)


class DoraVariant(AdapterVariant[DoraConfig]):
    name = "dora"
    summary = "weight-decomposed low-rank update (DoRA: magnitude + LoRA direction); mergeable"
    config_cls = DoraConfig
    kinds = ("linear",)
    shareable = {"half_shared_down": ("lora_A",), "half_shared_up": ("lora_B",), "shared": ("lora_A", "lora_B")}
    composition_limits = {
        "task_arithmetic": "a DoRA magnitude is an absolute row norm, not a task vector (use --method linear)",
        "ties": "a DoRA magnitude is an absolute row norm, not a task vector (use --method linear)",
    }

    def roles(self, config: DoraConfig) -> tuple[str, ...]:
        return MODULE_ROLES[config.modules]

    def create_layer(self, site, config: DoraConfig, base=None) -> nn.Module:
        return DoraLayer(base, config.rank, config.alpha, config.dropout)

    def merged_weight(self, layer: nn.Module, weight, bias):
        dora = cast(DoraLayer, layer)  # a variant is only handed its own layers
        with torch.no_grad():
            return dora.adapted_weight(weight).to(weight.dtype), bias

    def describe_state(self, config, tensors):
        mags = [t.float() for k, t in tensors.items() if k.endswith(".magnitude")]
        ups = [t.float() for k, t in tensors.items() if k.endswith(".lora_B")]
        yield "rank / alpha", f"{config.get('rank')} / {config.get('alpha')}"
        if mags:
            yield "magnitude (mean over rows)", f"{float(torch.cat(mags).mean()):.4g}"
        if ups:
            mean = sum(float(u.norm()) for u in ups) / len(ups)
            yield "|B| (mean over sites; 0 = unchanged direction)", f"{mean:.4g}"
