"""VL-Adapter's parameter-sharing schemes across task adapters on one backbone (Sung et al. 2022).

`sharing` ties parameters across task adapters (the same module object, so one copy in memory and one
gradient); multi-task training (`vlkit.train.multitask`) and composition loading use it:

- `per_task`          nothing shared: independent adapters (trained together, same budget);
- `half_shared_down`  the down-projection is shared (bottleneck/fusion `down`, LoRA `lora_A`), each task
                      keeps its own up-projection;
- `half_shared_up`    the up-projection is shared (bottleneck/fusion `up`, LoRA `lora_B`);
- `shared`            a single adapter for all tasks (only the task heads differ).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, IncompatibleAdapterError

SHARING = ("per_task", "half_shared_down", "half_shared_up", "shared")
SHARED_PARTS = {
    "bottleneck": {"half_shared_down": ("down",), "half_shared_up": ("up",), "shared": ("down", "up")},
    "fusion": {"half_shared_down": ("down",), "half_shared_up": ("up",)},
    "lora": {"half_shared_down": ("lora_A",), "half_shared_up": ("lora_B",), "shared": ("lora_A", "lora_B")},
}


def shared_parts(variant: str, sharing: str) -> tuple[str, ...]:
    if sharing not in SHARING:
        raise ConfigError(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    if sharing == "per_task":
        return ()
    parts = SHARED_PARTS.get(variant, {}).get(sharing)
    if parts is None:
        if sharing == "shared":
            return ("*",)
        raise ConfigError(f"sharing {sharing!r} is not defined for adapter variant {variant!r} "
                          f"(defined for {', '.join(k for k, v in SHARED_PARTS.items() if sharing in v)})")
    return parts


def tie_shared(backbone, names: list[str], sharing: str, check: bool = True) -> dict[str, torch.Tensor]:
    """Make adapters `names` share their parts per `sharing` (the first adapter's objects are used by all).

    With `check`, the tied tensors must already be equal (re-tying loaded copies). Returns the shared
    tensors by `<site path>.<part param>`."""
    from ..adapters.inject import adapter_layers, host_of

    if sharing == "per_task" or len(names) < 1:
        return {}
    rec0 = backbone.adapter_records[names[0]]
    parts = shared_parts(rec0.variant, sharing)
    first = adapter_layers(backbone, names[0])
    for n in names[1:]:
        rec = backbone.adapter_records[n]
        if rec.variant != rec0.variant or [s.path for s in rec.sites] != [s.path for s in rec0.sites]:
            raise IncompatibleAdapterError(f"adapters {names[0]} and {n} cannot share parameters: different "
                                           "variant or sites")
        for site in rec.sites:
            host = host_of(backbone, site)
            layer, src = host.adapters[n][site.key], first[site.path]
            for part in parts:
                mine, theirs = (layer, src) if part == "*" else (getattr(layer, part), getattr(src, part))
                if mine is theirs:
                    continue
                if check and not all(torch.equal(a, b) for a, b in zip(_tensors(mine), _tensors(theirs))):
                    raise IncompatibleAdapterError(f"adapters {names[0]} and {n} were saved as sharing {part!r} "
                                                   f"at {site.path}, but their weights differ")
                if part == "*":
                    host.adapters[n][site.key] = src
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
