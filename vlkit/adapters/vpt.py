"""Deep prompt tuning (VPT-deep for vision, the MaPLe / deep-CoOp form for text): learned tokens at the input of
every chosen transformer block, through the sites of kind "sequence" (see vlkit.backbones.sequence).

At each block in `layers` (default: every block) `num_tokens` fresh tokens are inserted, after the class token
in the vision tower and after the start-of-text token in the text tower; they replace the tokens the previous
block produced. `layers: [0]` is shallow prompt tuning (the tokens inserted at block 0 travel through the
whole tower). The backbone grows the attention masks and strips the tokens off each block's output, so
pooling and output shapes are those of the frozen model.

Not the identity at init: inserted tokens join every attention softmax, so even zero tokens change the
outputs (the conformance suite knows this through `identity_at_init = False`). Not mergeable: tokens are not
a weight update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant


@dataclass
class VptConfig(AdapterConfig):
    num_tokens: int = 4
    """Learned tokens inserted at the input of each chosen block (>= 1)."""
    init_std: float = 0.02
    """Standard deviation of the tokens' normal init (>= 0)."""

    def validate(self) -> None:
        super().validate()
        if self.num_tokens < 1:
            raise ConfigError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not self.init_std >= 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")


class PromptTokens(nn.Module):
    """`num_tokens` learned tokens of the block's width, the same for every sample."""

    def __init__(self, num_tokens: int, width: int, std: float):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_tokens, width) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompts.unsqueeze(0).expand(x.shape[0], -1, -1)


class VptVariant(AdapterVariant[VptConfig]):
    name = "vpt"
    summary = "deep prompt tuning: learned tokens inserted at each block's input (vision and text towers)"
    config_cls = VptConfig
    default_roles = ("prompt",)
    kinds = ("sequence",)
    identity_at_init = False

    def create_layer(self, site, config: VptConfig, base=None) -> nn.Module:
        return PromptTokens(config.num_tokens, site.in_features, config.init_std)
