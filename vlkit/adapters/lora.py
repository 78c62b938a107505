"""LoRA: a low-rank update B·A added to linear projections, including those inside nn.MultiheadAttention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

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
    """Rank r of the low-rank update B·A (>= 1)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank) · B·A."""
    dropout: float = 0.0
    """Dropout on the low-rank path's input while training, in [0, 1)."""
    modules: str = "attn"
    """Projections adapted when targets is unset: attn (q, k, v, out), qv, mlp (fc1, fc2) or all."""

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
        if self.dropout.p > 0:
            x = self.dropout(x)
        # one fused scale-and-add: `y + s * t` as two kernels costs as much as the rank-r projections at batch 1
        return torch.add(y, F.linear(F.linear(x, self.lora_A), self.lora_B), alpha=self.scaling)


def _lora_sites(t: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".lora_A")] for k in t if k.endswith(".lora_A"))


def _scaling(config: dict) -> float:
    return float(config.get("alpha", 16.0)) / int(config.get("rank", 8))


def lora_delta(configs, tensors, weights, site: str) -> torch.Tensor:
    """Σ w_i s_i B_i A_i at `site` (float64), s_i = alpha_i / rank_i."""
    return sum(
        w * _scaling(c) * (t[f"{site}.lora_B"].double() @ t[f"{site}.lora_A"].double())
        for c, t, w in zip(configs, tensors, weights)
    )


class LoraVariant(AdapterVariant[LoraConfig]):
    """LoRA. Sharing: `half_shared_down` ties `lora_A`, `half_shared_up` ties `lora_B`. Merge methods beyond the
    elementwise ones: `concat` (A stacked, B scaled and concatenated: exactly ΔW = Σ w_i s_i B_i A_i at rank
    Σ r_i, alpha = rank) and `svd` (that ΔW truncated by SVD to `rank`, default the first source's); both let
    rank and alpha differ between sources."""

    name = "lora"
    summary = "low-rank updates on attention (incl. nn.MultiheadAttention) and MLP projections; mergeable"
    config_cls = LoraConfig
    kinds = ("linear",)
    shareable = {"half_shared_down": ("lora_A",), "half_shared_up": ("lora_B",), "shared": ("lora_A", "lora_B")}
    merge_methods = ("concat", "svd")

    def roles(self, config: LoraConfig) -> tuple[str, ...]:
        return MODULE_ROLES[config.modules]

    def create_layer(self, site, config: LoraConfig, base=None) -> nn.Module:
        return LoraLayer(site.in_features, site.out_features, config.rank, config.alpha, config.dropout)

    def merged_weight(self, layer: nn.Module, weight, bias):
        lora = cast(LoraLayer, layer)  # a variant is only handed its own layers
        return weight + lora.delta_weight().to(weight.dtype), bias

    def merge_free_options(self, method: str) -> tuple[str, ...]:
        return ("rank", "alpha", "dropout") if method in self.merge_methods else ("dropout",)

    def merge(self, method, configs, tensors, weights, options):
        config: dict[str, Any] = dict(configs[0])
        info: dict[str, Any] = {}
        out: dict[str, torch.Tensor] = {}
        sites = _lora_sites(tensors[0])
        dtype = tensors[0][f"{sites[0]}.lora_A"].dtype
        if method == "concat":
            r_new = sum(int(c["rank"]) for c in configs)
            for s in sites:
                out[f"{s}.lora_A"] = torch.cat([t[f"{s}.lora_A"] for t in tensors], 0).to(dtype)
                out[f"{s}.lora_B"] = torch.cat(
                    [(w * _scaling(c)) * t[f"{s}.lora_B"].double() for c, t, w in zip(configs, tensors, weights)], 1
                ).to(dtype)
            config.update(rank=r_new, alpha=float(r_new))
            return out, config, info
        rank = options.get("rank")
        r = int(rank if rank is not None else configs[0]["rank"])
        if r < 1:
            raise ConfigError(f"rank must be >= 1, got {r}")
        err_num = err_den = 0.0
        for s in sites:
            delta = lora_delta(configs, tensors, weights, s)
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            k = min(r, len(sv))
            root = sv[:k].sqrt()
            b = torch.zeros(delta.shape[0], r, dtype=torch.float64)
            a = torch.zeros(r, delta.shape[1], dtype=torch.float64)
            b[:, :k] = u[:, :k] * root
            a[:k] = root.unsqueeze(1) * vh[:k]
            out[f"{s}.lora_A"], out[f"{s}.lora_B"] = a.to(dtype), b.to(dtype)
            err_num += float((sv[k:] ** 2).sum())
            err_den += float((sv**2).sum())
        config.update(rank=r, alpha=float(r))
        info["rank"] = r
        info["svd_relative_error"] = math.sqrt(err_num / err_den) if err_den > 0 else 0.0
        return out, config, info
