"""AdapterFusion training over frozen adapters (`vlkit compose A,B --mode fuse --recipe R`).

The fusion layers (`vlkit.compose.adapter_fusion`) train through the one engine with method `fuse`; the result is
a composition directory (mode `fuse`) holding copies of the adapters and `fusion.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..compose.api import _check_same_backbone, parse_data_items, resolve_sources
from ..data.api import parse_data_spec
from ..errors import ConfigError
from .engine import run
from .recipe import load_recipe


def fuse_adapters(
    sources: list[str] | str,
    out: str | Path,
    *,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    data: list[str] | None = None,
    backbone: str | None = None,
    weights: list[float] | None = None,
    progress=None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """AdapterFusion over frozen adapters: train the fusion layers from `recipe`, write a composition to `out`."""

    srcs = resolve_sources(sources)
    cfg0 = _check_same_backbone(srcs)
    out = Path(out)
    if weights is not None:
        raise ConfigError("--weights does not apply to --mode fuse (the fusion layers learn the mix)")
    summary: dict[str, Any] = {
        "mode": "fuse",
        "output_dir": str(out),
        "adapters": [n for n, _ in srcs],
        "weights": None,
    }

    if recipe is None:
        raise ConfigError("--mode fuse needs --recipe (task, data and optim for training the fusion layers)")
    base = {
        "name": out.name,
        "backbone": backbone or cfg0["backbone"],
        "method": "fuse",
        "compose": {"adapters": [{"name": n, "path": str(p)} for n, p in srcs], "fusion": "fusion"},
        "logging": {"tensorboard": False},
    }
    overrides = list(overrides or [])
    _, bare = parse_data_items(data)
    if bare is not None:  # --data replaces the recipe's training data, as `data.train={...}` given whole does
        overrides.append("data.train=" + json.dumps(parse_data_spec(bare)))
    cfg = load_recipe(recipe, overrides, base=base)
    if cfg.method != "fuse":
        raise ConfigError(f"{recipe}: method must be 'fuse' for --mode fuse (got {cfg.method!r})")
    result, _, _ = run(cfg, out, progress=progress, overwrite=overwrite)
    return {
        **summary,
        "task": result["task"],
        "metrics": result["metrics"],
        "score": result["score"],
        "primary_metric": result["primary_metric"],
        "steps": result["steps"],
        "fusion_parameters": result["parameters"]["trainable"],
    }
