"""Bottleneck adapter (Houlsby / Pfeiffer): down-projection, activation, up-projection, residual.

`attn_position: input` moves the attention-site adapter from the attention's output to its input (the
normalised tokens that feed q, k and v), so the adapter can change where attention looks, not only what
it returns; `mlp_position: input` likewise puts the MLP-site adapter before the MLP's first projection,
so the MLP's non-linearity acts on adapted tokens. `embed: true` adds one more layer per tower on the
token sequence entering its first block (patch or token embeddings): where the input domain differs
from pre-training (medical scans, say) it remaps the low-level features every block reads. At init
each of these is still the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..backbones.base import resolve_module
from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"both": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}


@dataclass
class BottleneckShapeConfig(AdapterConfig):
    """Size, placement and activation of a bottleneck; shared by the bottleneck and fusion variants."""

    reduction: float = 8.0
    """Bottleneck width = site width / reduction, rounded (> 0; fusion: the narrower tower's width); unused when
    hidden is set."""
    hidden: int | None = None
    """Bottleneck width in units (>= 1), overriding reduction; None: from reduction."""
    placement: str = "both"
    """Sub-layers adapted when targets is unset: both (attention and MLP), attn or mlp."""
    activation: str = "relu"
    """Non-linearity between the down- and up-projection: relu, gelu, silu or tanh."""

    def validate(self) -> None:
        super().validate()
        if self.hidden is None and not self.reduction > 0:
            raise ConfigError(f"reduction must be > 0, got {self.reduction}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")

    def hidden_size(self, width: int) -> int:
        return self.hidden if self.hidden is not None else max(1, int(round(width / self.reduction)))


@dataclass
class BottleneckConfig(BottleneckShapeConfig):
    dropout: float = 0.0
    """Dropout on the adapter's input while training, in [0, 1)."""
    scale: float = 1.0
    """Factor on the adapter's output: y + scale · up(act(down(y)))."""
    unfreeze_layernorm: bool = False
    """Also train the LayerNorms of the adapted blocks (saved with the adapter as base:: weights)."""
    attn_position: str = "output"
    """Where the attention-site adapter acts: output (the attention's output) or input (the normalised tokens
    that feed q, k and v)."""
    mlp_position: str = "output"
    """Where the MLP-site adapter acts: output (the MLP's output) or input (before its first projection)."""
    embed: bool = False
    """Also adapt the token sequence entering each tower's first block (patch / token embeddings)."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("attn_position", "mlp_position"):
            if getattr(self, key) not in ("output", "input"):
                raise ConfigError(f"{key} must be output or input, got {getattr(self, key)!r}")


class BottleneckLayer(nn.Module):
    """y + scale * up(act(down(y))); `up` starts at zero so the wrapped model is unchanged at init."""

    def __init__(self, width: int, hidden: int, activation: str, dropout: float, scale: float):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, width)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.scale * self.up(self.act(self.down(self.dropout(y))))


class BottleneckVariant(AdapterVariant[BottleneckConfig]):
    name = "bottleneck"
    summary = "down-project, activation, up-project with residual after attention and/or MLP"
    config_cls = BottleneckConfig
    kinds = ("output",)
    shareable = {"half_shared_down": ("down",), "half_shared_up": ("up",), "shared": ("down", "up")}

    def roles(self, config: BottleneckConfig) -> tuple[str, ...]:
        return ("embed",) * config.embed + PLACEMENTS[config.placement]

    def place(self, site, config: BottleneckConfig):
        if site.kind == "output" and site.role in ("attn", "mlp"):
            if getattr(config, f"{site.role}_position") == "input":
                return replace(site, role=f"{site.role}.in", kind="input", out_features=site.in_features)
        return site

    def create_layer(self, site, config: BottleneckConfig, base=None) -> nn.Module:
        width = site.out_features
        return BottleneckLayer(width, config.hidden_size(width), config.activation, config.dropout, config.scale)

    def extra_trainable(self, backbone, config: BottleneckConfig, sites):
        if not config.unfreeze_layernorm:
            return {}

        blocks = {(s.tower, s.layer) for s in sites}
        out = {}
        for block in backbone.all_blocks():
            if (block.tower, block.index) not in blocks:
                continue
            mod = resolve_module(backbone.model, block.path)
            for name, sub in mod.named_modules():
                if isinstance(sub, nn.LayerNorm) and ".adapters." not in f".{name}.":
                    for pname, p in sub.named_parameters(recurse=False):
                        full = f"{block.path}.{name}.{pname}" if name else f"{block.path}.{pname}"
                        out[full.replace(".base.", ".")] = p
        return out
