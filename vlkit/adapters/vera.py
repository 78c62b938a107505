"""VeRA (vector-based random matrix adaptation): one pair of frozen random matrices shared by every adapted
projection, and two trainable scaling vectors per projection.

    ΔW = Λ_b B Λ_d A        A (rank, in), B (out, rank): frozen, drawn from `projection_seed`
                            Λ_d = diag(lambda_d) (rank,), init `d_initial`; Λ_b = diag(lambda_b) (out,), init 0

So the model is exactly the frozen one at init (λ_b = 0), and an adapter trains `rank + out` numbers per
projection (PEFT's VeRA: the same parametrisation, its defaults rank 256 and d_initial 0.1). A and B are not
saved: they are regenerated from the seed (a CPU `torch.Generator`, Kaiming-uniform like PEFT's; PEFT slices
one pair of the largest shape, vlkit draws one pair per shape), so an adapter file holds only the vectors and
every layer of one shape uses the very same tensors. Merges
exactly (export folds ΔW into the weights).

Options: `rank` (256), `d_initial` (0.1), `projection_seed` (0), `modules` (LoRA's: `attn` | `qv` | `mlp` |
`all`), plus the common `towers` / `layers` / `targets` / `exclude`. Adapter merges: `linear` only, and only
between adapters of the same `rank` and `projection_seed` (λ_d scales a shared random projection; it is not a
task vector whose neutral value is zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant
from .lora import MODULE_ROLES

_PROJECTIONS: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass
class VeraConfig(AdapterConfig):
    rank: int = 256
    """Rank of the shared frozen random projections A (rank, in) and B (out, rank) (>= 1)."""
    d_initial: float = 0.1
    """Initial value of every entry of the trainable vector λ_d (a finite number)."""
    projection_seed: int = 0
    """Seed A and B are drawn from, in [0, 2**63); only adapters of the same seed merge."""
    modules: str = "attn"
    """Projections adapted when targets is unset: attn (q, k, v, out), qv, mlp (fc1, fc2) or all."""

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.d_initial):
            raise ConfigError(f"d_initial must be a finite number, got {self.d_initial}")
        if not 0 <= int(self.projection_seed) < 2**63:
            raise ConfigError(f"projection_seed must be in [0, 2**63), got {self.projection_seed}")
        if self.modules not in MODULE_ROLES:
            raise ConfigError(f"modules must be one of {', '.join(MODULE_ROLES)}, got {self.modules!r}")


def shared_projections(seed: int, rank: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for this seed and shape: drawn once per process, the same tensors for every layer of the shape."""
    key = (int(seed), int(rank), int(in_features), int(out_features))
    if key not in _PROJECTIONS:
        gen = torch.Generator().manual_seed(int(seed))
        a = torch.empty(rank, in_features)
        b = torch.empty(out_features, rank)
        for t in (a, b):  # kaiming_uniform_(a=sqrt(5)) drawn from the seeded generator
            bound = 1.0 / math.sqrt(t.shape[1])
            t.uniform_(-bound, bound, generator=gen)
        _PROJECTIONS[key] = (a, b)
    return _PROJECTIONS[key]


class VeraLayer(nn.Module):
    """y + λ_b ⊙ B(λ_d ⊙ A x) (see the module docstring)."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, in_features: int, out_features: int, config: VeraConfig):
        super().__init__()
        a, b = shared_projections(config.projection_seed, config.rank, in_features, out_features)
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        self.lambda_d = nn.Parameter(torch.full((config.rank,), float(config.d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(out_features))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lambda_b.unsqueeze(1) * self.vera_B) @ (self.lambda_d.unsqueeze(1) * self.vera_A)

    def forward(self, x, y, weight=None, bias=None):
        h = F.linear(x, self.vera_A.to(x.dtype)) * self.lambda_d.to(x.dtype)
        return y + F.linear(h, self.vera_B.to(x.dtype)) * self.lambda_b.to(x.dtype)


class VeraVariant(AdapterVariant[VeraConfig]):
    name = "vera"
    summary = "VeRA: shared frozen random projections, two trainable scaling vectors per projection; mergeable"
    config_cls = VeraConfig
    kinds = ("linear",)
    composition_limits = {
        "task_arithmetic": "VeRA's lambda_d scales a shared random projection, not a task vector (use --method linear)",
        "ties": "VeRA's lambda_d scales a shared random projection, not a task vector (use --method linear)",
    }

    def roles(self, config: VeraConfig) -> tuple[str, ...]:
        return MODULE_ROLES[config.modules]

    def create_layer(self, site, config: VeraConfig, base=None) -> nn.Module:
        return VeraLayer(site.in_features, site.out_features, config)

    def merged_weight(self, layer: nn.Module, weight, bias):
        vera = cast(VeraLayer, layer)  # a variant is only handed its own layers
        with torch.no_grad():
            return weight + vera.delta_weight().to(weight.dtype), bias

    def describe_state(self, config, tensors):
        ds = [t.float() for k, t in tensors.items() if k.endswith(".lambda_d")]
        bs = [t.float() for k, t in tensors.items() if k.endswith(".lambda_b")]
        yield "rank / projection seed", f"{config.get('rank')} / {config.get('projection_seed')}"
        if ds:
            yield "lambda_d (mean)", f"{float(torch.cat(ds).mean()):.4g}"
        if bs:
            yield "|lambda_b| (mean over sites; 0 = unchanged)", f"{sum(float(b.norm()) for b in bs) / len(bs):.4g}"
