"""Training methods: which parameters train for `adapter`, `full`, `linear`, `zeroshot` and `fuse`."""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import ConfigError


def adapter_name_for(run_name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_\-]+", "-", run_name).strip("-")
    return name or "default"


def apply_method(backbone, task, cfg, adapter_options: dict[str, Any]) -> tuple[str | None, dict[str, nn.Parameter]]:
    """Set requires_grad for the method; returns (adapter name or None, trainable parameters by name)."""
    from ..adapters.inject import inject

    method = cfg.method
    adapter = None
    for p in backbone.parameters():
        p.requires_grad_(False)
    if method == "adapter":
        opts = dict(adapter_options)
        variant = opts.pop("variant")
        adapter = adapter_name_for(opts.pop("name", cfg.name))
        from ..compose.resolve import load_recipe_base

        base = load_recipe_base(backbone, cfg)  # compose.base: train on top of frozen adapters
        inject(backbone, variant, name=adapter, **opts)
        if base:
            backbone.set_active(*(n for n, _ in base), adapter, mode="stack")
    elif method == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
    elif method == "fuse":  # AdapterFusion over frozen adapters (vlkit.compose.fusion)
        from ..compose.fusion import prepare_fuse_method

        prepare_fuse_method(backbone, task, cfg)
    elif method in ("linear", "zeroshot"):
        pass
    else:
        raise ConfigError(f"unknown method {method!r}")
    head_params = {f"head.{n}": p for n, p in task.head.named_parameters()}
    for p in head_params.values():
        p.requires_grad_(method != "zeroshot")
    if method == "linear" and not head_params:
        raise ConfigError(f"method 'linear' needs a task head with parameters; task {task.name!r} has none "
                          "(for classification set task.options.head=linear)")
    trainable = {f"backbone.{n}": p for n, p in backbone.named_parameters() if p.requires_grad}
    trainable.update({n: p for n, p in head_params.items() if p.requires_grad})
    return adapter, trainable
