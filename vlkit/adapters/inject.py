"""The functional API over a backbone's owner: `inject(backbone, "lora", ...)`, `load_adapter(backbone, dir)`,
`merge_adapter`, ... for scripts written against a bare backbone.

Each function is one call on `AdaptedModel.of(backbone)` (vlkit.adapters.model), the single owner of the adapter
state; they return the same handles. New code holds the owner (`vlkit.load(spec)`) and calls its methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import AdaptedModel, AdapterHandle
from .sites import host_of

__all__ = [
    "inject",
    "adapter_layers",
    "adapter_parameters",
    "remove_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "load_adapter",
    "save_adapter",
    "adapter_config",
    "parameter_report",
    "host_of",
]


def inject(
    backbone, variant: str = "bottleneck", name: str = "default", *, trainable: bool = True, **options: Any
) -> AdapterHandle:
    """Freeze `backbone` and add adapter `name` of `variant` (it becomes the active one); `AdaptedModel.add_adapter`."""
    return AdaptedModel.of(backbone).add_adapter(name, variant, trainable=trainable, **options)


def adapter_layers(backbone, name: str) -> dict[str, nn.Module]:
    return AdaptedModel.of(backbone).adapter_layers(name)


def adapter_parameters(backbone, name: str) -> dict[str, torch.Tensor]:
    return AdaptedModel.of(backbone).adapter_parameters(name)


def remove_adapter(backbone, name: str) -> None:
    AdaptedModel.of(backbone).delete_adapter(name)


def merge_adapter(backbone, name: str) -> None:
    AdaptedModel.of(backbone).merge_adapter(name)


def unmerge_adapter(backbone, name: str) -> None:
    AdaptedModel.of(backbone).unmerge_adapter(name)


def merge_and_unload(backbone, *names: str) -> list[str]:
    return AdaptedModel.of(backbone).merge_and_unload(*names)


def load_adapter(
    backbone, path: str | Path, name: str | None = None, *, activate: bool = True, trainable: bool = False
) -> AdapterHandle:
    return AdaptedModel.of(backbone).load_adapter(path, name, activate=activate, trainable=trainable)


def save_adapter(
    backbone, path: str | Path, name: str = "default", *, task: dict | None = None, extra: dict | None = None
) -> Path:
    return AdaptedModel.of(backbone).save_adapter(path, name, task=task, extra=extra)


def adapter_config(backbone, name: str, task: dict | None = None, extra: dict | None = None) -> dict[str, Any]:
    return AdaptedModel.of(backbone).adapter_config(name, task, extra)


def parameter_report(backbone) -> dict[str, Any]:
    """Total and trainable parameters of the backbone with its adapters, per tower and per adapter."""
    return AdaptedModel.of(backbone).parameter_report()
