"""Prompt tuning (Lester et al., 2021; VL-Adapter's "single prompt" row): learned tokens prepended to a generative
backbone's language-model input, before the visual tokens and the prompt (the site of kind "prefix",
`vlkit.backbones.composed`). The backbone grows the attention mask by the tokens it gets back.

Not the identity at init: the prepended tokens join every attention softmax (`identity_at_init = False`). Not
mergeable: tokens are not a weight update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterVariant
from .vpt import VptConfig


@dataclass
class PromptConfig(VptConfig):
    towers: str = "all"
    """Where the prefix site is: a generative backbone's language-model input (`all`, `lm`, `encoder` for an
    encoder-decoder LM, `decoder` for a decoder-only one)."""
    num_tokens: int = 20
    """Learned tokens prepended to the LM's input sequence (>= 1)."""


class PrefixTokens(nn.Module):
    """Prepends `num_tokens` learned tokens (the same for every sample) to a (B, L, D) sequence."""

    per_sample = False  # it changes the sequence length: a batch routes through it whole, or not at all

    def __init__(self, num_tokens: int, width: int, std: float):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_tokens, width) * std)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        tokens = self.prompts.to(y.dtype).unsqueeze(0).expand(y.shape[0], -1, -1)
        return torch.cat([tokens, y], dim=1)


class PromptVariant(AdapterVariant[PromptConfig]):
    name = "prompt-tuning"
    summary = "prompt tuning: learned tokens prepended to a generative backbone's language-model input"
    config_cls = PromptConfig
    default_roles = ("prefix",)
    kinds = ("prefix",)
    identity_at_init = False
    backbone_kinds = ("generative",)
    composition_limits = {
        "parallel": "prompt tokens change the sequence length; they stack, not add",
        "merge": "prompt tokens are not a weight update",
    }

    def create_layer(self, site, config: PromptConfig, base=None) -> nn.Module:
        return PrefixTokens(config.num_tokens, site.in_features, config.init_std)
