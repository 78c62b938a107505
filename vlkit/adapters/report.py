"""Parameter report: total, trainable and trainable % overall, per tower and per adapter."""
from __future__ import annotations

from typing import Any


def _tower_of(name: str, prefixes: dict[str, tuple[str, ...]]) -> str:
    for tower, pre in prefixes.items():
        if any(name.startswith(p) for p in pre):
            return tower
    return "shared"


def parameter_report(backbone) -> dict[str, Any]:
    prefixes = backbone.tower_prefixes()
    towers: dict[str, dict[str, int]] = {}
    adapters: dict[str, dict[str, Any]] = {
        n: {"variant": r.variant, "parameters": 0, "sites": len(r.sites)} for n, r in backbone.adapter_records.items()}
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
    for rec_name, rec in backbone.adapter_records.items():
        adapters[rec_name]["parameters"] += sum(p.numel() for p in rec.extra.values())
    for a in adapters.values():
        a["percent_of_backbone"] = 100.0 * a["parameters"] / max(base_total, 1)
    return {
        "backbone": backbone.spec,
        "total": total,
        "backbone_parameters": base_total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "towers": towers,
        "adapters": adapters,
    }
