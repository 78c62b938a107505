"""VL-Adapter's parameter-sharing schemes across task adapters on one backbone (Sung et al. 2022).

`sharing` ties parameters across task adapters (the same module object, so one copy in memory and one
gradient); multi-task training (`vlkit.train.multitask`) and composition loading use it:

- `per_task`          nothing shared: independent adapters (trained together, same budget);
- `half_shared_down`  the down-projection is shared, each task keeps its own up-projection;
- `half_shared_up`    the up-projection is shared;
- `shared`            a single adapter for all tasks (only the task heads differ).

Each variant says which layer attributes a scheme ties in `AdapterVariant.shareable` (its own down- and
up-projection modules or parameters); `shared` with no entry ties the whole layer.
"""

from __future__ import annotations

import torch

from ..adapters.model import AdaptedModel
from ..adapters.sites import host_of
from ..errors import ConfigError, IncompatibleAdapterError
from ..plugins import registry

SHARING = ("per_task", "half_shared_down", "half_shared_up", "shared")


def _shareable(variant) -> dict[str, tuple[str, ...]]:
    return dict(variant.shareable) if variant is not None else {}


def shared_parts(variant, sharing: str) -> tuple[str, ...]:
    """The layer attributes tied under `sharing` for `variant` (a registered name or an AdapterVariant):
    () for per_task, ("*",) for the whole layer; ConfigError when the variant does not define the scheme."""

    if sharing not in SHARING:
        raise ConfigError(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    if sharing == "per_task":
        return ()
    reg = registry("adapter")
    if isinstance(variant, str):
        label, var = variant, (reg.get(variant) if variant in reg else None)
    else:
        label, var = variant.name or type(variant).__name__, variant
    parts = _shareable(var).get(sharing)
    if parts is None:
        if sharing == "shared":
            return ("*",)
        defined = [n for n in reg.names() if sharing in _shareable(reg.get(n))]
        raise ConfigError(
            f"sharing {sharing!r} is not defined for adapter variant {label!r} "
            f"(defined for {', '.join(defined) or 'no registered variant'})"
        )
    return tuple(parts)


def tie_shared(backbone, names: list[str], sharing: str, check: bool = True) -> dict[str, torch.Tensor]:
    """Make adapters `names` share their parts per `sharing` (the first adapter's objects are used by all).

    With `check`, the tied tensors must already be equal (re-tying loaded copies). Returns the shared
    tensors by `<site path>.<part param>`."""
    model = AdaptedModel.of(backbone)
    if sharing == "per_task" or len(names) < 1:
        return {}
    rec0 = model.records[names[0]]
    parts = shared_parts(rec0.variant, sharing)
    first = model.adapter_layers(names[0])
    for n in names[1:]:
        rec = model.records[n]
        if rec.variant != rec0.variant or [s.path for s in rec.sites] != [s.path for s in rec0.sites]:
            raise IncompatibleAdapterError(
                f"adapters {names[0]} and {n} cannot share parameters: different variant or sites"
            )
        for site in rec.sites:
            group = host_of(backbone, site).adapter_group(n)
            layer, src = group[site.key], first[site.path]
            for part in parts:
                mine, theirs = (layer, src) if part == "*" else (getattr(layer, part), getattr(src, part))
                if mine is theirs:
                    continue
                if check and not all(torch.equal(a, b) for a, b in zip(_tensors(mine), _tensors(theirs))):
                    raise IncompatibleAdapterError(
                        f"adapters {names[0]} and {n} were saved as sharing {part!r} "
                        f"at {site.path}, but their weights differ"
                    )
                if part == "*":
                    group[site.key] = src
                else:
                    setattr(layer, part, theirs)
    shared = {}
    for path, layer in first.items():
        for part in parts:
            mod = layer if part == "*" else getattr(layer, part)
            if isinstance(mod, torch.nn.Parameter):
                shared[f"{path}.{part}"] = mod.data
            else:
                prefix = f"{path}." if part == "*" else f"{path}.{part}."
                shared.update({prefix + k: v for k, v in mod.state_dict().items()})
    return shared


def _tensors(obj):
    return [obj.data] if isinstance(obj, torch.nn.Parameter) else list(obj.state_dict().values())
