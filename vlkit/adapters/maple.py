"""MaPLe (multi-modal prompt learning): prompt tokens in both towers, the vision prompts generated from the
text prompts by a learned projection, deep for the first J blocks.

At each block j of `layers` (default: the first `depth` blocks of each tower) the text tower gets
`num_tokens` learned tokens P_j (n, D_text) and the vision tower gets F_j(P_j) (n, D_vision), F_j a learned
linear coupling function, through the sequence sites (vlkit.backbones.sequence): inserted after the
start-of-text / class token, replacing those of block j − 1; blocks after the last carry the tokens on.
Gradients of both towers' losses reach P_j, so the two towers' prompts are learned jointly (the prompt
counterpart of the cross-modal `fusion` adapter).

Saved tensors: `prompts` at the text sites, `proj.weight` / `proj.bias` at the vision sites. Both towers are
required (`towers: both`) and the same blocks in each. Not the identity at init (inserted tokens join every
attention softmax: `identity_at_init = False`, as for `vpt`); not mergeable; prompt adapters cannot be routed,
fused or weighted (the sequence hosts say so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant


@dataclass
class MapleConfig(AdapterConfig):
    towers: str = "both"
    """Must be both: the vision prompts are projected from the text prompts of the same block."""
    num_tokens: int = 2
    """Prompt tokens inserted at each prompted block of each tower (>= 1)."""
    depth: int = 2
    """Prompt the first `depth` blocks of each tower when layers is unset (>= 1)."""
    init_std: float = 0.02
    """Standard deviation of the text prompts' normal init (>= 0)."""

    def validate(self) -> None:
        super().validate()
        if self.towers != "both":
            raise ConfigError(f"maple couples the text and vision prompts: towers must be both, got {self.towers!r}")
        if self.num_tokens < 1:
            raise ConfigError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        if not self.init_std >= 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")
        if self.layers is None:
            self.layers = list(range(self.depth))


class MapleTextPrompts(nn.Module):
    def __init__(self, prompts: nn.Parameter):
        super().__init__()
        self.prompts = prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompts.to(x.dtype)


class MapleVisionPrompts(nn.Module):
    """F_j(P_j): the coupling `proj` is this layer's; P_j belongs to the text layer of the same block (kept
    out of this module's state, so it is saved once)."""

    def __init__(self, prompts: nn.Parameter, vision_width: int):
        super().__init__()
        object.__setattr__(self, "_text_prompts", prompts)
        self.proj = nn.Linear(prompts.shape[1], vision_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._text_prompts.to(self.proj.weight.dtype)).to(x.dtype)


class MapleVariant(AdapterVariant[MapleConfig]):
    name = "maple"
    summary = "MaPLe: deep prompts in both towers, vision prompts projected from the text prompts"
    config_cls = MapleConfig
    kinds = ("sequence",)
    backbone_kinds = ("contrastive",)  # couples a dual encoder's text and image prompts
    default_roles = ("prompt",)
    identity_at_init = False

    def prepare_config(self, backbone, config: MapleConfig, sites) -> MapleConfig:
        by_tower = {t: sorted(s.layer for s in sites if s.tower == t) for t in ("vision", "text")}
        if by_tower["vision"] != by_tower["text"]:
            raise ConfigError(
                f"maple needs prompt sites at the same blocks of both towers; vision has "
                f"{by_tower['vision']}, text {by_tower['text']}"
            )
        widths = {s.layer: s.in_features for s in sites if s.tower == "text"}
        # one text prompt per block, shared by that block's two layers (not a config field: not saved here)
        config.__dict__["_prompts"] = {
            j: nn.Parameter(torch.randn(config.num_tokens, w) * config.init_std) for j, w in widths.items()
        }
        return config

    def create_layer(self, site, config: MapleConfig, base=None) -> nn.Module:
        prompts = config.__dict__["_prompts"][site.layer]
        if site.tower == "text":
            return MapleTextPrompts(prompts)
        return MapleVisionPrompts(prompts, site.in_features)

    def describe_state(self, config, tensors):
        prompts = [t for k, t in tensors.items() if k.endswith(".prompts")]
        projs = [t for k, t in tensors.items() if k.endswith(".proj.weight")]
        yield "prompts", f"{config.get('num_tokens')} tokens at blocks {config.get('layers')} of both towers"
        if prompts:
            yield "text prompt norm (mean)", f"{float(torch.cat([p.float() for p in prompts]).norm(dim=-1).mean()):.4g}"
        if projs:
            yield "coupling text -> vision", f"{len(projs)} linear maps {tuple(projs[0].shape[::-1])}"
