"""Weight-space merging of adapters into one adapter directory.

Methods (weights w_i, one per source; adapter tensors θ_i are the task vectors, since an adapter's
neutral point is the frozen backbone):

- `linear`: weighted average Σ w_i θ_i / Σ w_i (default weights equal).
- `task_arithmetic`: Σ w_i θ_i (Ilharco et al. 2023); negative weights remove a task; default 1 each.
- `ties`: TIES-merging (Yadav et al. 2023) per tensor: trim each w_i θ_i to its top `density` share of
  magnitudes, elect each entry's sign by the summed trimmed values, average the agreeing entries
  (Σ_agree w_i θ̂_i / Σ_agree |w_i|); default weights 1 each.
- `concat` (LoRA): A = [A_1; A_2; ...], B = [c_1 B_1, c_2 B_2, ...] — rank Σ r_i and exactly
  ΔW = Σ w_i s_i B_i A_i (s_i = alpha_i / r_i; the merged adapter has alpha = rank, scaling 1).
- `svd` (LoRA): ΔW = Σ w_i s_i B_i A_i truncated by SVD to `rank` (default: the first source's rank).

linear / task_arithmetic / ties act on every tensor elementwise and need adapters of one variant and
config (dropout aside) with equal tensor shapes; for LoRA they combine A and B separately, which is not
linear in ΔW — `concat` or `svd` are the ΔW-exact choices. The result is a normal adapter directory
(`vlkit.load_adapter` reads it) whose config records `composition: {mode: merge, sources, weights,
method}`, plus a `composition.json` (mode merge) so composition-aware commands read it too.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, IncompatibleAdapterError

METHODS = ("linear", "task_arithmetic", "ties", "concat", "svd")
LORA_ONLY = ("concat", "svd")
ELEMENTWISE_IGNORED = ("dropout",)
LORA_FREE = ("rank", "alpha", "dropout")


def _diff(a: dict, b: dict, ignore: tuple[str, ...]) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def check_mergeable(labels: list[str], cfgs: list[dict], tensors: list[dict[str, torch.Tensor]], method: str) -> None:
    """IncompatibleAdapterError naming both adapters and what differs, when they cannot be merged."""
    if method not in METHODS:
        raise ConfigError(f"merge method {method!r} is not one of {', '.join(METHODS)}")
    if len(cfgs) < 2 and method not in LORA_ONLY:
        raise ConfigError("merging needs at least two adapters")
    a_label, a_cfg, a_t = labels[0], cfgs[0], tensors[0]
    for label, cfg, t in zip(labels[1:], cfgs[1:], tensors[1:]):
        where = f"adapters {a_label} and {label} cannot be merged"
        if cfg["variant"] != a_cfg["variant"]:
            raise IncompatibleAdapterError(f"{where}: variant differs ({a_cfg['variant']!r} vs {cfg['variant']!r})")
        if cfg["backbone_fingerprint"] != a_cfg["backbone_fingerprint"]:
            raise IncompatibleAdapterError(
                f"{where}: backbone fingerprint differs ({a_cfg.get('backbone')!r} {a_cfg['backbone_fingerprint']} "
                f"vs {cfg.get('backbone')!r} {cfg['backbone_fingerprint']})")
        ignore = LORA_FREE if method in LORA_ONLY else ELEMENTWISE_IGNORED
        diff = _diff(a_cfg["config"], cfg["config"], ignore)
        if diff:
            raise IncompatibleAdapterError(f"{where}: config differs: {'; '.join(diff)}")
        if set(t) != set(a_t):
            only = sorted(set(t) ^ set(a_t))
            raise IncompatibleAdapterError(f"{where}: different tensors ({len(only)} not in both, e.g. {only[:2]})")
        if method not in LORA_ONLY:
            for k in a_t:
                if tuple(t[k].shape) != tuple(a_t[k].shape):
                    raise IncompatibleAdapterError(f"{where}: tensor {k} has shape {tuple(a_t[k].shape)} vs "
                                                   f"{tuple(t[k].shape)}")
    if method in LORA_ONLY and a_cfg["variant"] != "lora":
        raise ConfigError(f"merge method {method!r} is for LoRA adapters; these are {a_cfg['variant']!r} "
                          "(use linear, task_arithmetic or ties)")
    extra = [k for k in a_t if k.startswith("base::")]
    if extra and method != "linear":
        raise IncompatibleAdapterError(f"adapter {a_label} also trains backbone tensors ({extra[0]}, ...), which are "
                                       f"absolute weights, not task vectors: only the linear merge applies")


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


def _lora_sites(t: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".lora_A")] for k in t if k.endswith(".lora_A"))


def _scaling(cfg: dict) -> float:
    return float(cfg["config"].get("alpha", 16.0)) / int(cfg["config"].get("rank", 8))


def lora_delta(cfgs, tensors, weights, site: str) -> torch.Tensor:
    return sum(w * _scaling(c) * (t[f"{site}.lora_B"].double() @ t[f"{site}.lora_A"].double())
               for c, t, w in zip(cfgs, tensors, weights))


def merge_tensors(cfgs: list[dict], tensors: list[dict[str, torch.Tensor]], method: str, weights: list[float],
                  density: float = 0.2, rank: int | None = None
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
            acc = sum(w * t[k].double() for w, t in zip(weights, tensors))
            out[k] = acc.to(tensors[0][k].dtype)
        return out, config, info
    if method == "ties":
        for k in tensors[0]:
            out[k] = ties_merge([t[k] for t in tensors], weights, density)
        return out, config, info
    sites = _lora_sites(tensors[0])
    dtype = tensors[0][f"{sites[0]}.lora_A"].dtype
    if method == "concat":
        r_new = sum(int(c["config"]["rank"]) for c in cfgs)
        for s in sites:
            out[f"{s}.lora_A"] = torch.cat([t[f"{s}.lora_A"] for t in tensors], 0).to(dtype)
            out[f"{s}.lora_B"] = torch.cat([(w * _scaling(c)) * t[f"{s}.lora_B"].double()
                                            for c, t, w in zip(cfgs, tensors, weights)], 1).to(dtype)
        config.update(rank=r_new, alpha=float(r_new))
        return out, config, info
    r = int(rank if rank is not None else cfgs[0]["config"]["rank"])
    if r < 1:
        raise ConfigError(f"rank must be >= 1, got {r}")
    err_num = err_den = 0.0
    for s in sites:
        delta = lora_delta(cfgs, tensors, weights, s)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(r, len(sv))
        root = sv[:k].sqrt()
        b = torch.zeros(delta.shape[0], r, dtype=torch.float64)
        a = torch.zeros(r, delta.shape[1], dtype=torch.float64)
        b[:, :k] = u[:, :k] * root
        a[:k] = root.unsqueeze(1) * vh[:k]
        out[f"{s}.lora_A"], out[f"{s}.lora_B"] = a.to(dtype), b.to(dtype)
        err_num += float((sv[k:] ** 2).sum())
        err_den += float((sv ** 2).sum())
    config.update(rank=r, alpha=float(r))
    info["svd_relative_error"] = math.sqrt(err_num / err_den) if err_den > 0 else 0.0
    return out, config, info


def merge_adapters(sources: list[str | Path], out: str | Path, *, method: str = "linear",
                   weights: list[float] | None = None, density: float = 0.2, rank: int | None = None,
                   name: str | None = None, labels: list[str] | None = None) -> dict[str, Any]:
    """Merge adapter directories `sources` into the adapter directory `out`; returns its config."""
    from safetensors.torch import save_file

    from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_weights
    from ..io import atomic_path, write_json
    from .composition import COMPOSITION_FILE, FORMAT, FORMAT_VERSION

    paths = [Path(p) for p in sources]
    labels = labels or [str(p) for p in paths]
    cfgs = [read_adapter_config(p) for p in paths]
    tensors = [read_adapter_weights(p) for p in paths]
    weights = [float(w) for w in weights] if weights is not None else default_weights(method, len(paths))
    if len(weights) != len(paths):
        raise ConfigError(f"{len(weights)} weights given for {len(paths)} adapters")
    check_mergeable(labels, cfgs, tensors, method)
    merged, config, info = merge_tensors(cfgs, tensors, method, weights, density, rank)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = name or (cfgs[0].get("name") if len(paths) == 1 else "merged")
    provenance = {"mode": "merge", "method": method, "weights": weights,
                  "sources": [{"name": c.get("name"), "path": str(p)} for c, p in zip(cfgs, paths)]}
    if method == "ties":
        provenance["density"] = density
    if method == "svd":
        provenance["rank"] = config["rank"]
    provenance.update(info)
    tasks = [c.get("task") or {} for c in cfgs]
    cfg = {**cfgs[0], "name": name, "config": config, "composition": provenance,
           "num_parameters": int(sum(t.numel() for t in merged.values())),
           "task": tasks[0] if all(t == tasks[0] for t in tasks) else {}}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp), metadata={"format": "pt",
                                                                                   "vlkit_adapter": name})
    write_json(out / CONFIG_NAME, cfg)
    write_json(out / COMPOSITION_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": "merge", "backbone": cfgs[0].get("backbone"),
        "backbone_fingerprint": cfgs[0]["backbone_fingerprint"],
        "adapters": [{"name": name, "path": ".", "variant": cfgs[0]["variant"], "task": cfg["task"].get("name")}],
        "weights": None, "merge": provenance})
    return cfg
