"""Cross-modal fusion-gated adapter: the two towers meet inside the bottleneck.

Each fused site is a bottleneck adapter (down, activation, up; up starts at zero) plus a cross-modal
path: the down-projected tokens of this tower attend to (`attention`) or are channel-gated by a pooled
summary of (`gating`) the down-projected tokens of the other tower at the paired layer, for the same
image-caption pair: h <- h + tanh(gate) * cross(h, h_other), then y + up(h). A learned gate (scalar or
per channel) weighs that path against the plain bottleneck path; `up` starts at zero, so the injected
model gives the frozen model's outputs at init.

Joint passes run twice: a recording pass stores each fused site's input tokens, the fusing pass reads
the other tower's recorded tokens (see `Backbone.encode_pair`). Towers of different depth are paired by
relative depth; the pairing is saved in the adapter config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterVariant
from .bottleneck import ACTIVATIONS, PLACEMENTS, BottleneckShapeConfig

MECHANISMS = ("attention", "gating")
GATES = ("scalar", "channel")
GATE_INIT = 0.5


@dataclass
class CrossModalConfig(BottleneckShapeConfig):
    towers: str = "both"
    """Must be both: each tower's fused sites read the other tower's."""
    placement: str = "mlp"
    """Sub-layers that get a fused bottleneck when targets is unset: mlp, attn or both."""
    mechanism: str = "attention"
    """How a site reads the other tower's hidden tokens: attention (cross-attention over them) or gating (a
    channel gate from their pooled summary)."""
    gate: str = "scalar"
    """The learned gate tanh(g) weighing the cross-modal path: scalar (one g) or channel (one per hidden unit)."""
    pairing: list[list[int]] | None = None
    """Set by vlkit and saved: [[vision layer, text layer], ...], the fused layers paired by relative depth."""
    widths: list[int] | None = None
    """Set by vlkit and saved: [vision width, text width] of the fused sites."""

    def validate(self) -> None:
        if self.towers != "both":
            raise ConfigError("the fusion adapter needs towers=both (each tower attends to the other)")
        super().validate()
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {self.mechanism!r}")
        if self.gate not in GATES:
            raise ConfigError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")


def relative_depth_pairs(vision_layers: list[int], text_layers: list[int]) -> list[list[int]]:
    """For each vision layer the text layer at the nearest relative depth: [[v, t], ...]."""
    nv, nt = len(vision_layers), len(text_layers)
    pairs = []
    for i, v in enumerate(vision_layers):
        rel = i / (nv - 1) if nv > 1 else 1.0
        j = int(round(rel * (nt - 1))) if nt > 1 else 0
        pairs.append([v, text_layers[j]])
    return pairs


def _text_for_vision(pairs: list[list[int]]) -> dict[int, int]:
    return {v: t for v, t in pairs}


def _vision_for_text(pairs: list[list[int]], text_layers: list[int]) -> dict[int, int]:
    """Each text layer reads the vision layer whose relative depth is nearest (the inverse pairing)."""
    vis = [v for v, _ in pairs]
    nv, nt = len(vis), len(text_layers)
    out = {}
    for j, t in enumerate(text_layers):
        rel = j / (nt - 1) if nt > 1 else 1.0
        out[t] = vis[int(round(rel * (nv - 1))) if nv > 1 else 0]
    return out


class CrossModalLayer(nn.Module):
    """Bottleneck whose hidden tokens h are fused with the other tower's hidden tokens at the paired layer."""

    per_sample = False  # reads the other tower's batch-aligned states: routed on the whole batch

    def __init__(
        self, tower: str, layer: int, role: str, width: int, ctx_layer: int, hidden: int, config: CrossModalConfig
    ):
        super().__init__()
        self.tower, self.layer, self.role, self.ctx_layer = tower, layer, role, ctx_layer
        self.other = "text" if tower == "vision" else "vision"
        self.mechanism = config.mechanism
        self.down = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if self.mechanism == "attention":
            self.q = nn.Linear(hidden, hidden, bias=False)
            self.k = nn.Linear(hidden, hidden, bias=False)
            self.v = nn.Linear(hidden, hidden, bias=False)
        else:
            self.g = nn.Linear(hidden, hidden)
        self.gate = nn.Parameter(torch.full((1 if config.gate == "scalar" else hidden,), GATE_INIT))
        self._state = None

    def bind_state(self, state) -> None:
        object.__setattr__(self, "_state", state)

    def cross(self, h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.mechanism == "attention":
            q, k, v = self.q(h), self.k(c), self.v(c)
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
            return scores.softmax(-1) @ v
        if mask is None:
            pooled = c.mean(1)
        else:
            m = mask.to(c.dtype).unsqueeze(-1)
            pooled = (c * m).sum(1) / m.sum(1).clamp_min(1.0)
        return h * torch.sigmoid(self.g(pooled)).unsqueeze(1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(y))
        ctx: dict = self._state.context if self._state is not None else {}
        mode = ctx.get("joint")
        if mode == "record":
            key = (self.tower, self.layer, self.role)
            ctx["states"][key] = h
            # the mask in effect now: prompt (sequence) adapters may have made this block's sequence longer
            ctx.setdefault("state_masks", {})[key] = ctx.get("masks", {}).get(self.tower)
        elif mode == "fuse":
            key = (self.other, self.ctx_layer, self.role)
            c = ctx["states"].get(key)
            if c is not None:
                mask = ctx.get("state_masks", {}).get(key, ctx.get("masks", {}).get(self.other))
                h = h + torch.tanh(self.gate) * self.cross(h, c, mask)
        return y + self.up(h)


class CrossModalVariant(AdapterVariant[CrossModalConfig]):
    name = "fusion"
    summary = "bottleneck whose hidden tokens attend to / are gated by the other modality (joint scoring)"
    config_cls = CrossModalConfig
    kinds = ("output",)
    joint = True
    shareable = {"half_shared_down": ("down",), "half_shared_up": ("up",)}  # `shared`: the whole layer

    def roles(self, config: CrossModalConfig) -> tuple[str, ...]:
        return PLACEMENTS[config.placement]

    def prepare_config(self, backbone, config: CrossModalConfig, sites):
        vis = sorted({s.layer for s in sites if s.tower == "vision"})
        txt = sorted({s.layer for s in sites if s.tower == "text"})
        if not vis or not txt:
            raise ConfigError("the fusion adapter needs fused layers in both towers")
        pairs = relative_depth_pairs(vis, txt)
        if config.pairing is not None:
            if [list(p) for p in config.pairing] != pairs:
                raise ConfigError(f"saved layer pairing {config.pairing} does not match this backbone ({pairs})")
        config.pairing = pairs
        widths = {s.tower: s.out_features for s in sites}
        config.widths = [widths["vision"], widths["text"]]
        config._text_layers = txt  # type: ignore[attr-defined]  # not saved: a loaded config derives it
        return config

    def create_layer(self, site, config: CrossModalConfig, base=None) -> nn.Module:
        pairing = config.pairing
        assert pairing is not None, "set by prepare_config"
        txt_layers = getattr(config, "_text_layers", sorted({t for _, t in pairing}))
        if site.tower == "vision":
            ctx_layer = _text_for_vision(pairing)[site.layer]
        else:
            ctx_layer = _vision_for_text(pairing, txt_layers)[site.layer]
        return CrossModalLayer(
            site.tower, site.layer, site.role, site.out_features, ctx_layer, self.hidden_for(config), config
        )

    def hidden_for(self, config: CrossModalConfig) -> int:
        """One bottleneck size for both towers, so each tower's hidden tokens can meet the other's."""
        assert config.widths is not None, "set by prepare_config"
        return config.hidden_size(min(config.widths))

    def plain_equivalent_parameters(self, config: CrossModalConfig, sites) -> int:
        """Parameters of a plain bottleneck of the same hidden size on the same sites (for the overhead)."""
        r = self.hidden_for(config)
        return sum(2 * s.out_features * r + r + s.out_features for s in sites)
