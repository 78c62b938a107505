"""Look inside a saved adapter without a backbone: config, parameter counts, and fusion gate values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path
from ..plugins import registry
from .files import read_adapter_config, read_adapter_weights


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    cfg = read_adapter_config(path)
    weights = read_adapter_weights(path)
    sites = {s["path"]: s for s in cfg.get("sites", [])}
    per_tower: dict[str, int] = {}
    for key, t in weights.items():
        site = sites.get(key.rsplit(".", 2)[0]) or sites.get(key.rsplit(".", 1)[0])
        tower = site["tower"] if site else "shared"
        per_tower[tower] = per_tower.get(tower, 0) + t.numel()
    gates = []
    for spath, site in sites.items():
        g = weights.get(f"{spath}.gate")
        if g is None:
            continue
        val = torch.tanh(g.float())
        gates.append(
            {
                "tower": site["tower"],
                "layer": site["layer"],
                "role": site["role"],
                "gate": float(val.mean()),
                "gate_abs": float(val.abs().mean()),
                "channels": int(val.numel()),
            }
        )
    gates.sort(key=lambda r: (r["tower"], r["layer"], r["role"]))
    return {
        **_state(cfg, weights),
        "path": str(path),
        "name": cfg.get("name"),
        "variant": cfg["variant"],
        "config": cfg["config"],
        "backbone": cfg.get("backbone"),
        "backbone_fingerprint": cfg.get("backbone_fingerprint"),
        "task": cfg.get("task", {}),
        "parameters": int(sum(t.numel() for t in weights.values())),
        "parameters_per_tower": per_tower,
        "sites": len(sites),
        "gates": gates,
        "composition": cfg.get("composition"),
    }


def _state(cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the adapter holds, whatever its variant: per tensor name (the part after the site path, e.g.
    `lora_A`, `context`, `keys`) the count, shape and size of the tensors, with their mean |x| and RMS; plus
    the variant's own summary lines (`AdapterVariant.describe_state(config, tensors)`, when it has one)."""
    paths = sorted((s["path"] for s in cfg.get("sites", [])), key=len, reverse=True)
    groups: dict[str, list[torch.Tensor]] = {}
    for key, t in weights.items():
        site = next((p for p in paths if key.startswith(p + ".")), None)
        part = (
            "base::" + key.split("::", 1)[1].rsplit(".", 1)[-1]
            if key.startswith("base::")
            else (key[len(site) + 1 :] if site else key.rsplit(".", 1)[-1])
        )
        groups.setdefault(part, []).append(t)
    state = []
    for part, ts in sorted(groups.items()):
        flat = torch.cat([t.detach().float().reshape(-1) for t in ts]) if ts else torch.zeros(0)
        state.append(
            {
                "tensor": part,
                "tensors": len(ts),
                "shape": list(ts[0].shape),
                "elements": int(flat.numel()),
                "mean_abs": float(flat.abs().mean()) if flat.numel() else 0.0,
                "rms": float(flat.pow(2).mean().sqrt()) if flat.numel() else 0.0,
            }
        )
    summary: list[list[str]] = []
    try:
        reg = registry("adapter")
        var = reg.get(cfg["variant"]) if cfg.get("variant") in reg else None
    except Exception:  # an uninstalled plugin's adapter is still inspectable
        var = None
    if var is not None:
        summary = [[str(k), str(v)] for k, v in var.describe_state(cfg.get("config", {}), weights)]
    return {"state": state, "summary": summary}


def plot_gates(info: dict[str, Any], path: str | Path) -> None:
    """Bar chart of tanh(gate) per layer, one group per tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = info["gates"]
    towers = sorted({g["tower"] for g in gates})
    fig, axes = plt.subplots(1, max(1, len(towers)), figsize=(4 * max(1, len(towers)), 3), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        rows = [g for g in gates if g["tower"] == tower]
        labels = [f"{g['layer']}:{g['role']}" for g in rows]
        ax.bar(labels, [g["gate"] for g in rows], color="tab:blue" if tower == "vision" else "tab:orange")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{tower} tower: cross-modal gate")
        ax.set_xlabel("layer:site")
        ax.set_ylabel("tanh(gate)")
    fig.suptitle(f"{info['name']} ({info['variant']}, {info['config'].get('mechanism', '')})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
