"""Parameter counts, with the one definition of "trainable %" used everywhere (inject, train, adapt):

trainable % = 100 * trainable parameters / every parameter of the model being run
              (backbone + adapters + AdapterFusion layers + task heads, each tensor counted once).
"""

from __future__ import annotations

from typing import Any


def trainable_percent(trainable: int, total: int) -> float:
    return 100.0 * trainable / max(total, 1)


def parameter_counts(backbone, heads=(), trainable=None) -> dict[str, Any]:
    """Trainable, backbone, adapter and head parameter counts and the trainable %; `trainable` (name ->
    parameter) overrides `requires_grad` as the trainable set, `heads` are the task heads (nn.Modules)."""
    import torch

    if trainable is None:
        params = [p for p in backbone.model.parameters() if p.requires_grad]
        params += [p for h in heads for p in h.parameters() if p.requires_grad]
    else:
        params = list(trainable.values())
    seen: dict[int, torch.Tensor] = {id(p): p for p in params}
    n_trainable = sum(p.numel() for p in seen.values())
    n_backbone = sum(p.numel() for p in backbone.base_parameters().values())
    adapters: dict[int, torch.Tensor] = {}
    for n, p in backbone.model.named_parameters(remove_duplicate=False):
        if ".adapters." in n or ".fusions." in n:
            adapters.setdefault(id(p), p)
    n_adapter = sum(p.numel() for p in adapters.values())
    n_head = sum(p.numel() for h in heads for p in h.parameters())
    return {
        "trainable": n_trainable,
        "backbone": n_backbone,
        "adapter": n_adapter,
        "head": n_head,
        "trainable_percent": trainable_percent(n_trainable, n_backbone + n_adapter + n_head),
    }


def _tower_of(name: str, prefixes: dict[str, tuple[str, ...]]) -> str:
    for tower, pre in prefixes.items():
        if any(name.startswith(p) for p in pre):
            return tower
    return "shared"


def parameter_report(backbone, records: dict[str, Any]) -> dict[str, Any]:
    """Total and trainable parameters of the backbone with its adapters (`records`: name -> InjectionRecord, as
    `AdaptedModel.records` holds them), per tower and per adapter."""
    prefixes = backbone.tower_prefixes()
    towers: dict[str, dict[str, int]] = {}
    adapters: dict[str, dict[str, Any]] = {
        n: {"variant": r.variant, "parameters": 0, "sites": len(r.sites)} for n, r in records.items()
    }
    total = trainable = base_total = 0
    for name, p in backbone.model.named_parameters():
        n = p.numel()
        total += n
        tower = _tower_of(name.replace(".base.", "."), prefixes)
        t = towers.setdefault(tower, {"total": 0, "trainable": 0, "adapter": 0})
        t["total"] += n
        if p.requires_grad:
            trainable += n
            t["trainable"] += n
        if ".adapters." in name:
            adapter = name.split(".adapters.", 1)[1].split(".", 1)[0]
            if adapter in adapters:
                adapters[adapter]["parameters"] += n
            t["adapter"] += n
        else:
            base_total += n
    for rec_name, rec in records.items():
        adapters[rec_name]["parameters"] += sum(p.numel() for p in rec.extra.values())
    for a in adapters.values():
        a["percent_of_backbone"] = 100.0 * a["parameters"] / max(base_total, 1)
    return {
        "backbone": backbone.spec,
        "total": total,
        "backbone_parameters": base_total,
        "trainable": trainable,
        "trainable_percent": trainable_percent(trainable, total),
        "towers": towers,
        "adapters": adapters,
    }
