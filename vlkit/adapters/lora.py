"""LoRA: a low-rank update B·A added to linear projections, including those inside nn.MultiheadAttention."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant

MODULE_ROLES = {
    "attn": ("attn.q", "attn.k", "attn.v", "attn.out"),
    "qv": ("attn.q", "attn.v"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
    "all": ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2"),
}


@dataclass
class LoraConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    modules: str = "attn"

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.modules not in MODULE_ROLES:
            raise ConfigError(f"modules must be one of {', '.join(MODULE_ROLES)}, got {self.modules!r}")


class LoraLayer(nn.Module):
    """y + (alpha / rank) · B(A(dropout(x))), with B zero at init."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x, y, weight=None, bias=None):
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


class LoraVariant(AdapterVariant):
    name = "lora"
    summary = "low-rank updates on attention (incl. nn.MultiheadAttention) and MLP projections; mergeable"
    config_cls = LoraConfig
    kinds = ("linear",)

    def roles(self, config: LoraConfig) -> tuple[str, ...]:
        return MODULE_ROLES[config.modules]

    def create_layer(self, site, config: LoraConfig) -> nn.Module:
        return LoraLayer(site.in_features, site.out_features, config.rank, config.alpha, config.dropout)

    def merged_weight(self, layer: LoraLayer, weight, bias):
        return weight + layer.delta_weight().to(weight.dtype), bias
