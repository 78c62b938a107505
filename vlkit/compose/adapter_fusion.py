"""AdapterFusion (Pfeiffer et al., 2021): learned attention over several frozen adapters at every site.

At a site with adapters 1..N, each adapter's output o_n (its full output, residual included) is a key
and a value; the site's base output y (the adapters' common input) is the query:

    s_n = softmax_n( (W_q y) · (W_k o_n) / sqrt(d) ),   out = sum_n s_n · W_v o_n

W_v starts as the identity and W_q, W_k near zero, so an untrained fusion is the plain average of the
adapters. Fusion layers live in each host as `host.fusions[fusion_name][site_key]`, apart from the
adapters; `AdaptedModel.set_adapter(*names, mode="fuse", fusion=fusion_name)` turns them on.

Training reuses the trainer: recipe `method: fuse` with `compose.adapters: [{name, path}, ...]` loads
the adapters frozen, adds fusion layers (trainable) and trains them with the task head; the run
directory is also a composition directory (`fusion.safetensors`, `composition.json`, the adapters).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..adapters.files import read_tensor_file
from ..adapters.model import AdaptedModel
from ..adapters.sites import host_of
from ..errors import ConfigError, IncompatibleAdapterError
from ..io import save_safetensors
from .composition import write_composition

FUSION_FILE = "fusion.safetensors"


class FusionAttention(nn.Module):
    """AdapterFusion at one site: attention of the base output over the outputs of `names`."""

    def __init__(self, width: int, names: list[str], temperature: float = 1.0):
        super().__init__()
        self.names = list(names)
        self.temperature = float(temperature)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(width))
            self.value.bias.zero_()
        self.last_weights: torch.Tensor | None = None

    def forward(self, y: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        o = torch.stack(outs, dim=-2)  # (..., N, D)
        q = self.query(y).unsqueeze(-2)  # (..., 1, D)
        scores = (q * self.key(o)).sum(-1) / (math.sqrt(y.shape[-1]) * self.temperature)
        attn = scores.softmax(-1)  # (..., N)
        self.last_weights = attn.detach()
        return (attn.unsqueeze(-1) * self.value(o)).sum(-2)


def _fusion_sites(backbone, names: list[str]):
    """Site path -> (Site, adapters present there, in `names` order)."""
    out: dict[str, tuple[Any, list[str]]] = {}
    for n in names:
        for site in AdaptedModel.of(backbone).records[n].sites:
            entry = out.setdefault(site.path, (site, []))
            entry[1].append(n)
    return out


def add_fusion(
    backbone, name: str, adapters: list[str], *, trainable: bool = True, temperature: float = 1.0
) -> dict[str, FusionAttention]:
    """Add AdapterFusion layers `name` over loaded `adapters` at every site any of them wraps."""
    model = AdaptedModel.of(backbone)
    if len(adapters) < 1:
        raise ConfigError("a fusion needs at least one adapter")
    for n in adapters:
        if n not in model.records:
            raise ConfigError(f"adapter {n!r} is not loaded on the backbone")
    if name in model.fusions:
        raise ConfigError(f"a fusion named {name!r} is already on this backbone")
    layers: dict[str, FusionAttention] = {}
    for path, (site, present) in _fusion_sites(backbone, adapters).items():
        host = host_of(backbone, site)
        layer = FusionAttention(site.out_features, present, temperature)
        ref = next(iter(host.base.parameters()), None)
        if ref is not None:
            layer.to(device=ref.device, dtype=ref.dtype)
        if name not in host.fusions:
            host.fusions[name] = nn.ModuleDict()
        host.fusion_group(name)[site.key] = layer
        for p in layer.parameters():
            p.requires_grad_(trainable)
        layers[path] = layer
    model.add_fusion(name, {"adapters": list(adapters), "sites": sorted(layers), "temperature": temperature})
    return layers


def fusion_layers(backbone, name: str) -> dict[str, FusionAttention]:
    rec = AdaptedModel.of(backbone).fusions[name]
    sites = _fusion_sites(backbone, rec["adapters"])
    return {
        p: cast(FusionAttention, host_of(backbone, sites[p][0]).fusion_group(name)[sites[p][0].key])
        for p in rec["sites"]
    }


def fusion_parameters(backbone, name: str) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{k}": t for path, layer in fusion_layers(backbone, name).items() for k, t in layer.state_dict().items()
    }


def remove_fusion(backbone, name: str) -> None:
    model = AdaptedModel.of(backbone)
    rec = model.remove_fusion(name)
    if rec is None:
        return
    for site, _ in _fusion_sites(backbone, [n for n in rec["adapters"] if n in model.records]).values():
        host = host_of(backbone, site)
        if name in host.fusions:
            del host.fusions[name]


def save_fusion(backbone, name: str, path: str | Path) -> Path:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in fusion_parameters(backbone, name).items()}
    save_safetensors(tensors, path, metadata={"format": "pt", "vlkit_fusion": name})
    return path


def load_fusion(backbone, name: str, adapters: list[str], path: str | Path, temperature: float = 1.0) -> None:
    """Add fusion `name` over loaded `adapters` and fill it from a fusion.safetensors file."""
    add_fusion(backbone, name, adapters, trainable=False, temperature=temperature)
    try:
        saved = read_tensor_file(path)
        expected = fusion_parameters(backbone, name)
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise IncompatibleAdapterError(
                f"fusion {path} does not fit these adapters: {len(missing)} tensors "
                f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected"
            )
        with torch.no_grad():
            for k, t in expected.items():
                if tuple(saved[k].shape) != tuple(t.shape):
                    raise IncompatibleAdapterError(
                        f"fusion {path}: {k} has shape {tuple(saved[k].shape)}, expected {tuple(t.shape)}"
                    )
                t.copy_(saved[k].to(dtype=t.dtype, device=t.device))
    except Exception:
        remove_fusion(backbone, name)
        raise


# --- training through the trainer (recipe method "fuse") -------------------------------------------------
def prepare_fuse(
    backbone, task, sources: list[tuple[str, Path]], fusion: str = "fusion", temperature: float = 1.0
) -> None:
    """Training AdapterFusion (recipe `method: fuse`): load the (name, adapter dir) `sources` frozen, add
    trainable fusion layers `fusion`, activate them, and start the head from an adapter's own head for the same
    task when one fits."""
    model = AdaptedModel.of(backbone)
    names = []
    for name, path in sources:
        model.load_adapter(path, name=name, activate=False)
        names.append(name)
    add_fusion(backbone, fusion, names, trainable=True, temperature=float(temperature))
    model.set_adapter(*names, mode="fuse", fusion=fusion)
    init_head_from_adapters(task, [path for _, path in sources])


def init_head_from_adapters(task, dirs: list[Path]) -> str | None:
    """Copy the head of the first adapter dir trained on the same task with the same options (shapes)."""
    if not list(task.head.parameters()):
        return None
    for d in dirs:
        meta_file, head_file = d / "task.json", d / "head.safetensors"
        if not (meta_file.is_file() and head_file.is_file()):
            continue
        meta = json.loads(meta_file.read_text())
        if meta.get("name") != task.name or meta.get("options") != task.metadata().get("options"):
            continue
        state = read_tensor_file(head_file)
        own = task.head.state_dict()
        if set(state) == set(own) and all(state[k].shape == own[k].shape for k in own):
            task.load_head_state(state)
            return str(d)
    return None


def write_fuse_outputs(
    out: Path, backbone, sources: list[tuple[str, Path]], fusion: str = "fusion", temperature: float = 1.0
) -> None:
    """After a `method: fuse` run: the fusion weights, copies of the adapters and composition.json."""

    save_fusion(backbone, fusion, out / FUSION_FILE)
    write_composition(
        out,
        "fuse",
        backbone,
        list(sources),
        extra={
            "fusion": {"name": fusion, "file": FUSION_FILE, "temperature": float(temperature)},
            "task": {"meta": "task.json", "head": "head.safetensors" if (out / "head.safetensors").is_file() else None},
        },
    )
