"""Weight-space merging of adapters into one adapter directory.

Methods (weights w_i, one per source; adapter tensors θ_i are the task vectors, since an adapter's
neutral point is the frozen backbone). Every variant gets the elementwise ones:

- `linear`: weighted average Σ w_i θ_i / Σ w_i (default weights equal).
- `task_arithmetic`: Σ w_i θ_i (Ilharco et al. 2023); negative weights remove a task; default 1 each.
- `ties`: TIES-merging (Yadav et al. 2023) per tensor: trim each w_i θ_i to its top `density` share of
  magnitudes, elect each entry's sign by the summed trimmed values, average the agreeing entries
  (Σ_agree w_i θ̂_i / Σ_agree |w_i|); default weights 1 each.

They act on every tensor elementwise and need adapters of one variant and config (the options the
variant's `merge_free_options` names aside) with equal tensor shapes. A variant adds its own methods by
listing them in `AdapterVariant.merge_methods` and implementing `AdapterVariant.merge` (e.g. methods exact
in a low-rank variant's weight update, where the elementwise ones combine its factors separately); such a
method may take a single source. The result is a normal adapter directory (`vlkit.load_adapter` reads it) whose
config records `composition: {mode: merge, sources, weights, method}` plus the variant's merge info, and a
`composition.json` (mode merge) so composition-aware commands read it too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_weights
from ..errors import ConfigError, IncompatibleAdapterError
from ..io import save_safetensors, write_json
from ..plugins import registry
from .composition import COMPOSITION_FILE, FORMAT, FORMAT_VERSION

ELEMENTWISE = ("linear", "task_arithmetic", "ties")


def _variants() -> dict[str, Any]:

    reg = registry("adapter")
    return {n: reg.get(n) for n in reg.names()}


def merge_methods() -> tuple[str, ...]:
    """Every merge method: the elementwise ones, then those the registered variants add (in registry order)."""
    extra: list[str] = []
    for var in _variants().values():
        extra += [m for m in var.merge_methods if m not in ELEMENTWISE and m not in extra]
    return ELEMENTWISE + tuple(extra)


def _own_method(variant, method: str) -> bool:
    return variant is not None and method not in ELEMENTWISE and method in variant.merge_methods


def _diff(a: dict, b: dict, ignore: tuple[str, ...]) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def check_mergeable(labels: list[str], cfgs: list[dict], tensors: list[dict[str, torch.Tensor]], method: str) -> None:
    """IncompatibleAdapterError naming both adapters and what differs, when they cannot be merged."""
    methods = merge_methods()
    if method not in methods:
        raise ConfigError(f"merge method {method!r} is not one of {', '.join(methods)}")
    a_label, a_cfg, a_t = labels[0], cfgs[0], tensors[0]
    variants = _variants()
    var = variants.get(a_cfg["variant"])
    own = _own_method(var, method)
    reason = var.merge_limit(method, a_cfg.get("config") or {}) if var is not None else None
    if reason:
        raise ConfigError(f"{a_cfg['variant']} adapters cannot be merged with {method!r}: {reason}")
    if len(cfgs) < 2 and method in ELEMENTWISE:
        raise ConfigError("merging needs at least two adapters")
    ignore = tuple(var.merge_free_options(method)) if var is not None else ("dropout",)
    for label, cfg, t in zip(labels[1:], cfgs[1:], tensors[1:]):
        where = f"adapters {a_label} and {label} cannot be merged"
        if cfg["variant"] != a_cfg["variant"]:
            raise IncompatibleAdapterError(f"{where}: variant differs ({a_cfg['variant']!r} vs {cfg['variant']!r})")
        if cfg["backbone_fingerprint"] != a_cfg["backbone_fingerprint"]:
            raise IncompatibleAdapterError(
                f"{where}: backbone fingerprint differs ({a_cfg.get('backbone')!r} {a_cfg['backbone_fingerprint']} "
                f"vs {cfg.get('backbone')!r} {cfg['backbone_fingerprint']})"
            )
        diff = _diff(a_cfg["config"], cfg["config"], ignore)
        if diff:
            raise IncompatibleAdapterError(f"{where}: config differs: {'; '.join(diff)}")
        if set(t) != set(a_t):
            only = sorted(set(t) ^ set(a_t))
            raise IncompatibleAdapterError(f"{where}: different tensors ({len(only)} not in both, e.g. {only[:2]})")
        if not own:
            for k in a_t:
                if tuple(t[k].shape) != tuple(a_t[k].shape):
                    raise IncompatibleAdapterError(
                        f"{where}: tensor {k} has shape {tuple(a_t[k].shape)} vs {tuple(t[k].shape)}"
                    )
    if method not in ELEMENTWISE and not own:
        offered = [n for n, v in variants.items() if method in v.merge_methods]
        raise ConfigError(
            f"merge method {method!r} is for {' / '.join(offered)} adapters; these are "
            f"{a_cfg['variant']!r} "
            f"(use {', '.join(ELEMENTWISE + (tuple(var.merge_methods) if var is not None else ()))})"
        )
    extra = [k for k in a_t if k.startswith("base::")]
    if extra and method != "linear":
        raise IncompatibleAdapterError(
            f"adapter {a_label} also trains backbone tensors ({extra[0]}, ...), which are "
            f"absolute weights, not task vectors: only the linear merge applies"
        )


def default_weights(method: str, n: int) -> list[float]:
    return [1.0 / n] * n if method == "linear" else [1.0] * n


def ties_merge(ts: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on one tensor: trim to the top `density` magnitudes, elect signs, disjoint weighted mean."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    w = torch.tensor(weights, dtype=torch.float64)
    stacked = torch.stack([t.double() for t in ts]) * w.view(-1, *([1] * ts[0].dim()))
    flat = stacked.reshape(len(ts), -1)
    k = max(1, int(math.ceil(density * flat.shape[1])))
    trimmed = torch.zeros_like(flat)
    if k >= flat.shape[1]:
        trimmed = flat.clone()
    else:
        idx = flat.abs().topk(k, dim=1).indices
        trimmed.scatter_(1, idx, flat.gather(1, idx))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (trimmed != 0)
    num = (trimmed * agree).sum(0)
    den = (w.abs().view(-1, 1) * agree).sum(0)
    merged = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return merged.view(ts[0].shape).to(ts[0].dtype)


def merge_tensors(
    cfgs: list[dict],
    tensors: list[dict[str, torch.Tensor]],
    method: str,
    weights: list[float],
    density: float = 0.2,
    rank: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(merged tensors, merged variant config, info) — `info` holds e.g. the SVD's relative error."""
    config = dict(cfgs[0]["config"])
    info: dict[str, Any] = {}
    out: dict[str, torch.Tensor] = {}
    if method in ("linear", "task_arithmetic"):
        if method == "linear":
            total = sum(weights)
            if total == 0:
                raise ConfigError("linear merge weights sum to zero (use task_arithmetic for signed sums)")
            weights = [w / total for w in weights]
        for k in tensors[0]:
            acc = weights[0] * tensors[0][k].double()
            for w, t in zip(weights[1:], tensors[1:]):
                acc = acc + w * t[k].double()
            out[k] = acc.to(tensors[0][k].dtype)
        return out, config, info
    if method == "ties":
        for k in tensors[0]:
            out[k] = ties_merge([t[k] for t in tensors], weights, density)
        return out, config, info
    var = _variants().get(cfgs[0]["variant"])
    if var is None or not _own_method(var, method):
        raise ConfigError(f"merge method {method!r} is not offered by {cfgs[0]['variant']!r} adapters")
    return var.merge(
        method, [dict(c["config"]) for c in cfgs], tensors, list(weights), {"density": density, "rank": rank}
    )


def check_finite_weights(weights) -> None:
    """Composition weights must be finite numbers (a NaN or inf weight gives a NaN or inf adapter)."""
    import math

    bad = [w for w in weights if not isinstance(w, (int, float)) or not math.isfinite(float(w))]
    if bad:
        raise ConfigError(f"weights must be finite numbers, got {', '.join(str(w) for w in bad)}")


def check_tensors(label: str, tensors: dict[str, torch.Tensor]) -> None:
    """Adapter tensors to merge must be floating point and finite."""
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise ConfigError(f"adapter {label}: tensor {k} is {v.dtype}, not floating point; it cannot be merged")
        if not torch.isfinite(v).all():
            raise ConfigError(f"adapter {label}: tensor {k} holds NaN or inf values")


def merge_adapters(
    sources: list[str | Path],
    out: str | Path,
    *,
    method: str = "linear",
    weights: list[float] | None = None,
    density: float = 0.2,
    rank: int | None = None,
    name: str | None = None,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """Merge adapter directories `sources` into the adapter directory `out`; returns its config."""

    paths = [Path(p) for p in sources]
    labels = labels or [str(p) for p in paths]
    cfgs = [read_adapter_config(p) for p in paths]
    tensors = [read_adapter_weights(p) for p in paths]
    weights = [float(w) for w in weights] if weights is not None else default_weights(method, len(paths))
    if len(weights) != len(paths):
        raise ConfigError(f"{len(weights)} weights given for {len(paths)} adapters")
    check_finite_weights(weights)
    for label, t in zip(labels, tensors):
        check_tensors(label, t)
    check_mergeable(labels, cfgs, tensors, method)
    merged, config, info = merge_tensors(cfgs, tensors, method, weights, density, rank)
    bad = sorted(k for k, v in merged.items() if not torch.isfinite(v).all())
    if bad:
        raise ConfigError(
            f"the {method} merge gives non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}; nothing was written"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = name or (cfgs[0].get("name") if len(paths) == 1 else "merged")
    provenance: dict[str, Any] = {
        "mode": "merge",
        "method": method,
        "weights": weights,
        "sources": [{"name": c.get("name"), "path": str(p)} for c, p in zip(cfgs, paths)],
    }
    if method == "ties":
        provenance["density"] = density
    provenance.update(info)
    tasks = [c.get("task") or {} for c in cfgs]
    cfg = {
        **cfgs[0],
        "name": name,
        "config": config,
        "composition": provenance,
        "num_parameters": int(sum(t.numel() for t in merged.values())),
        "task": tasks[0] if all(t == tasks[0] for t in tasks) else {},
    }
    save_safetensors(merged, out / WEIGHTS_NAME, metadata={"format": "pt", "vlkit_adapter": str(name)})
    write_json(out / CONFIG_NAME, cfg)
    write_json(
        out / COMPOSITION_FILE,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mode": "merge",
            "backbone": cfgs[0].get("backbone"),
            "backbone_fingerprint": cfgs[0]["backbone_fingerprint"],
            "adapters": [{"name": name, "path": ".", "variant": cfgs[0]["variant"], "task": cfg["task"].get("name")}],
            "weights": None,
            "merge": provenance,
        },
    )
    return cfg
