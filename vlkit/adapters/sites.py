"""Injection mechanics: match a variant's sites on a backbone, wrap their modules in hosts, and describe what an
adapter targets (`InjectionRecord`). The adapter state itself has one owner, `vlkit.adapters.model.AdaptedModel`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backbones.base import FUSED_ROLES, Site, resolve_module, set_module
from ..backbones.hosts import AdaptedLinear, AdaptedMHA, AdaptedOutput, AdapterHost, linear_params
from ..backbones.sequence import SEQUENCE_KIND, sequence_host
from ..errors import ConfigError, InjectionError
from .weights import linear_weights


@dataclass
class InjectionRecord:
    """What `inject` did: the adapter's name, variant, resolved config, sites and extra trainables."""

    name: str
    variant: str
    config: dict[str, Any]
    sites: list[Site] = field(default_factory=list)
    extra: dict[str, nn.Parameter] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    config_obj: Any = None
    search: dict[str, Any] | None = None  # Tip-Adapter's alpha/beta search, when one ran

    @property
    def targets(self) -> list[str]:
        return [s.path for s in self.sites]


def _matches(pattern: str, site: Site, exact_paths: frozenset[str] = frozenset()) -> bool:
    """Role, `re:` regex, exact path, or path suffix. A pattern that is the full path of some site matches
    only that site (open_clip's text path `transformer.resblocks.0.attn` is also a suffix of the vision one). A
    fused projection's site (`attn.qkv`, `FUSED_ROLES`) is matched by the role of each of its parts too."""
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return bool(rx.search(site.path) or rx.fullmatch(site.role))
    if pattern in exact_paths:
        return pattern == site.path
    return (
        pattern == site.role
        or pattern in FUSED_ROLES.get(site.role, ())
        or pattern == site.path
        or site.path.endswith("." + pattern)
        or site.path.endswith("#" + pattern)
    )


def _towers(backbone, choice: str) -> tuple[str, ...]:
    return tuple(backbone.resolve_towers(choice))


def select_sites(backbone, variant, config) -> list[Site]:
    """The sites a variant with this config targets, in tower/layer order."""
    patterns = list(config.targets) if config.targets else list(variant.roles(config))
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"bad regular expression in targets {p!r}: {exc}") from None
    exact_paths = frozenset(s.path for b in backbone.all_blocks() for s in b.sites.values())
    chosen: list[Site] = []
    available_roles: set[str] = set()
    for tower in _towers(backbone, config.towers):
        blocks = backbone.blocks(tower)
        if not blocks:
            raise InjectionError(
                f"the {tower} tower of {backbone.spec} has no transformer blocks to adapt",
                hint="choose --towers text or vision",
            )
        n = len(blocks)
        wanted = None
        if config.layers is not None:
            wanted = set()
            for i in config.layers:
                j = i + n if i < 0 else i
                if not 0 <= j < n:
                    raise ConfigError(f"layer {i} is out of range for the {tower} tower ({n} blocks)")
                wanted.add(j)
        for block in blocks:
            if wanted is not None and block.index not in wanted:
                continue
            for site in block.sites.values():
                available_roles.add(site.role)
                if site.kind not in variant.kinds:
                    continue
                if not any(_matches(p, site, exact_paths) for p in patterns):
                    continue
                if any(_matches(p, site, exact_paths) for p in config.exclude):
                    continue
                chosen.append(site)
    if not chosen:
        raise InjectionError(
            f"no site matched targets {patterns} for variant {variant.name!r} on {backbone.spec}",
            hint=f"roles here: {', '.join(sorted(available_roles))}; "
            f"{variant.name} wraps {'/'.join(variant.kinds)} sites",
        )
    return chosen


def host_for(backbone, site: Site) -> AdapterHost:
    module = resolve_module(backbone.model, site.host_path)
    if isinstance(module, AdapterHost):
        return module
    if site.kind == SEQUENCE_KIND:  # the whole tower's blocks at once; see vlkit.backbones.sequence
        return sequence_host(backbone, site)
    state = backbone.adapter_state
    host: AdapterHost
    if isinstance(module, nn.MultiheadAttention):
        host = AdaptedMHA(module, state)
    elif site.kind == "linear" and linear_params(module) is not None:  # nn.Linear, transformers' Conv1D
        host = AdaptedLinear(module, state)
    else:
        host = AdaptedOutput(module, state)
    set_module(backbone.model, site.host_path, host)
    return host


def host_of(backbone, site: Site) -> AdapterHost:
    module = resolve_module(backbone.model, site.host_path)
    if not isinstance(module, AdapterHost):
        raise InjectionError(f"no adapter host at {site.host_path}")
    return module


def create_layer(variant, site: Site, config, base) -> nn.Module:
    """The variant's layer for one site: `variant.create_layer(site, config, base=base)`, as `AdapterVariant`
    declares it (`base`: a read-only view of the site's frozen module, or None)."""
    return variant.create_layer(site, config, base=base)


def reference_tensor(module: nn.Module) -> torch.Tensor | None:
    for p in module.parameters():
        return p
    return None


def site_weights(host: AdapterHost, site: Site):
    """The live (weight, bias) of a linear site, through the public `linear_weights`."""
    if site.kind != "linear":
        raise InjectionError(f"site {site.path} is not a linear projection and cannot be merged")
    return linear_weights(host.base, site.role)


def unwrap_empty_hosts(backbone) -> None:
    """Put each host's base module back where no adapter or fusion is left on it (deepest first)."""
    hosts = [
        (_logical_path(backbone.model, path), m)
        for path, m in backbone.model.named_modules()
        if isinstance(m, AdapterHost)
    ]
    for path, host in sorted(hosts, key=lambda pm: -pm[0].count(".")):
        if len(host.adapters) == 0 and len(host.fusions) == 0:
            set_module(backbone.model, path, host.base)


def _logical_path(root: nn.Module, path: str) -> str:
    """A module path with the `base` hops through adapter hosts removed (what `set_module` takes): a host nested in
    another host's base, e.g. a LoRA projection inside a bottleneck-wrapped MLP, is `...mlp.c_fc`, not
    `...mlp.base.c_fc`."""
    out: list[str] = []
    mod: Any = root
    for part in path.split(".") if path else []:
        if isinstance(mod, AdapterHost) and part == "base":
            mod = mod.base
            continue
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        out.append(part)
    return ".".join(out)
