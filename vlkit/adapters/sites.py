"""Injection core: match sites, wrap their modules in hosts, freeze the backbone, record what was targeted."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backbones.base import TOWERS, Site, resolve_module, set_module
from ..errors import ConfigError, InjectionError
from ..plugins import registry
from .base import AdapterVariant
from ..backbones.hosts import AdaptedLinear, AdaptedMHA, AdaptedOutput, AdapterHost
from ..backbones.sequence import SEQUENCE_KIND, sequence_host
from ..backbones.state import check_adapter_name
from .weights import base_for_site, linear_weights


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

    @property
    def targets(self) -> list[str]:
        return [s.path for s in self.sites]


def _matches(pattern: str, site: Site, exact_paths: frozenset[str] = frozenset()) -> bool:
    """Role, `re:` regex, exact path, or path suffix. A pattern that is the full path of some site matches
    only that site (open_clip's text path `transformer.resblocks.0.attn` is also a suffix of the vision one)."""
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return bool(rx.search(site.path) or rx.fullmatch(site.role))
    if pattern in exact_paths:
        return pattern == site.path
    return (pattern == site.role or pattern == site.path or site.path.endswith("." + pattern)
            or site.path.endswith("#" + pattern))


def _towers(choice: str) -> tuple[str, ...]:
    return TOWERS if choice == "both" else (choice,)


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
    for tower in _towers(config.towers):
        blocks = backbone.blocks(tower)
        if not blocks:
            raise InjectionError(f"the {tower} tower of {backbone.spec} has no transformer blocks to adapt",
                                 hint="choose --towers text or vision")
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
            hint=f"roles here: {', '.join(sorted(available_roles))}; {variant.name} wraps {'/'.join(variant.kinds)} sites",
        )
    return chosen


def _host_for(backbone, site: Site) -> AdapterHost:
    module = resolve_module(backbone.model, site.host_path)
    if isinstance(module, AdapterHost):
        return module
    if site.kind == SEQUENCE_KIND:  # the whole tower's blocks at once; see vlkit.backbones.sequence
        return sequence_host(backbone, site)
    state = backbone.adapter_state
    if isinstance(module, nn.MultiheadAttention):
        host = AdaptedMHA(module, state)
    elif isinstance(module, nn.Linear) and site.kind == "linear":
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


def takes_base(variant) -> bool:
    """Whether `variant.create_layer` accepts the `base` argument (a parameter named `base`, or **kwargs).

    Variants written for the older two-argument form `create_layer(site, config)` are called without it."""
    try:
        params = inspect.signature(variant.create_layer).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "base" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def create_layer(variant, site: Site, config, base) -> nn.Module:
    """`variant.create_layer(site, config, base=base)`, or `(site, config)` for a variant that takes no base."""
    if takes_base(variant):
        return variant.create_layer(site, config, base=base)
    return variant.create_layer(site, config)


def _reference_tensor(module: nn.Module) -> torch.Tensor | None:
    for p in module.parameters():
        return p
    return None


def inject(backbone, variant: str = "bottleneck", name: str = "default", *, trainable: bool = True,
           **options: Any) -> InjectionRecord:
    """Freeze `backbone` and add adapter `name` of `variant` to it; returns what was targeted.

    The new adapter becomes the active one. Options are the variant's config fields
    (towers, layers, targets, exclude and the variant's own, e.g. reduction or rank).
    """
    check_adapter_name(name)
    var = registry("adapter").get(variant)
    config = var.make_config(**options)
    if name in backbone.adapter_records:
        raise ConfigError(f"an adapter named {name!r} is already on this backbone; pick another name")
    sites = [var.place(s, config) for s in select_sites(backbone, var, config)]
    config = var.prepare_config(backbone, config, sites)
    for p in backbone.parameters():
        p.requires_grad_(False)
    for site in sites:
        host = _host_for(backbone, site)
        layer = create_layer(var, site, config, base_for_site(host.base, site))
        if hasattr(layer, "bind_state"):
            layer.bind_state(backbone.adapter_state)
        ref = _reference_tensor(host.base)
        if ref is not None:
            layer.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        host.add_layer(name, site.key, site.kind, layer)
        for p in layer.parameters():
            p.requires_grad_(trainable)
    extra = var.extra_trainable(backbone, config, sites)
    for p in extra.values():
        p.requires_grad_(trainable)
    record = InjectionRecord(name, variant, config.to_dict(), sites, extra)
    record.config_obj = config
    backbone.adapter_records[name] = record
    backbone.set_active(name)
    return record


def adapter_layers(backbone, name: str) -> dict[str, nn.Module]:
    """Site path -> the layer of adapter `name` at that site."""
    record = backbone.adapter_records[name]
    return {s.path: host_of(backbone, s).adapters[name][s.key] for s in record.sites}


def adapter_parameters(backbone, name: str) -> dict[str, torch.Tensor]:
    """Every tensor that makes up adapter `name`, under the keys used in adapter_model.safetensors."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(backbone, name).items():
        for pname, t in layer.state_dict().items():
            out[f"{path}.{pname}"] = t
    for pname, p in backbone.adapter_records[name].extra.items():
        out[f"base::{pname}"] = p.data
    return out


def remove_adapter(backbone, name: str) -> None:
    """Take adapter `name` off the backbone (its hosts stay, empty, and pass through).

    A merged adapter is unmerged first, so the base weights are restored exactly.
    """
    unmerge_adapter(backbone, name)
    record = backbone.adapter_records.pop(name)
    for site in record.sites:
        host_of(backbone, site).remove_adapter(name)
    st = backbone.adapter_state
    st.active = tuple(n for n in st.active if n != name)


def merge_adapter(backbone, name: str) -> None:
    """Fold adapter `name` into the base weights (LoRA-like variants); unmerge restores them exactly."""
    record = backbone.adapter_records[name]
    var = registry("adapter").get(record.variant)
    from .base import AdapterVariant

    if type(var).merged_weight is AdapterVariant.merged_weight:
        raise InjectionError(f"adapter variant {record.variant!r} cannot be merged into the weights "
                             f"({var.summary or 'it is not a weight update'})")
    for site in record.sites:
        host = host_of(backbone, site)
        layer = host.adapters[name][site.key]
        if getattr(layer, "merged", False):
            continue
        weight, bias = _site_weights(host, site)
        w = weight.detach()
        b = bias.detach() if bias is not None else None
        merged = var.merged_weight(layer, w, b)
        if merged is None:
            raise InjectionError(f"adapter variant {record.variant!r} cannot be merged into the weights")
        layer._saved_base = (w.clone(), None if b is None else b.clone())
        with torch.no_grad():
            weight.copy_(merged[0])
            if bias is not None and merged[1] is not None:
                bias.copy_(merged[1])
        layer.merged = True


def unmerge_adapter(backbone, name: str) -> None:
    record = backbone.adapter_records[name]
    for site in record.sites:
        host = host_of(backbone, site)
        layer = host.adapters[name][site.key]
        if not getattr(layer, "merged", False):
            continue
        weight, bias = _site_weights(host, site)
        w, b = layer._saved_base
        with torch.no_grad():
            weight.copy_(w)
            if bias is not None and b is not None:
                bias.copy_(b)
        del layer._saved_base
        layer.merged = False


def _site_weights(host: AdapterHost, site: Site):
    """The live (weight, bias) of a linear site, through the public `linear_weights`."""
    if site.kind != "linear":
        raise InjectionError(f"site {site.path} is not a linear projection and cannot be merged")
    return linear_weights(host.base, site.role)


def merge_and_unload(backbone, *names: str) -> list[str]:
    """Fold adapters into the base weights for good and take them off the backbone, keeping no copy of the
    original weights (PEFT's `merge_and_unload`): afterwards the backbone holds the memory and runs the forward
    of a plain frozen backbone. Without names: the active adapters, in activation order. Only plain stacking
    of variants that merge; nothing changes when one cannot. Not undoable (`merge_adapter` is, at the cost of a
    copy of the weights it touches). Returns the names merged."""
    st = backbone.adapter_state
    names = tuple(names) or tuple(st.active)
    if st.route is not None or st.mode != "stack" or st.fusion or any(w != 1.0 for w in st.weights.values()):
        raise InjectionError("merge_and_unload folds plainly stacked adapters; this backbone is set to "
                             f"{'per-sample routing' if st.route is not None else st.mode}")
    reg = registry("adapter")
    for name in names:
        if name not in backbone.adapter_records:
            raise ConfigError(f"no adapter named {name!r} on this backbone")
        record = backbone.adapter_records[name]
        var = reg.get(record.variant)
        if type(var).merged_weight is AdapterVariant.merged_weight or any(s.kind != "linear" for s in record.sites):
            raise InjectionError(f"adapter {name!r} ({record.variant}) cannot be merged into the weights; "
                                 "nothing was merged")
    for name in names:
        record = backbone.adapter_records[name]
        var = reg.get(record.variant)
        for site in record.sites:
            host = host_of(backbone, site)
            layer = host.adapters[name][site.key]
            if getattr(layer, "merged", False):  # already folded: only its saved copy goes
                layer.__dict__.pop("_saved_base", None)
                continue
            weight, bias = _site_weights(host, site)
            with torch.no_grad():
                merged = var.merged_weight(layer, weight.detach(), None if bias is None else bias.detach())
                weight.copy_(merged[0])
                if bias is not None and merged[1] is not None:
                    bias.copy_(merged[1])
            del merged
        for site in record.sites:
            host_of(backbone, site).remove_adapter(name)
        backbone.adapter_records.pop(name)
        st.active = tuple(n for n in st.active if n != name)
    _unwrap_empty_hosts(backbone)
    return list(names)


def _unwrap_empty_hosts(backbone) -> None:
    """Put each host's base module back where no adapter or fusion is left on it (deepest first)."""
    hosts = [(path, m) for path, m in backbone.model.named_modules() if isinstance(m, AdapterHost)]
    for path, host in sorted(hosts, key=lambda pm: -pm[0].count(".")):
        if len(host.adapters) == 0 and len(host.fusions) == 0:
            set_module(backbone.model, path, host.base)
